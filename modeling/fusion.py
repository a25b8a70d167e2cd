"""Late fusion and the output head.

LateFusionGate: the pooled ViT feature v0 is projected (no bias) to the LLM width, v = W_v v0; a
per-dimension gate z = sigmoid(W_z [h; v] + b) mixes it with the LLM representation h:
fused = z * h + (1 - z) * v. Rows without an image keep h unchanged. `bias=False` drops b.

EmbeddingHead: a linear map to `model.embed_dim` followed by L2 normalisation.

Both take an `init` (model.fusion.init / model.head.init): "default" keeps nn.Linear's own
initialisation; "xavier_normal"; "normal" draws N(0, init_std). Biases that exist start at zero
under the non-default choices.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modeling.config import INITS


def init_linear(linear: nn.Linear, init: str = "default", std: float = 0.02, key: str = "init") -> None:
    """(Re)initialise `linear` in place; `key` names the config key in errors."""
    if init == "default":
        return
    with torch.no_grad():
        if init == "xavier_normal":
            nn.init.xavier_normal_(linear.weight)
        elif init == "normal":
            nn.init.normal_(linear.weight, mean=0.0, std=std)
        else:
            raise ValueError(f"{key}: got {init!r}; allowed: {', '.join(INITS)}")
        if linear.bias is not None:
            linear.bias.zero_()


class LateFusionGate(nn.Module):
    def __init__(self, llm_dim: int, pooled_dim: int, bias: bool = True, init: str = "default", init_std: float = 0.02):
        super().__init__()
        self.vision_proj = nn.Linear(pooled_dim, llm_dim, bias=False)
        self.gate = nn.Linear(2 * llm_dim, llm_dim, bias=bias)
        for linear in (self.vision_proj, self.gate):
            init_linear(linear, init, init_std, key="model.fusion.init")

    def forward(self, h: torch.Tensor, pooled: torch.Tensor, has_image: Optional[torch.Tensor] = None):
        """Returns (fused [N, H], z [N, H]); rows with has_image False pass h through (z = 1 there)."""
        dtype = self.gate.weight.dtype
        h = h.to(dtype)
        v = self.vision_proj(pooled.to(dtype))
        z = torch.sigmoid(self.gate(torch.cat([h, v], dim=-1)))
        fused = z * h + (1 - z) * v
        if has_image is not None:
            keep = has_image.to(h.device).view(-1, 1)
            fused = torch.where(keep, fused, h)
            z = torch.where(keep, z, torch.ones_like(z))
        return fused, z


class EmbeddingHead(nn.Module):
    def __init__(self, llm_dim: int, embed_dim: int, bias: bool = True, init: str = "default", init_std: float = 0.02):
        super().__init__()
        self.linear = nn.Linear(llm_dim, embed_dim, bias=bias)
        init_linear(self.linear, init, init_std, key="model.head.init")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x.to(self.linear.weight.dtype))
        return F.normalize(out.float(), dim=-1)
