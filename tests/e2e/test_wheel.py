"""The built wheel is a working install on its own (docs/install.md).

Builds the wheel from this checkout, installs it with its core dependencies into a fresh virtual
environment (torch first and pinned, as the docs say; pip takes the packages from its cache or the
local wheel folder), then, from a folder outside the checkout and with no PYTHONPATH:

* `notellm2 --version` and `notellm2 --help` run the installed console script;
* the imported package is the installed one: `notellm2.__file__` lies in that environment's
  site-packages, not in the checkout (otherwise this test could pass on the editable install);
* the shipped files resolve through the package: `configs/tiny_cpu.yaml` and `ds_configs/cpu_zero3.json`
  (named relative, as in the docs) and the vision plugins;
* a tiny 2-rank training run finishes (the tiny models and shards are built beforehand by the test
  helpers; nothing downloaded);
* `NoteEncoder` imports without the launcher or DeepSpeed.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO
from tests.helpers.real_inputs import tiny_cpu_overrides

pytestmark = pytest.mark.slow


def _run(cmd, cwd, env, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} -> {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), REPO],
         cwd=str(root), env=env)
    wheels = glob.glob(str(dist / "notellm2-*.whl"))
    assert len(wheels) == 1, wheels
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=str(root), env=env)
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], cwd=str(root), env=env)
    _run([py, "-m", "pip", "install", "-q", wheels[0]], cwd=str(root), env=env)
    outside = root / "work"
    outside.mkdir()
    return {"py": py, "bin": str(venv / "bin"), "env": env, "cwd": str(outside), "root": root}


def test_the_console_script_is_the_installed_package(installed):
    env, cwd = installed["env"], installed["cwd"]
    version = _run([os.path.join(installed["bin"], "notellm2"), "--version"], cwd, env)
    assert "notellm2 " in version and REPO not in version
    assert "train" in _run([os.path.join(installed["bin"], "notellm2"), "--help"], cwd, env)
    code = ("import json, sys, sysconfig, notellm2, notellm2.launcher.cli as cli\n"
            "from notellm2 import find_shipped\n"
            "print(json.dumps({'file': notellm2.__file__, 'cli': cli.__file__, 'site': sysconfig.get_paths()['purelib'],\n"
            "  'ds': find_shipped('ds_configs/cpu_zero3.json'), 'cfg': find_shipped('configs/tiny_cpu.yaml'),\n"
            "  'arch': find_shipped('configs/arch/qwen2-7b')}))")
    info = json.loads(_run([installed["py"], "-c", code], cwd, env).strip().splitlines()[-1])
    site = os.path.realpath(info["site"])
    for key in ("file", "cli", "ds", "cfg", "arch"):
        path = os.path.realpath(info[key])
        assert path.startswith(site + os.sep), (key, path, site)
        assert not path.startswith(os.path.realpath(REPO) + os.sep), (key, path)
        assert os.path.exists(path), (key, path)


def test_the_serving_encoder_imports_without_launcher_or_deepspeed(installed):
    code = ("import sys\nfrom notellm2.modeling.pretrained import NoteEncoder\n"
            "import notellm2.modeling.plugins.efficientnet_lite\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed' or m.startswith('notellm2.launcher')))")
    assert _run([installed["py"], "-c", code], installed["cwd"], installed["env"]).strip().splitlines()[-1] == "[]"


def test_a_tiny_training_run_from_outside_the_checkout(installed):
    overrides = tiny_cpu_overrides(str(installed["root"] / "inputs"))  # built by this checkout's helpers
    run_dir = os.path.join(installed["cwd"], "run")
    cmd = [os.path.join(installed["bin"], "torchrun"), "--standalone", "--nproc-per-node", "2",
           os.path.join(installed["bin"], "notellm2"), "train", "--config", "configs/tiny_cpu.yaml", *overrides,
           f"train.output_dir={run_dir}", "train.max_steps=2", "checkpoint.every_steps=2"]
    _run(cmd, installed["cwd"], installed["env"], timeout=600)
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        steps = [json.loads(line)["step"] for line in fh]
    assert steps == [1, 2]
