"""Rank functions used by tests/helpers/test_multirank_harness.py."""
import os
import time

import torch
import torch.distributed as dist


def all_reduce_rank_sum():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": t.item()}


def rank1_hangs():
    if dist.get_rank() == 1:
        print(f"rank 1 is about to hang (pid {os.getpid()})", flush=True)
        time.sleep(3600)
    print(f"rank {dist.get_rank()} waits in all_reduce (pid {os.getpid()})", flush=True)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()
