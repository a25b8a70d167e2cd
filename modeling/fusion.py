"""Late fusion and the output head.

LateFusionGate: the pooled ViT feature v0 is projected (no bias) to the LLM width, v = W_v v0; a
per-dimension gate z = sigmoid(W_z [h; v] + b) mixes it with the LLM representation h:
fused = z * h + (1 - z) * v. Rows without an image keep h unchanged. `bias=False` drops b.

EmbeddingHead: a linear map to `model.embed_dim` followed by L2 normalisation.

Both compute in fp32 up to the L2 normalisation whatever dtype their weights are stored in: under
`train.precision: bf16` the trainer casts every parameter to bf16 for ZeRO (launcher/train/engine.py), and a
bf16 gate or head would round the representation to bf16 (8 significant bits) right before the
similarities.
Fp32Linear upcasts its input AND its weight inside forward. It stays an nn.Module call (not F.linear on
a child's weight from the parent's forward) so that ZeRO-3's per-module hooks gather its parameters
on any call, training forward or a later `encode`.
Both take an `init` (model.fusion.init / model.head.init): "default" keeps nn.Linear's own
initialisation; "xavier_normal"; "normal" draws N(0, init_std). Biases that exist start at zero
under the non-default choices.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from notellm2.modeling.config import INITS


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


class Fp32Linear(nn.Linear):
    """nn.Linear computed in fp32 (input, weight and bias upcast); output fp32. Same state_dict keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), self.weight.float(), bias)


class Fp32LayerNorm(nn.LayerNorm):
    """nn.LayerNorm computed in fp32 (input and affine parameters upcast), for the same reason as Fp32Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class LateFusionGate(nn.Module):
    def __init__(self, llm_dim: int, pooled_dim: int, bias: bool = True, init: str = "default", init_std: float = 0.02,
                 input_norm: bool = False):
        super().__init__()
        # Optional LayerNorm of the pooled feature before W_v, in fp32 like the rest of the gate.
        self.input_norm = Fp32LayerNorm(pooled_dim) if input_norm else None
        self.vision_proj = Fp32Linear(pooled_dim, llm_dim, bias=False)
        self.gate = Fp32Linear(2 * llm_dim, llm_dim, bias=bias)
        for linear in (self.vision_proj, self.gate):
            init_linear(linear, init, init_std, key="model.fusion.init")

    def forward(self, h: torch.Tensor, pooled: torch.Tensor, has_image: Optional[torch.Tensor] = None):
        """Returns (fused [N, H], z [N, H]) in fp32; rows with has_image False pass h through (z = 1 there)."""
        h = h.float()  # bf16 hidden states are upcast, not the other way round (see the module docstring)
        if self.input_norm is not None:
            pooled = self.input_norm(pooled)
        v = self.vision_proj(pooled)
        z = torch.sigmoid(self.gate(torch.cat([h, v], dim=-1)))
        fused = z * h + (1 - z) * v
        if has_image is not None:
            keep = has_image.to(h.device).view(-1, 1)
            fused = torch.where(keep, fused, h)
            z = torch.where(keep, z, torch.ones_like(z))
        return fused, z


class EmbeddingHead(nn.Module):
    def __init__(self, llm_dim: int, embed_dim: int, bias: bool = True, init: str = "default", init_std: float = 0.02,
                 projection: bool = True):
        super().__init__()
        self.linear = Fp32Linear(llm_dim, embed_dim, bias=bias) if projection else None
        if self.linear is not None:
            init_linear(self.linear, init, init_std, key="model.head.init")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.linear is None:  # model.head.projection false: the representation itself, in fp32
            return F.normalize(x.float(), dim=-1)
        return F.normalize(self.linear(x), dim=-1)  # fp32 in, fp32 out (Fp32Linear)
