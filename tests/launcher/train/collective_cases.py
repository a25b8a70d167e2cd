"""Rank functions for tests/launcher/train/test_collectives.py (run by tests.helpers.multirank.run_ranks, gloo)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from notellm2.launcher import distributed as D
from notellm2.launcher.train.metrics import StepStats
from notellm2.launcher.train.preemption import PreemptionFlag


def helpers_on_gloo() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    sums = torch.tensor([0.1 * (rank + 1), 1e-300 * (rank + 1)], dtype=torch.float64)
    same = D.all_reduce(sums)
    flag = D.all_reduce(torch.tensor([rank == world - 1], dtype=torch.int32), op=D.ReduceOp.MAX)
    gathered = D.all_gather_object({"rank": rank})
    to_zero = D.gather_object(f"r{rank}", dst=0)
    box = [f"from {rank}", rank] if rank == 0 else [None, None]
    D.broadcast_object_list(box, src=0)
    D.barrier()
    def agreed(flag: PreemptionFlag) -> bool:  # the trainer's path: the local flag rides the step's all-reduce
        stats = StepStats()
        stats.stop_asked = float(flag.requested)
        return flag.agree(stats.all_reduced().stop_asked > 0)

    nobody_asked = agreed(PreemptionFlag(stop_file=""))
    stop = PreemptionFlag(stop_file="")
    if rank == 1:
        stop.request("test")
    return {"device": str(D.collective_device()), "same_object": same is sums, "dtype": str(sums.dtype),
            "sums": sums.tolist(), "flag": [flag.dtype == torch.int32, int(flag.item())], "gathered": gathered,
            "to_zero": to_zero, "box": box, "should_stop": [nobody_asked, agreed(stop), stop.signal_name]}
