"""The in-batch contrastive loss gathered over all ranks, with a learnable temperature.

Layout. Each rank holds N = 2B local notes laid out as [queries (B); targets (B)]; query i pairs
with target i. All ranks' notes are gathered (with gradient) into the global batch of G = world * N
columns. Every local note is an anchor; its positive is its pair partner; every other gathered note
is a negative, except: the anchor itself (self is excluded), any column holding the same note id
as the anchor or as its partner (a duplicate is not a negative; the partner column itself stays),
and any later copy of a note id already present (a note gathered twice counts once). So injecting
a duplicate note leaves every other anchor's loss exactly as in the de-duplicated batch.

Convention (what makes multi-rank training equal to one big batch). Rank r's loss is the MEAN of
the cross-entropies of its LOCAL anchors, each computed against all G gathered columns:

    loss_r = (1 / N) * sum_{a local to r} CE_a

The gather's backward sends each rank the gradient of every rank's loss with respect to its own
notes, so the parameter gradients on rank r are d(sum_r' loss_r')/d(params through r's notes).
Averaging those gradients over ranks, as DeepSpeed (and DDP) do, therefore gives exactly

    (1 / world) * d(sum_r loss_r) / d(params) = d(mean over all G anchors of CE) / d(params),

the gradient of the single-process loss on the concatenated batch (equal local batch sizes).
With `loss.scale_by_world_size: true` (the paper's convention) loss_r is further divided by world,
which scales the averaged gradient by 1/world.

The only collective in modeling/ is `gather_with_grad`; with world size 1 or no process group it is
the identity.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from modeling.config import LossConfig


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order). Floating tensors keep the autograd
    link to every rank's copy; integer tensors are gathered without gradient. Identity for world 1."""
    if _world() == 1:
        return x
    from torch.distributed import _functional_collectives as fc

    x = x.contiguous()
    if x.is_floating_point():
        out = fc.all_gather_tensor_autograd(x, gather_dim=0, group=dist.group.WORLD)
    else:
        out = fc.all_gather_tensor(x, gather_dim=0, group=dist.group.WORLD)
    return out  # an AsyncCollectiveTensor waits on first use


class GatheredContrastiveLoss(nn.Module):
    """InfoNCE over the gathered batch with a learnable logit scale (a (1,)-shaped Parameter).

    forward(emb [N, d], note_ids [N]) -> {"loss", "per_anchor" [N] (local CE), "logit_scale"}.
    `emb` should be L2-normalised; similarities and the loss are computed in fp32.
    `gather_fn` replaces the gather (tests use it for a single-process reference and a negative control).
    """

    def __init__(self, cfg: LossConfig, gather_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        if not 0 < cfg.init_scale <= cfg.max_scale:
            raise ValueError(f"loss.init_scale: got {cfg.init_scale}; allowed: 0 < init_scale <= loss.max_scale ({cfg.max_scale})")
        self.max_scale = float(cfg.max_scale)
        self.scale_by_world_size = bool(cfg.scale_by_world_size)
        # log of the scale; shape (1,) because a 0-dim Parameter crashes ZeRO-3.
        self.log_scale = nn.Parameter(torch.full((1,), math.log(cfg.init_scale)), requires_grad=cfg.learnable_temperature)
        self.gather_fn = gather_fn

    def scale(self) -> torch.Tensor:
        return self.log_scale.float().exp().clamp(max=self.max_scale)

    def forward(self, emb: torch.Tensor, note_ids: torch.Tensor) -> dict:
        n = emb.shape[0]
        if n % 2 or n == 0:
            raise ValueError(f"contrastive loss: expected [queries; targets] with an even number of rows, got {n}")
        if note_ids.shape != (n,):
            raise ValueError(f"contrastive loss: note_ids must have shape ({n},), got {tuple(note_ids.shape)}")
        gather = self.gather_fn or gather_with_grad
        emb = emb.float()
        note_ids = note_ids.to(device=emb.device, dtype=torch.long)
        all_emb = gather(emb)
        all_ids = gather(note_ids)
        g = all_emb.shape[0]
        # Where this rank's rows sit among the gathered columns (equal N on all ranks).
        offset = _rank() * n if g != n else 0
        local = torch.arange(n, device=emb.device)
        self_col = offset + local
        partner_col = offset + (local + n // 2) % n

        scale = self.scale()
        logits = scale * (emb @ all_emb.t())  # [N, G] fp32
        cols = torch.arange(g, device=emb.device).view(1, g)
        partner_ids = note_ids[(local + n // 2) % n]
        # A note gathered more than once counts once: every later copy of an id is not a negative.
        same = all_ids.view(-1, 1) == all_ids.view(1, -1)
        later_copy = (same & (cols.view(-1, 1) < cols)).any(dim=0)  # [G]
        excluded = (cols == self_col.view(-1, 1)) \
            | (all_ids.view(1, g) == note_ids.view(-1, 1)) \
            | (all_ids.view(1, g) == partner_ids.view(-1, 1)) \
            | later_copy.view(1, g)
        excluded &= cols != partner_col.view(-1, 1)
        logits = logits.masked_fill(excluded, float("-inf"))
        per_anchor = F.cross_entropy(logits, partner_col, reduction="none")
        loss = per_anchor.mean()
        if self.scale_by_world_size:
            loss = loss / _world()
        return {"loss": loss, "per_anchor": per_anchor, "logit_scale": scale.detach().squeeze(0)}
