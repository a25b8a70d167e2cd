"""One rank of `scripts/soak.py --mode collectives` (started by torchrun): the gathered contrastive
loss's collectives in a tight loop, with no model, no DeepSpeed and no data loader, so that a heap
corruption there cannot be anything else.

Each iteration: a linear map of random features, L2-normalised, gathered over the ranks (with
gradient), an InfoNCE-style loss against the gathered rows, backward, and one blocking all_reduce of
the loss (what the trainer does with its step metrics). `--gather` picks how the rows are gathered:

* `blocking`: `notellm2.modeling.loss.gather_with_grad` (blocking all_gather_into_tensor, reduce_scatter_tensor
  in backward), what the loss uses;
* `functional`: torch's functional collectives (`all_gather_tensor_autograd` + `all_gather_tensor`,
  AsyncCollectiveTensor results that wait on first use), what the loss used before 2026-12-01;
* `functional-nograd`: the functional forward gather of detached rows only (no reduce-scatter in backward);
* `functional-wait`: the functional gathers, each waited at once (no two collectives in flight).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gather", default="blocking",
                    choices=("blocking", "functional", "functional-nograd", "functional-wait"))
    ap.add_argument("--iters", type=int, default=10000)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    from notellm2.modeling.loss import gather_with_grad

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    lin = torch.nn.Linear(3072, 16)
    n = 8

    def gather(x, ids):
        if args.gather == "blocking":
            return gather_with_grad(x), gather_with_grad(ids)
        from torch.distributed import _functional_collectives as fc

        if args.gather == "functional":
            return (fc.all_gather_tensor_autograd(x.contiguous(), 0, dist.group.WORLD),
                    fc.all_gather_tensor(ids.contiguous(), 0, dist.group.WORLD))
        if args.gather == "functional-nograd":
            return (fc.all_gather_tensor(x.detach().contiguous(), 0, dist.group.WORLD),
                    fc.all_gather_tensor(ids.contiguous(), 0, dist.group.WORLD))
        ge = fc.all_gather_tensor_autograd(x.contiguous(), 0, dist.group.WORLD)
        ge = ge.wait() if hasattr(ge, "wait") else ge
        gi = fc.all_gather_tensor(ids.contiguous(), 0, dist.group.WORLD)
        return ge, (gi.wait() if hasattr(gi, "wait") else gi)

    t0 = time.time()
    for i in range(args.iters):
        emb = F.normalize(lin(torch.randn(n, 3072)), dim=-1)
        ids = torch.arange(n) + n * rank
        all_emb, all_ids = gather(emb, ids)
        logits = 20.0 * emb @ all_emb.t()
        logits = logits.masked_fill(all_ids.view(1, -1) == ids.view(-1, 1), float("-inf"))
        target = (torch.arange(n) + n // 2) % n + n * rank
        logits[torch.arange(n), target] = 20.0 * (emb * all_emb[target]).sum(-1)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        total = torch.tensor([float(loss)], dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0 and (i + 1) % 2000 == 0:
            print(f"[soak-collectives] {args.gather}: {i + 1}/{args.iters} iterations, {time.time() - t0:.0f}s", flush=True)
    dist.barrier()
    if rank == 0:
        print(f"[soak-collectives] {args.gather}: done {args.iters} iterations", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
