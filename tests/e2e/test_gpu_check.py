"""scripts/gpu_check.sh (the first GPU run) on a CPU machine: only its argument handling and plan.
The GPU work itself runs on the lent GPU (docs/training.md, "First GPU run")."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
CONFIGS = ("zero3-bf16-sdpa", "zero2-bf16-sdpa", "zero3-bf16-lora", "zero3-bf16-fa2")
OFFLOAD = "zero3-offload-bf16-sdpa"


def gpu_check(*args: str, env: dict | None = None, cwd: str = REPO) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ALLOW_CPU"}
    full_env["PYTHON"] = sys.executable
    full_env.update(env or {})
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120, env=full_env, cwd=cwd)


def test_help_names_every_configuration_and_option():
    r = gpu_check("--help")
    assert r.returncode == 0, r.stderr
    for word in (*CONFIGS, OFFLOAD, "--out", "--wheels", "--offload", "--dry-run", "GPU_CHECK_ALLOW_CPU"):
        assert word in r.stdout, word


def test_dry_run_prints_the_plan_of_every_configuration(tmp_path):
    out = tmp_path / "logs"
    r = gpu_check("--dry-run", "--out", str(out), "--wheels", str(tmp_path / "whl"))
    assert r.returncode == 0, r.stdout + r.stderr
    plan = r.stdout
    for name in CONFIGS:
        assert f"{name}:" in plan, name
    assert OFFLOAD + ":" not in plan and "ds_configs/zero3_offload.json" not in plan  # only with --offload
    lines = plan.splitlines()
    train = [line for line in lines if "-m notellm2.launcher train" in line]
    # zero3, zero2 and LoRA train 6 then resume to 10; flash trains 10
    assert len(train) == 7, train
    assert all("--nproc-per-node 1" in line and "train.precision=bf16" in line for line in train)
    assert sum("train.max_steps=6" in line for line in train) == 3
    assert sum("ds_configs/zero3_bf16.json" in line for line in train) == 5
    assert sum("ds_configs/zero2_bf16.json" in line for line in train) == 2
    assert sum("attn_implementation=flash_attention_2" in line for line in train) == 1
    lora = [line for line in train if "model.llm.lora.enabled=true" in line]
    assert len(lora) == 2 and all("model.llm.lora.dropout=0.1 train.chunk_pairs=2" in line for line in lora), lora
    assert sum("-m notellm2.launcher export" in line for line in lines) == 4
    assert sum("-m notellm2.launcher embed" in line for line in lines) == 3
    assert f"--target /tmp/site {tmp_path / 'whl'}/*.whl" in plan  # the carried wheels, installed offline
    assert "--no-index --no-deps" in plan
    assert not out.exists()  # a dry run writes nothing

    r = gpu_check("--dry-run", "--offload")
    assert r.returncode == 0
    names = [line[:-1] for line in r.stdout.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert names[-1] == OFFLOAD and "ds_configs/zero3_offload.json" in r.stdout  # offload runs last


@pytest.mark.parametrize("args,message", [(["--bogus"], "unknown argument '--bogus'"),
                                          (["--out"], "--out needs a folder"),
                                          (["--wheels", "--dry-run"], "--wheels needs a folder")])
def test_bad_arguments_exit_2_with_a_message(args, message):
    r = gpu_check(*args)
    assert r.returncode == 2
    assert message in r.stderr and "--help" in r.stderr
    assert r.stdout == ""


def test_refuses_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "logs"
    r = gpu_check("--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr
    assert "refused: no CUDA device" in r.stderr and "--dry-run" in r.stderr
    assert not out.exists()  # nothing was started


WHEELS_SCRIPT = os.path.join(REPO, "scripts", "gpu_wheels.sh")


def test_gpu_wheels_pins_what_requirements_pin():
    """The GPU gets the versions CI runs: a bump in requirements.txt without one here fails."""
    import re

    with open(os.path.join(REPO, "requirements.txt")) as fh:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", fh.read(), flags=re.M))
    with open(WHEELS_SCRIPT) as fh:
        script = fh.read()
    for name in ("transformers", "webdataset", "deepspeed", "peft"):
        assert f"{name}=={pins[name]}" in script, name
    with open(SCRIPT) as fh:
        assert f'transformers.__version__ != "{pins["transformers"]}"' in fh.read()


def test_gpu_wheels_arguments():
    r = subprocess.run(["bash", WHEELS_SCRIPT, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--wheels DIR" in r.stdout
    r = subprocess.run(["bash", WHEELS_SCRIPT, "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr
