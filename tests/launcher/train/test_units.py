"""Fast single-process checks of the engine's parts: topology from the environment, DeepSpeed config
filling, LR schedule, parameter groups, watchdog diagnosis, metrics resume, counter flattening."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
import torch.distributed as dist

from notellm2.launcher.config import ConfigError, load_config
from notellm2.launcher.distributed import Watchdog, detect_topology
from notellm2.launcher.train.metrics import MetricsWriter
from notellm2.launcher.train.optim import lr_lambda, param_groups
from notellm2.launcher.train.engine import build_ds_config
from tests.helpers.paths import REPO
from tests.helpers.runs import logged_steps
from notellm2.launcher.train.metrics import flatten_counters


def test_topology_from_torchrun_slurm_and_single():
    t = detect_topology({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (t.rank, t.local_rank, t.world_size, t.master_addr, t.master_port, t.source) == (3, 1, 4, "n1", 1234, "torchrun")
    t = detect_topology({"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "77",
                         "SLURM_JOB_NODELIST": "gpu[03-04,09]"})
    assert (t.rank, t.local_rank, t.world_size, t.master_addr, t.source) == (5, 1, 8, "gpu03", "slurm")
    assert t.master_port == 20077
    t = detect_topology({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29999"})
    assert (t.master_addr, t.master_port) == ("10.0.0.1", 29999)
    assert detect_topology({}).world_size == 1
    with pytest.raises(RuntimeError, match="rank=2 world_size=2"):
        detect_topology({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json"))))
def test_every_shipped_ds_config_is_filled_from_the_yaml(path):
    cfg = load_config(None, [f"train.ds_config={path}", "data.pairs_per_rank=6", "train.grad_accum_steps=3",
                             "train.grad_clip=0.5", "train.precision=bf16"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] in (2, 3)
    assert not any(k.startswith("_") for k in ds)
    assert build_ds_config(cfg, 1, load_universal=True)["checkpoint"]["load_universal"] is True
    from deepspeed.runtime.config import DeepSpeedConfig  # the config DeepSpeed itself would build

    DeepSpeedConfig(build_ds_config(cfg, world_size=1))


def test_ds_config_holding_batch_sizes_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64}))
    cfg = load_config(None, [f"train.ds_config={bad}"])
    with pytest.raises(ConfigError, match=r"train.ds_config: .*bad.json sets 'train_batch_size'"):
        build_ds_config(cfg, 2)
    cfg = load_config(None, ["train.ds_config=ds_configs/nope.json"])
    with pytest.raises(ConfigError, match="train.ds_config: ds_configs/nope.json does not exist"):
        build_ds_config(cfg, 2)


def test_lr_schedule_warmup_then_decay():
    f = lr_lambda("cosine", warmup_steps=4, max_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert f(100) == pytest.approx(0.1)
    lin = lr_lambda("linear", 0, 10, 0.0)
    assert [round(lin(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_lambda("constant", 2, 10, 0.0)(7) == 1.0


def test_param_groups_split_llm_new_and_decay():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
            self.connector = torch.nn.Linear(4, 4)
            self.query_tokens = torch.nn.Parameter(torch.zeros(1, 2, 4))
            self.logit_scale = torch.nn.Parameter(torch.zeros(1))
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    m = M()
    groups = {g["name"]: g for g in param_groups(m, lr_llm=1e-5, lr_new=1e-3, weight_decay=0.1)}
    ids = lambda g: {id(p) for p in groups[g]["params"]}  # noqa: E731
    assert ids("llm_decay") == {id(m.llm[0].weight)}
    assert ids("llm_no_decay") == {id(m.llm[0].bias), id(m.llm[1].weight), id(m.llm[1].bias)}
    assert ids("new_decay") == {id(m.connector.weight)}
    assert ids("new_no_decay") == {id(m.connector.bias), id(m.query_tokens), id(m.logit_scale)}
    assert groups["llm_decay"]["lr"] == 1e-5 and groups["new_no_decay"]["lr"] == 1e-3
    assert groups["new_decay"]["weight_decay"] == 0.1 and groups["new_no_decay"]["weight_decay"] == 0.0


def test_watchdog_names_the_rank_behind_and_the_failed_one():
    store = dist.HashStore()
    dogs = [Watchdog(r, 3, timeout_s=5, store=store) for r in range(3)]
    dogs[0].progress(7, "forward")
    dogs[1].progress(6, "data")
    dogs[2].progress(7, "backward")
    text = dogs[0].diagnose()
    assert text.startswith("rank(s) 1 stopped reporting") and "rank 1 at step 6 (data)" in text
    dogs[2].mark_failed("ValueError: boom")
    text = dogs[1].diagnose()
    assert "rank(s) 1, 2" in text and "rank 2: ValueError: boom" in text
    other = Watchdog(0, 2, timeout_s=5, store=dist.HashStore())
    assert "no heartbeat" in other.diagnose() and "rank(s) 1" in other.diagnose()


def test_metrics_resume_forgets_steps_after_the_checkpoint(tmp_path):
    w = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, max_steps=5)
    for s in range(1, 6):
        w.log(s, {"loss/total": s})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss/to')  # a line cut by a kill
    w = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, max_steps=5, start_step=3)
    w.log(4, {"loss/total": 40})
    w.close()
    assert logged_steps(str(tmp_path)) == [1, 2, 3, 4]  # the cut line and the old steps 4 and 5 are gone


def test_flatten_counters():
    got = flatten_counters({"batches": 8, "dropped": {"bad_image": 2, "bad_json": 1}, "blanked": {}, "flag": True})
    assert got == {"batches": 8, "dropped/bad_image": 2, "dropped/bad_json": 1, "dropped_total": 3, "blanked_total": 0}


def test_watchdog_ends_a_stalled_process_only_once_armed():
    import subprocess
    import sys
    import textwrap

    # The script waits on an event instead of sleeping through the start-up: its watchdog's poll, after
    # publishing a heartbeat, checks the stall, so a heartbeat that follows one taken with the stall
    # already over the timeout proves that an unarmed check passed it without ending the process.
    code = textwrap.dedent("""
        import threading, time, torch.distributed as dist
        from notellm2.launcher.distributed import Watchdog
        passed = threading.Event()
        class Observed(Watchdog):
            def _publish_heartbeat_only(self):
                if getattr(self, "over", False):
                    passed.set()
                self.over = time.monotonic() - self._last_progress > self.timeout_s
                super()._publish_heartbeat_only()
        dog = Observed(0, 1, timeout_s=1, store=dist.HashStore(), poll_s=0.1).start()
        assert passed.wait(60), "the watchdog never polled past its timeout"
        print("survived start-up", flush=True)
        dog.progress(1, "data", arm=True)
        threading.Event().wait(30)  # stalled: the armed watchdog must end the process
        print("not reached", flush=True)
    """)
    from tests.helpers.multirank import base_env

    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "survived start-up" in r.stdout and "not reached" not in r.stdout
    assert "no training progress" in r.stdout and "at step 1 (data)" in r.stdout
    # every thread's stack follows on stderr: the main thread waits in the script's stalled wait
    line = 1 + code.splitlines().index("threading.Event().wait(30)  # stalled: the armed watchdog must end the process")
    assert "(most recent call first)" in r.stderr and f'File "<string>", line {line}' in r.stderr, r.stderr


def test_step_stats_pack_by_field_name_and_keep_local_fields():
    """One float64 tensor per step, in field order; unpacking reads each field back by its name and
    leaves the rank-local fields (which loss parts the model returned, its extras) as they were."""
    import torch

    from notellm2.launcher.train.metrics import StepStats

    s = StepStats()
    out = {"loss": torch.tensor(2.0), "loss_mm": torch.tensor(1.0), "logit_scale": torch.tensor([20.0])}
    s.add_outputs(out, accum=2)
    s.add_outputs(out, accum=2)
    s.add_batch({"attention_mask": torch.ones(2, 3), "note_ids": torch.arange(2)})
    s.step_time_s, s.stop_asked = 0.5, 1.0
    assert StepStats.reduced_fields() == ["loss", "loss_mm", "loss_vis", "tokens", "notes", "data_wait_s",
                                          "step_time_s", "stop_asked"]
    packed = s.pack()
    assert packed.dtype == torch.float64 and packed.tolist() == [2.0, 1.0, 0.0, 6.0, 2.0, 0.0, 0.5, 1.0]
    summed = s.unpack(packed * 2)  # what a 2-rank all-reduce of equal ranks gives
    assert (summed.loss, summed.tokens, summed.stop_asked) == (4.0, 12.0, 2.0)
    assert summed.seen_parts == {"loss", "loss_mm"} and summed.extras == {"logit_scale": 20.0}
    assert s.all_reduced() == s  # no process group: the sums are this rank's figures


class _WaitingStream(torch.utils.data.IterableDataset):
    """A loader stream whose worker says it started and then waits until told to stop (two events made
    before the fork, so the forked worker shares them)."""

    def __init__(self):
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.started, self.stop = ctx.Event(), ctx.Event()

    def __iter__(self):
        self.started.set()
        self.stop.wait(120)
        return iter(())


def test_a_stalled_rank_gets_its_forked_loader_workers_stacks(tmp_path):
    """The watchdog's last words include the loader workers' stacks: a forked worker (data_shards'
    start_workers) prints its own on STACKS_SIGNAL, and signal_forked_workers finds and signals it.

    The worker writes to fd 2. The test points fd 2 at a file of its own, opened for appending, and reads
    it through a second handle: pytest's capfd truncates its capture file on every read, and a write
    that the forked worker made between the read and the truncation was lost (CI saw the stack's header
    vanish this way)."""
    import time

    from notellm2.data_shards.reader.workers import start_workers
    from notellm2.launcher.distributed import signal_forked_workers

    log = tmp_path / "worker_stderr.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = os.dup(2)
    os.dup2(fd, 2)
    stream, it = _WaitingStream(), None
    try:
        it = start_workers(stream, num_workers=1, start_method="fork")
        assert stream.started.wait(60), "the loader worker never started its stream"
        sent = signal_forked_workers()
        assert len(sent) == 1, sent
        # the worker writes its stacks from a signal handler (no event to wait on): read the file until
        # they are there, however long that takes on a loaded box
        err, deadline = "", time.monotonic() + 60
        while "in __iter__" not in err and time.monotonic() < deadline:
            err = log.read_text(errors="replace")
            time.sleep(0.05)  # the poll interval of this condition, not a guess at how long the worker needs
        assert "(most recent call first)" in err and "in __iter__" in err, err
    finally:
        stream.stop.set()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    del it
