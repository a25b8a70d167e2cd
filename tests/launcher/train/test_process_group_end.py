"""`notellm2 train` ends each rank's distributed state before main() returns, on every way out: the process
group, the watchdog thread and gloo's busy worker threads (notellm2.launcher.distributed.shutdown, run by
notellm2.launcher.cli.main). Left to the interpreter's exit they aborted finished ranks ("terminate called without an
active exception": issue #24, docs/training.md "Exit aborts")."""
from __future__ import annotations

from tests.helpers.double_runs import double_args
from tests.helpers.multirank import run_ranks


def cli_train(run_dir: str, extra: tuple = ()) -> dict:
    """In each rank (gloo already up, as torchrun + an earlier init would leave it): the train verb, then what
    is left of the rank's distributed state."""
    import threading

    import torch.distributed as dist

    from notellm2.launcher.cli import main
    from notellm2.launcher.distributed import gloo_workers

    rc = main(["train", "--components", "tests.helpers.doubles:components",
               *double_args(run_dir, "train.max_steps=2", *extra)[1:]])
    return {"rc": rc, "initialized": dist.is_initialized(),
            "watchdogs": sum(t.name == "notellm2-watchdog" for t in threading.enumerate()),
            "busy_gloo_workers": sum(state != "S" for state, _ in gloo_workers().values())}


ENDED = {"initialized": False, "watchdogs": 0, "busy_gloo_workers": 0}


def test_train_verb_ends_the_process_group(tmp_path):
    r = run_ranks("tests.launcher.train.test_process_group_end:cli_train", nproc=2, timeout=240,
                  kwargs={"run_dir": str(tmp_path / "run")})
    assert "done: step 2" in r.output, r.describe()
    assert r.returns == {0: {"rc": 0, **ENDED}, 1: {"rc": 0, **ENDED}}, r.returns


def test_train_verb_ends_the_process_group_after_a_user_error(tmp_path):
    # A user error raised after the engine and the watchdog started (eval.pairs is read before the first
    # step): main() prints it and returns 2, with the group ended and the watchdog stopped. Before issue #24
    # only a normal end and a preemption ended the group; here it stayed up and the watchdog thread ran into
    # the interpreter's exit.
    missing = tmp_path / "no-such-pairs.parquet"
    r = run_ranks("tests.launcher.train.test_process_group_end:cli_train", nproc=2, timeout=240,
                  kwargs={"run_dir": str(tmp_path / "run"),
                          "extra": ["eval.every_steps=1", f"eval.notes_shards={tmp_path}/notes-{{0..1}}.tar",
                                    f"eval.pairs={missing}"]})
    assert "notellm2 train: eval.pairs:" in r.describe(), r.describe()
    assert r.returns == {0: {"rc": 2, **ENDED}, 1: {"rc": 2, **ENDED}}, r.returns
