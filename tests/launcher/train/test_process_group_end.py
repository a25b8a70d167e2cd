"""`notellm2 train` ends the process group before it returns, so the interpreter's exit never meets
gloo's worker threads still holding work (finished benchmark ranks died of SIGABRT there, 2 of 6 runs:
"terminate called without an active exception"; launcher/cli/train.py)."""
from __future__ import annotations

from tests.helpers.double_runs import double_args
from tests.helpers.multirank import run_ranks


def cli_train(run_dir: str) -> dict:
    """In each rank (gloo already up, as torchrun + an earlier init would leave it): the train verb."""
    import torch.distributed as dist

    from notellm2.launcher.cli import main

    rc = main(["train", "--components", "tests.helpers.doubles:components", *double_args(run_dir, "train.max_steps=2")[1:]])
    return {"rc": rc, "initialized": dist.is_initialized()}


def test_train_verb_ends_the_process_group(tmp_path):
    r = run_ranks("tests.launcher.train.test_process_group_end:cli_train", nproc=2, timeout=240,
                  kwargs={"run_dir": str(tmp_path / "run")})
    assert "done: step 2" in r.output, r.describe()
    assert r.returns == {0: {"rc": 0, "initialized": False}, 1: {"rc": 0, "initialized": False}}, r.returns
