"""The in-batch contrastive loss gathered over all ranks, with a learnable temperature.

Layout. Each rank holds N = 2B local notes laid out as [queries (B); targets (B)]; query i pairs
with target i. All ranks' notes are gathered (with gradient) into the global batch of G = world * N
columns. Every local note is an anchor; its positive is its pair partner; every other gathered note
is a negative, except: the anchor itself (self is excluded), any column holding the same note id
as the anchor or as its partner (a duplicate is not a negative; the partner column itself stays),
and any later copy of a note id already present (a note gathered twice counts once).

Duplicate pairs. An anchor is the ordered key (note id, partner's note id). A gathered row whose key
already appeared in an earlier gathered column (either direction of an injected pair: (q, t) again
or (t, q)) is a later copy and gets weight 0. With the negatives' masking above, every kept anchor
sees exactly the columns it would see in the de-duplicated batch, so the loss and the gradients are
exactly those of the de-duplicated batch (when a flipped copy comes first in column order, a note's
gradient reaches its other copy: the same input, so parameter gradients are unchanged). The kept flags are computed from the gathered ids, the same
on every rank, so no extra collective is needed.

Convention (what makes multi-rank training equal to one big de-duplicated batch). Let K be the number
of kept anchors over all G gathered columns and W = G / N the number of gathered blocks (the world
size; 1 when the gather is the identity). Rank r's loss is

    loss_r = (W / K) * sum_{kept a local to r} CE_a

(each CE computed against all G gathered columns). The gather's backward sends each rank the gradient
of every rank's loss with respect to its own notes, so the parameter gradients on rank r are
d(sum_r' loss_r')/d(params through r's notes). Averaging those gradients over ranks, as DeepSpeed
(and DDP) do, therefore gives exactly

    (1 / W) * d(sum_r loss_r) / d(params) = d((1 / K) * sum_{kept a} CE_a) / d(params),

the gradient of the single-process loss (mean over kept anchors) on the concatenated batch, and the
rank-averaged loss is that mean too. Without duplicates K = G and loss_r is the plain mean of the
rank's N local CEs. Local batch sizes must be equal on all ranks (the gather requires it).
With `loss.scale_by_world_size: true` (the paper's convention) loss_r is further divided by world,
which scales the averaged gradient by 1/world.

Recommendation-aware negatives (both off by default; docs/training.md, "Negatives").
`loss.logq_correction`: column j's logit becomes scale * sim - log q_j, q_j the sampling frequency of
column j's note (its share of the training-pair appearances), the positive's column included (the
sampled-softmax correction of Yi et al. 2019: a popular note is drawn as a negative more often, and
without it the model learns to push popular notes down). `loss.mask_known_positives`: a column whose
note is one of the anchor's known related notes (from the training pairs), other than the anchor's
own partner, is excluded like a duplicate: the loss is that of the batch with that column deleted.
The per-row inputs (`logq` [N], `known` [N, K] of note hashes padded with -2) come from the batch
(`sample_logq`, `known_pos`); the column frequencies are gathered like the note ids.

Temperature. The logit scale is exp(log_scale), unclamped here, so its gradient never vanishes. The
upper bound `loss.max_scale` is applied to the parameter itself after each optimizer step by the
trainer (notellm2.launcher.train.optim.clamp_temperature), so a scale pushed to the bound can come back down.

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

from notellm2.modeling.config import LossConfig


def _world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gathered gradient over ranks (reduce-scatter) and
    returns this rank's rows: the gradient of sum_r loss_r with respect to this rank's input.

    Both directions are blocking collectives of the process group. PyTorch's functional collectives
    (`torch.distributed._functional_collectives`, used here before) return an AsyncCollectiveTensor that
    waits on first use; on gloo, training with them corrupted the heap about once in 10^4 steps
    (munmap_chunk(): invalid pointer, segfaults in gloo's pt_gloo_runloop thread), with no model and no
    DeepSpeed involved (docs/training.md, "Native crashes"). These blocking ones never did in the
    same soak."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        ctx.rows, ctx.rank = x.shape[0], rank
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
        return out


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (rank order), with blocking collectives. Floating
    tensors keep the autograd link to every rank's copy; integer tensors are gathered without
    gradient. Identity for world 1."""
    if _world() == 1:
        return x
    x = x.contiguous()
    if x.is_floating_point() and x.requires_grad:
        return _GatherWithGrad.apply(x)
    out = x.new_empty((_world() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.detach())
    return out


def negative_inputs(batch) -> dict:
    """The loss's per-row negative options of a batch: {"logq": sample_logq, "known": known_pos} (None
    when the batch has no such key)."""
    return {"logq": batch.get("sample_logq"), "known": batch.get("known_pos")}


class GatheredContrastiveLoss(nn.Module):
    """InfoNCE over the gathered batch with a learnable logit scale (a (1,)-shaped Parameter).

    forward(emb [N, d], note_ids [N]) -> {"loss", "per_anchor" [N] (local CE, dropped copies included),
    "kept" [N] (bool: False for a later copy of an anchor, weight 0), "num_kept" (K, over all ranks),
    "logit_scale"}.
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
        self.logq_correction = bool(cfg.logq_correction)
        self.mask_known_positives = bool(cfg.mask_known_positives)

    def scale(self) -> torch.Tensor:
        """exp(log_scale) in fp32, not clamped: the trainer keeps log_scale <= log(max_scale)."""
        return self.log_scale.float().exp()

    def forward(self, emb: Optional[torch.Tensor], note_ids: Optional[torch.Tensor] = None,
                log_scale: Optional[torch.Tensor] = None, log_scale_grad: Optional[torch.Tensor] = None,
                logq: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None):
        """The loss of `emb` (see the class docstring). `log_scale` replaces the parameter's value (a
        detached leaf: chunked caching's first pass computes d loss / d log_scale with it, outside the
        engine). `forward(None, log_scale_grad=g)` returns the scalar (log_scale * g).sum() instead: the
        second pass hands that gradient back to the parameter inside this module's call, so that ZeRO-3
        gathers log_scale and reduces its gradient like any other (launcher/train/chunked.py)."""
        if emb is None:
            if log_scale_grad is None:
                raise ValueError("contrastive loss: pass emb, or log_scale_grad for the temperature term")
            return (self.log_scale.float() * log_scale_grad.to(self.log_scale.device).float()).sum()
        return self.loss(emb, note_ids, self.log_scale if log_scale is None else log_scale, logq, known)

    def loss(self, emb: torch.Tensor, note_ids: torch.Tensor, log_scale: torch.Tensor,
             logq: Optional[torch.Tensor] = None, known: Optional[torch.Tensor] = None) -> dict:
        """forward's maths with the log scale given (no parameter read: callable outside the engine).
        `logq` / `known` are read only when loss.logq_correction / loss.mask_known_positives is on, and
        are then required."""
        n = emb.shape[0]
        if n % 2 or n == 0:
            raise ValueError(f"contrastive loss: expected [queries; targets] with an even number of rows, got {n}")
        if note_ids.shape != (n,):
            raise ValueError(f"contrastive loss: note_ids must have shape ({n},), got {tuple(note_ids.shape)}")
        if self.logq_correction and (logq is None or tuple(logq.shape) != (n,)):
            raise ValueError(f"loss.logq_correction: the batch needs 'sample_logq' of shape ({n},) (the pair "
                             f"loader adds it from note_stats.parquet), got "
                             f"{None if logq is None else tuple(logq.shape)}")
        if self.mask_known_positives and (known is None or known.dim() != 2 or known.shape[0] != n):
            raise ValueError(f"loss.mask_known_positives: the batch needs 'known_pos' of shape ({n}, K) (the pair "
                             f"loader adds it from note_stats.parquet), got "
                             f"{None if known is None else tuple(known.shape)}")
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

        scale = log_scale.float().exp()
        logits = scale * (emb @ all_emb.t())  # [N, G] fp32
        if self.logq_correction:  # every column's note's log sampling frequency, positives included
            all_logq = gather(logq.to(device=emb.device, dtype=torch.float32))
            logits = logits - all_logq.view(1, -1)
        cols = torch.arange(g, device=emb.device).view(1, g)
        partner_ids = note_ids[(local + n // 2) % n]
        # A note gathered more than once counts once: every later copy of an id is not a negative.
        same = all_ids.view(-1, 1) == all_ids.view(1, -1)
        later_copy = (same & (cols.view(-1, 1) < cols)).any(dim=0)  # [G]
        excluded = (cols == self_col.view(-1, 1)) \
            | (all_ids.view(1, g) == note_ids.view(-1, 1)) \
            | (all_ids.view(1, g) == partner_ids.view(-1, 1)) \
            | later_copy.view(1, g)
        if self.mask_known_positives:  # the anchor's known related notes are not negatives
            known = known.to(device=emb.device, dtype=torch.long)
            excluded |= (known.unsqueeze(2) == all_ids.view(1, 1, g)).any(dim=1)
        excluded &= cols != partner_col.view(-1, 1)
        logits = logits.masked_fill(excluded, float("-inf"))
        per_anchor = F.cross_entropy(logits, partner_col, reduction="none")
        # Later copies of an anchor (same note id and same partner id as an earlier gathered column).
        blocks = g // n
        all_partner = (cols.view(-1) // n) * n + (cols.view(-1) % n + n // 2) % n
        all_partner_ids = all_ids[all_partner]
        same_key = same & (all_partner_ids.view(-1, 1) == all_partner_ids.view(1, -1))
        kept_all = ~(same_key & (cols.view(-1, 1) < cols)).any(dim=0)  # [G]
        kept = kept_all[offset:offset + n]
        num_kept = kept_all.sum()
        loss = per_anchor.masked_fill(~kept, 0.0).sum() * (blocks / num_kept.to(per_anchor.dtype))
        if self.scale_by_world_size:
            loss = loss / _world()
        return {"loss": loss, "per_anchor": per_anchor, "kept": kept, "num_kept": num_kept,
                "logit_scale": scale.detach().squeeze(0)}
