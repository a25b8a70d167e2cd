"""The training engine on 2 CPU ranks with a small honest stand-in model (tests/helpers/doubles.py):
exact resume after kill -9 (also in the middle of a save), keep-last, manifest, TensorBoard
scalars, world-size change through universal checkpoints, stuck and dead ranks."""
from __future__ import annotations

import json
import os
import re
import time

import pytest
import torch

from notellm2.launcher.train import checkpoint as ckpt
from notellm2.launcher.distributed import WATCHDOG_EXIT_CODE
from notellm2.launcher.train import faults
from notellm2.launcher.config import config_hash, load_config
from tests.helpers.multirank import run_ranks
from tests.helpers.runs import metrics_by_step
from tests.helpers.double_runs import train_double

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """6 uninterrupted steps, a checkpoint every 2, keep the last 2."""
    run_dir = str(tmp_path_factory.mktemp("reference"))
    train_double(run_dir, f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=2")
    return run_dir


def test_exact_resume_after_kills(reference_run, tmp_path):
    ref = metrics_by_step(reference_run)
    assert sorted(ref) == list(range(1, STEPS + 1))
    run_dir = str(tmp_path / "killed")
    common = (f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=2")

    # 1) rank 1 SIGKILLs itself in the middle of the step-4 save: step 2 stays the latest.
    r = train_double(run_dir, *common, env={faults.KILL_HOOK_ENV: "1:after_shards:4"}, check=False)
    assert r.returncode != 0, r.describe()
    root = ckpt.checkpoint_root(run_dir)
    assert ckpt.latest_complete(root).endswith("step_00000002")
    assert os.path.isdir(os.path.join(root, ".tmp-step_00000004"))

    # 2) resume; rank 1 SIGKILLs itself at the start of step 5 (after the step-4 checkpoint).
    r = train_double(run_dir, *common, env={faults.DIE_HOOK_ENV: "1:5"}, check=False)
    assert r.returncode != 0, r.describe()
    assert "resumed step 2" in r.output
    assert not os.path.exists(os.path.join(root, ".tmp-step_00000004")), "leftover of the killed save not removed"
    assert ckpt.latest_complete(root).endswith("step_00000004")

    # 3) resume again and finish.
    r = train_double(run_dir, *common)
    assert "resumed step 4" in r.output
    got = metrics_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        for key in ("loss/total", "loss/mm", "loss/vis", "optim/grad_norm", "lr/new_decay", "model/logit_scale"):
            assert got[step][key] == ref[step][key], f"step {step} {key}: {got[step][key]} != {ref[step][key]}"
    # losses actually moved (the comparison is not between constants)
    assert len({ref[s]["loss/total"] for s in ref}) == STEPS


def test_checkpoints_manifest_keep_last_and_no_vision(reference_run):
    root = ckpt.checkpoint_root(reference_run)
    assert [s for s, _ in ckpt.list_complete(root)] == [4, 6]  # keep_last=2
    with open(os.path.join(root, "latest")) as fh:
        assert fh.read().strip() == "step_00000006"
    m = ckpt.read_manifest(os.path.join(root, "step_00000006"))
    cfg = load_config(os.path.join(reference_run, "config.resolved.yaml"))
    assert m["step"] == 6 and m["world_size"] == 2 and m["samples_seen"] == 6 * 2 * 4
    assert m["config_hash"] == config_hash(cfg)
    assert m["versions"]["torch"] and m["versions"]["deepspeed"]
    assert [s["index"] for s in m["reader_states"]] == [6, 6]
    with open(os.path.join(root, "step_00000006", "rank00001.json")) as fh:
        rank1 = json.load(fh)
    assert set(rank1["rng"]) >= {"python", "numpy", "torch"} and rank1["reader"]["index"] == 6
    # Only the note model is in the checkpoint: its parameter names, no vision tower.
    states = torch.load(os.path.join(root, "step_00000006", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                        weights_only=False)
    names = set().union(*[set(d) for d in states["param_shapes"]])
    assert "llm.embed.weight" in names and "connector.0.weight" in names
    assert not any(n.startswith("proj") or "vision" in n for n in names), names


def test_config_mismatch_refused(reference_run):
    cfg = load_config(os.path.join(reference_run, "config.resolved.yaml"), ["loss.init_scale=10"])
    root = ckpt.checkpoint_root(reference_run)
    with pytest.raises(ckpt.CheckpointError, match="config hash .*allow_config_mismatch=true"):
        ckpt.decide_resume("auto", root, 2, config_hash(cfg), allow_mismatch=False)
    chosen = ckpt.decide_resume("auto", root, 2, config_hash(cfg), allow_mismatch=True)
    assert chosen.step == 6 and not chosen.universal
    assert ckpt.decide_resume("auto", root, 1, config_hash(cfg), allow_mismatch=True).universal
    with pytest.raises(ckpt.CheckpointError, match=r"checkpoint.resume=none, but .*\(steps \[4, 6\]\)"):
        ckpt.decide_resume("none", root, 2, config_hash(cfg), allow_mismatch=False)
    explicit = ckpt.decide_resume(os.path.join(root, "step_00000004"), root, 2, m_hash(reference_run), False)
    assert explicit.step == 4


def m_hash(run_dir):
    return config_hash(load_config(os.path.join(run_dir, "config.resolved.yaml")))


def test_tensorboard_scalars(reference_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(reference_run, "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/mm", "loss/vis", "lr/llm", "lr/new", "lr/llm_decay", "lr/new_no_decay",
                "model/logit_scale", "model/gate_mean", "model/gate_std", "optim/grad_norm",
                "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_frac", "memory/rank0_mb",
                "memory/rank1_mb", "data/bad_samples"}
    assert expected <= tags, expected - tags
    loss = acc.Scalars("loss/total")
    assert [e.step for e in loss] == list(range(1, STEPS + 1))
    ref = metrics_by_step(reference_run)
    assert [e.value for e in loss] == pytest.approx([ref[s]["loss/total"] for s in range(1, STEPS + 1)], rel=1e-6)
    lr = [e.value for e in acc.Scalars("lr/new")]
    assert lr[0] == pytest.approx(0.01) and lr[-1] < lr[1]  # warm-up 1 step, then cosine decay
    assert all(e.value > 50 for e in acc.Scalars("memory/rank1_mb"))  # RSS in MB of a real process
    assert acc.Scalars("data/bad_samples")[-1].value == 2  # each rank's loader counted 1 by step 6


def resume_on_one_rank(run_dir: str) -> dict:
    """Runs in a 1-rank job: resume the 2-rank checkpoint of step 6, compare with its fp32 weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    import deepspeed

    from notellm2.launcher.train.train import train
    from tests.helpers.doubles import components

    cfg = load_config(os.path.join(run_dir, "config.resolved.yaml"), [f"train.max_steps={STEPS}"])
    summary = train(cfg, factory=components)
    engine = summary["engine"]
    saved = get_fp32_state_dict_from_zero_checkpoint(ckpt.checkpoint_root(run_dir), tag="step_00000006")
    worst = 0.0
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(worst, (p.detach().float() - saved[name].float()).abs().max().item())
    opt_steps = [st["step"] for st in engine.optimizer.optimizer.state.values() if "step" in st]
    return {"worst": worst, "n": len(saved), "lr_epoch": engine.lr_scheduler.last_epoch,
            "opt_step": float(max(opt_steps)) if opt_steps else None}


def test_world_size_change_resumes_through_universal_checkpoint(reference_run):
    r = run_ranks("tests.launcher.train.test_engine:resume_on_one_rank", nproc=1, timeout=240,
                  kwargs={"run_dir": reference_run})
    ret = r.returns[0]
    assert "universal checkpoint" in r.output and "ds_to_universal" in r.output
    assert ret["n"] > 5 and ret["worst"] == 0.0, ret
    assert ret["lr_epoch"] == STEPS and ret["opt_step"] == STEPS, ret


def test_stuck_rank_ends_job_and_is_named(tmp_path):
    """Rank 1 hangs before step 2; rank 0 waits in step 2's first collective. A watchdog, not the gloo
    timeout behind it (1.5 x 8 + 10 = 22 s) nor the test's, ends the job after 8 s without progress (by the
    watchdog's own clock), naming rank 1, with the watchdog's exit code.

    Both ranks run a watchdog with the same limit, and the first to fire ends its rank. Rank 1's last
    progress (step 1's metrics) is older than rank 0's (step 2's forward), so its watchdog can fire first. Then rank 0 sees its peer's socket close ("a collective failed ... Connection closed by
    peer") before or while its own watchdog speaks. This happened once in the suite of 79b4adb. Either order
    is correct; what must never appear is gloo's own timeout."""
    r = train_double(str(tmp_path / "hang"), "train.max_steps=4", "train.collective_timeout_s=8",
                     env={faults.HANG_HOOK_ENV: "1:2"}, check=False, timeout=200)
    assert r.returncode != 0, r.describe()
    assert "[multirank] TIMEOUT" not in r.output
    check_stuck_rank_output(r.output, r.describe())


def check_stuck_rank_output(output: str, describe: str = "") -> None:
    """The assertions of the test above on a run's output (a function, so that both orders, recorded from
    real runs, are checked by the test below whichever order this machine happens to produce)."""
    found = re.findall(r"\[watchdog rank (\d)\] no training progress for (\d+)s \(train\.collective_timeout_s=8\) "
                       r"at step (\d) \(\w+\); rank\(s\) 1 stopped reporting", output)
    assert found, describe
    assert all(8 <= int(secs) < 22 for _, secs, _ in found), found  # before gloo's own timeout could speak
    assert "rank 1 at step 1" in output, describe
    failed = [line for line in output.splitlines() if "a collective failed" in line]
    # a rank may see its peer exit (the other watchdog fired first), never a gloo timeout
    assert all("Connection closed by peer" in line and "Timed out" not in line for line in failed), failed
    assert f"exitcode  : {WATCHDOG_EXIT_CODE}" in output, describe


_WD = ("[watchdog rank {r}] no training progress for {s}s (train.collective_timeout_s=8) at step {step} ({phase}); "
       "rank(s) 1 stopped reporting: behind (never reached the collective: stuck or dead): rank 1 at step 1 (metrics) "
       "[rank 0: step 2 forward, heartbeat 0s ago, rank 1: step 1 metrics, heartbeat 0s ago]; ending this rank with "
       "exit code 3")
_PEER = ("[rank 0] rank 0: a collective failed at step 2 (forward), most likely because of another rank: "
         "[gloo/transport/tcp/pair.cc:553] {why}")


def test_stuck_rank_check_accepts_either_watchdog_first_and_refuses_a_gloo_timeout():
    exit3 = f"  exitcode  : {WATCHDOG_EXIT_CODE} (pid: 1)"
    rank0_first = "\n".join([_WD.format(r=0, s=8, step=2, phase="forward"), exit3])
    rank1_first = "\n".join([_WD.format(r=1, s=8, step=1, phase="metrics"), _PEER.format(why="Connection closed by peer "
                             "[127.0.0.1]:8096."), _WD.format(r=0, s=8, step=2, phase="forward"), exit3])  # the suite of 79b4adb
    check_stuck_rank_output(rank0_first)
    check_stuck_rank_output(rank1_first)
    gloo_timeout = "\n".join([_PEER.format(why="Timed out waiting 22000ms for recv operation to complete"),
                              _WD.format(r=0, s=8, step=2, phase="forward"), exit3])
    with pytest.raises(AssertionError):
        check_stuck_rank_output(gloo_timeout)
    with pytest.raises(AssertionError):  # the peer's exit seen, but no watchdog spoke
        check_stuck_rank_output("\n".join([_PEER.format(why="Connection closed by peer"), exit3]))


def test_dead_rank_ends_job(tmp_path):
    r = train_double(str(tmp_path / "dead"), "train.max_steps=4", "train.collective_timeout_s=8",
                     env={faults.DIE_HOOK_ENV: "1:2"}, check=False, timeout=200)
    assert r.returncode != 0 and "[multirank] TIMEOUT" not in r.output, r.describe()
    # torchrun's failure report names the rank whose process died
    assert "rank      : 1" in r.output or "rank(s) 1" in r.output, r.describe()


def test_stop_request_checkpoints_and_exits_75_then_resumes(tmp_path, reference_run):
    """Slurm's warning (SIGUSR1) or a stop file: every rank stops after the same step, checkpoints,
    exits 75; the requeued run resumes exactly."""
    stop = tmp_path / "STOP"
    stop.write_text("")
    run_dir = str(tmp_path / "run")
    common = (f"train.max_steps={STEPS}", "checkpoint.every_steps=100")
    r = train_double(run_dir, *common, env={"NOTELLM2_STOP_FILE": str(stop)}, check=False)
    assert r.returncode != 0 and "exitcode  : 75" in r.output, r.describe()
    assert ckpt.latest_complete(ckpt.checkpoint_root(run_dir)).endswith("step_00000001")
    stop.unlink()
    r = train_double(run_dir, *common)
    assert "resumed step 1" in r.output
    ref, got = metrics_by_step(reference_run), metrics_by_step(run_dir)
    assert [got[s]["loss/total"] for s in range(1, STEPS + 1)] == [ref[s]["loss/total"] for s in range(1, STEPS + 1)]


def _launch_like_srun(args: list[str], nproc: int, env_extra: dict, timeout: float) -> list[tuple[int, str]]:
    """One plain process per rank with Slurm's variables (what `srun -n N` gives), no torchrun agent
    to end the others: the engine itself must notice a dead peer."""
    import subprocess
    import sys

    from tests.helpers.multirank import base_env, free_port
    from tests.helpers.paths import REPO

    port = str(free_port())
    procs = []
    for r in range(nproc):
        env = base_env({"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r), "SLURM_NTASKS": str(nproc),
                        "SLURM_JOB_ID": "4242", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **env_extra})
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            env.pop(key, None)
        procs.append(subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True))
    out = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            text, _ = p.communicate()
            text += "\n[test] TIMEOUT: killed\n"
        out.append((p.returncode, text))
    return out


def test_dead_rank_named_without_torchrun(tmp_path):
    """Rank 1 SIGKILLs itself at the start of step 2, with no agent to end rank 0: rank 0 learns of it
    from the broken connection in step 2's first collective (not by waiting out its 20 s watchdog) and
    names rank 1."""
    from tests.helpers.double_runs import double_args

    res = _launch_like_srun(double_args(str(tmp_path / "srun"), "train.max_steps=4", "train.collective_timeout_s=20"),
                            nproc=2, env_extra={faults.DIE_HOOK_ENV: "1:2"}, timeout=150)
    (rc0, out0), (rc1, _) = res
    assert rc1 == -9
    assert rc0 == 1 and "TIMEOUT" not in out0, out0[-3000:]
    assert re.search(r"rank 0: a collective failed at step 2 \(\w+\), most likely because of another rank", out0), \
        out0[-3000:]
    assert "rank(s) 1 stopped reporting" in out0, out0[-3000:]
    assert "[watchdog rank 0]" not in out0, out0[-3000:]


def accumulate(run_dir: str) -> dict:
    from notellm2.launcher.config import load_config
    from notellm2.launcher.train.train import train
    from tests.helpers.doubles import components

    cfg = load_config(None, [f"train.output_dir={run_dir}", "train.ds_config=ds_configs/cpu_zero3.json",
                             "train.precision=fp32", "data.pairs_per_rank=4", "train.grad_accum_steps=3",
                             "train.max_steps=2", "train.lr_schedule=constant"])
    engine = train(cfg, factory=components)["engine"]
    m = ckpt.read_manifest(ckpt.latest_complete(ckpt.checkpoint_root(run_dir)))
    return {"global_steps": engine.global_steps, "micro_steps": engine.micro_steps,
            "train_batch_size": engine.train_batch_size(), "reader_index": m["reader_states"][0]["index"],
            "samples_seen": m["samples_seen"]}


def test_gradient_accumulation_batches_from_the_yaml(tmp_path):
    r = run_ranks("tests.launcher.train.test_engine:accumulate", nproc=2, timeout=180, kwargs={"run_dir": str(tmp_path / "acc")})
    got = r.returns[0]
    # 2 optimizer steps of 3 micro-batches each; 4 pairs x 3 x 2 ranks per optimizer step
    assert got == {"global_steps": 2, "micro_steps": 6, "train_batch_size": 24, "reader_index": 6,
                   "samples_seen": 48}, got


def test_deepspeed_launcher_trains_like_torchrun(reference_run, tmp_path):
    """The same run started by DeepSpeed's own launcher (it sets RANK/WORLD_SIZE/MASTER_* like
    torchrun; --no_local_rank because our CLI reads LOCAL_RANK) gives the same per-step losses."""
    import subprocess
    import sys

    from tests.helpers.multirank import free_port
    from tests.helpers.paths import REPO
    from tests.helpers.double_runs import double_args

    run_dir = str(tmp_path / "ds-launcher")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", str(free_port()),
           *double_args(run_dir, f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=2")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "dist_world_size=2" in out and "on 2 rank(s)" in out
    ref, got = metrics_by_step(reference_run), metrics_by_step(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step]["loss/total"] == ref[step]["loss/total"], step
