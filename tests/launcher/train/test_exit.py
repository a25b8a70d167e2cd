"""A rank's way out (issue #24): a finished 2-rank run died of SIGABRT at interpreter exit ("terminate called
without an active exception") because one of gloo's worker threads was still dropping a finished collective,
and in torch 2.13 that takes the GIL, when the interpreter began to finalise. notellm2.launcher.distributed.shutdown is
the one teardown that prevents it; notellm2.launcher.cli.main runs it on every exit path.

* when shutdown() returns, gloo's workers hold no tensor of any collective (checked with weak references);
* `notellm2 train` on 2 real torchrun ranks that ends by preemption (SIGUSR1, exit 75) or by a user error
  (exit 2): every rank exits with that code, with no abort in its log. (What is left of a rank after main()
  returns on those paths: tests/launcher/train/test_process_group_end.py.)"""
from __future__ import annotations

import re

import pytest

from tests.helpers.double_runs import double_args
from tests.helpers.multirank import run_command, run_ranks

ABORT_MARKERS = ("terminate called", "Fatal Python error", "core dumped")


def many_tensor_gather_then_shutdown(n: int, late_rank: int) -> dict:
    """In each rank: an all_gather of n tensors per rank whose handle and tensors we drop at once, so that the
    gloo worker thread that finishes it drops the tensors itself, one GIL round trip each (torch 2.13);
    `late_rank` joins it 0.5 s late. This thread spins (holding the GIL but for the 5 ms switches) until
    the gather is done, so the worker is still dropping when shutdown(wait_for_ranks=False) starts (the
    teardown after an error; with the barrier the worker may finish while this thread waits). Returns how
    many of those tensors were still alive when shutdown() returned (weak references)."""
    import math
    import sys
    import time
    import warnings
    import weakref

    import torch
    import torch.distributed as dist

    from notellm2.launcher.distributed import gloo_workers, shutdown

    rank, world = dist.get_rank(), dist.get_world_size()
    ins = [torch.full((1,), float(i)) for i in range(n)]
    outs = [[torch.full((1,), math.nan) for _ in range(n)] for _ in range(world)]
    probe = outs[1 - rank][0]  # filled by the gather: our sign that it is done
    refs = [weakref.ref(t) for t in ins] + [weakref.ref(t) for row in outs for t in row if t is not probe]
    if rank == late_rank:
        time.sleep(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated, still the one gather of many tensors
        work = dist.all_gather_coalesced(outs, ins, async_op=True)
    del work, ins, outs  # from here only the gloo worker holds them
    # The worker needs the GIL for the gather too (a round trip per tensor it copies): a short switch interval
    # lets it through quickly; the spin still keeps this thread busy, not waiting, when the gather completes.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    while math.isnan(probe.item()):
        pass
    sys.setswitchinterval(interval)
    workers = len(gloo_workers())
    group = dist.group.WORLD  # a reference past the group's end, as DeepSpeed keeps (its ZeRO-3 parameters)
    shutdown(wait_for_ranks=False)
    alive = sum(r() is not None for r in refs)
    del group
    return {"alive": alive, "of": len(refs), "gloo_workers_seen": workers}


def test_shutdown_returns_only_after_gloo_workers_dropped_every_tensor():
    # Without the wait for idle gloo workers (destroy_process_group alone), a worker still held 2,164 to all
    # 2,999 of the tensors when shutdown() returned (3 runs x 2 ranks; 5 of 6 held all). destroy_process_group
    # waits for them only when it destroys the group, i.e. when nothing else holds it.
    r = run_ranks("tests.launcher.train.test_exit:many_tensor_gather_then_shutdown", nproc=2, timeout=120,
                  kwargs={"n": 1000, "late_rank": 1})
    for rank in (0, 1):
        assert r.returns[rank]["gloo_workers_seen"] >= 2, r.returns  # the case ran on gloo's worker threads
        assert r.returns[rank]["alive"] == 0, r.returns
    assert not any(m in r.describe() for m in ABORT_MARKERS), r.describe()


def _no_abort(result) -> None:
    text = result.output + "".join(result.rank_logs.values())
    found = [m for m in ABORT_MARKERS if m in text]
    assert not found, f"{found} in the logs\n{result.describe()}"


# torchrun looks at its ranks every 0.1 s and SIGTERMs the others as soon as one exits non-zero; every rank
# of these runs stops on purpose with the same code, so it looks every 5 s and each rank reports its own.
SLOW_MONITOR = ("--monitor-interval", "5")


@pytest.mark.slow
def test_preempted_run_exits_75_on_every_rank_without_abort(tmp_path):
    # SIGUSR1 to rank 1 at the start of step 2 (launcher/train/faults.py): every rank checkpoints that step and
    # leaves through notellm2.launcher.cli.main with the preemption code.
    r = run_command(double_args(str(tmp_path / "run"), "train.max_steps=50", "checkpoint.every_steps=1000"),
                    nproc=2, timeout=240, check=False, env={"NOTELLM2_TEST_USR1_AT": "1:2"}, torchrun_args=SLOW_MONITOR)
    assert r.rank_exit_codes() == {0: 75, 1: 75}, r.describe()
    assert re.search(r"stop requested \(.*\): checkpoint of step 2 written; exiting with code 75", r.output), r.describe()
    _no_abort(r)


@pytest.mark.slow
def test_user_error_after_the_engine_started_exits_2_on_every_rank_without_abort(tmp_path):
    # eval.pairs does not exist: every rank refuses it after the engine, the watchdog and DeepSpeed's groups
    # are up (launcher/train/train.py reads it before the first step), and main() turns it into exit code 2.
    missing = tmp_path / "no-such-pairs.parquet"
    r = run_command(double_args(str(tmp_path / "run"), "train.max_steps=5", "eval.every_steps=1",
                                f"eval.notes_shards={tmp_path}/notes-{{0..1}}.tar", f"eval.pairs={missing}"),
                    nproc=2, timeout=240, check=False, torchrun_args=SLOW_MONITOR)
    assert r.rank_exit_codes() == {0: 2, 1: 2}, r.describe()
    assert "notellm2 train: eval.pairs:" in r.output, r.describe()
    _no_abort(r)
