"""notellm2.launcher.train.preemption: a signal only sets a flag; ranks agree on the stop; the exit code is 75."""
from __future__ import annotations

import os
import signal

import pytest

from notellm2.launcher.train.preemption import PREEMPTED_EXIT_CODE, STOP_FILE_ENV, Preempted, PreemptionFlag
from tests.helpers.multirank import run_ranks


@pytest.fixture
def flag():
    f = PreemptionFlag.install()
    yield f
    f.uninstall()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_nothing_else(flag, sig):
    assert not flag.requested and not flag.agree(flag.requested)
    os.kill(os.getpid(), sig)  # the process survives: the handler only records it
    assert flag.requested and flag.agree(flag.requested)
    assert flag.signal_name == signal.Signals(sig).name


def test_install_is_idempotent_and_uninstall_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    f = PreemptionFlag.install()
    assert PreemptionFlag.install() is f
    assert signal.getsignal(signal.SIGUSR1) == f._on_signal
    f.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before
    assert PreemptionFlag.install() is not f
    PreemptionFlag._installed.uninstall()


def test_stop_file_counts_as_a_request(tmp_path, monkeypatch):
    path = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(path))
    f = PreemptionFlag()
    assert not f.requested
    path.write_text("")
    assert f.requested and "stop file" in f.signal_name


def test_agreement_names_the_other_rank_and_keeps_a_local_reason():
    f = PreemptionFlag(stop_file="")
    assert f.agree(False) is False and not f.requested
    assert f.agree(True) is True
    assert f.requested and f.signal_name == "another rank was asked to stop"
    g = PreemptionFlag(stop_file="")
    g.request("SIGUSR1")
    assert g.agree(True) and g.signal_name == "SIGUSR1"  # its own reason is kept


def test_preempted_carries_the_requeue_code(tmp_path):
    assert Preempted(7).exit_code == PREEMPTED_EXIT_CODE == 75
    from notellm2.launcher.train import preemption

    assert not hasattr(PreemptionFlag, "should_stop") and not hasattr(PreemptionFlag, "exit")  # one path only
    assert isinstance(preemption.install_for_training(), PreemptionFlag)
    PreemptionFlag._installed.uninstall()


def test_only_one_rank_signalled_yet_both_stop_after_the_same_step():
    r = run_ranks("tests.slurm.preemption_cases:stop_agreed_across_ranks", nproc=2, timeout=120,
                  kwargs={"signal_rank": 1, "signal_step": 3, "steps": 10})
    assert r.returns[0]["stopped_at"] == r.returns[1]["stopped_at"] == 3
    assert r.returns[1]["local_at"] == 3 and r.returns[1]["signal"] == "SIGUSR1"
    assert r.returns[0]["local_at"] is None  # rank 0 never got a signal; it stopped by agreement
    assert r.returns[0]["signal"] == "another rank was asked to stop"
