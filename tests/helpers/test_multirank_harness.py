import re
import time

import psutil

from tests.helpers.multirank import run_ranks


def test_ranks_run_and_return_values():
    res = run_ranks("tests.helpers.harness_cases:all_reduce_rank_sum", nproc=2, timeout=120)
    assert res.returns[0] == {"rank": 0, "world": 2, "sum": 3.0}
    assert res.returns[1]["rank"] == 1 and res.returns[1]["sum"] == 3.0


def test_hanging_rank_fails_within_timeout_and_shows_every_rank():
    t0 = time.monotonic()
    res = run_ranks("tests.helpers.harness_cases:rank1_hangs", nproc=2, timeout=25, check=False,
                    env={"MULTIRANK_PG_TIMEOUT": "3600"})
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 25 + 15, elapsed
    assert "TIMEOUT" in res.output
    text = res.describe()
    assert "rank 1 is about to hang" in text
    assert "rank 0 waits in all_reduce" in text
    # torchrun starts its ranks in sessions of their own: killing its process group alone left both
    # ranks running after the suite. None of them may outlive the timeout.
    pids = {int(p) for p in re.findall(r"(?:about to hang|waits in all_reduce) \(pid (\d+)\)", text)}
    assert len(pids) == 2, text
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and "rank1_hangs" in " ".join(proc.cmdline()):
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    for pid in alive:  # do not leave them behind even when the assertion fails
        psutil.Process(pid).kill()
    assert not alive, f"ranks {alive} survived the harness's timeout"
