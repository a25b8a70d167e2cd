"""No code from data files, portable exports (format 2), damaged files refused in one line (issue #27,
items 4-5; docs/training.md "What is safe to load").

The fast tests use an untrained tiny export written by the exporter itself; the slow ones share one real
1-rank ZeRO-3 run of the tiny config (a tiny Llama and a tiny Hugging Face CLIP tower, 2 steps) and its
export. The moved-export test deletes that run's inputs, so it is the module's last test."""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from notellm2.codenames import is_builtin_plugin
from notellm2.files import follow_umask, sha256_file, tree_files
from notellm2.launcher.train import checkpoint as ckpt
from notellm2.modeling.pretrained import EXPORT_META, ExportError, NoteEncoder, export_fingerprint
from tests.helpers.models import make_tiny_clip_dir
from tests.helpers.multirank import REPO, base_env, run_command
from tests.helpers.real_inputs import TINY_CPU, tiny_cpu_overrides
from tests.helpers.tamper import reseal_checkpoint, reseal_export

GAP = 1e-5  # same device and dtype


def _cli(*argv: str) -> tuple[int, str]:
    """`notellm2 ...` in this process: (exit code, stderr). Anything but a user's error propagates: a test
    that gets an exception here has found a traceback."""
    from notellm2.launcher.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(list(argv))
    return rc, err.getvalue()


def _one_line(stderr: str, *needles: str) -> str:
    line = stderr.strip()
    assert line.count("\n") == 0 and "Traceback" not in line, stderr
    for needle in needles:
        assert needle in line, (needle, line)
    return line


class Payload:
    """Pickles as a call that writes `marker`: what a crafted pickle runs when unpickled without limits."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def _fresh(code: str, env_extra: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                          env=base_env(env_extra), timeout=timeout)


# ----------------------------------------------------------------------------- fast: files, seals, modes

def test_builtin_plugins_need_no_trust_and_others_do():
    assert is_builtin_plugin("notellm2.modeling.plugins.efficientnet_lite:build")
    assert is_builtin_plugin("modeling.plugins.efficientnet_lite:build")  # the spelling of format 1
    for spec in ("sys:exit", "os:system", "evil_plugin:build", "notellm2.modeling.vision:build_vision_tower",
                 "notellm2.modeling.plugins.efficientnet_lite:_private", "notellm2.modeling.plugins.x.y:build z",
                 "notellm2.modeling.pluginsx:build", "", None, "a:b:c"):
        assert not is_builtin_plugin(spec), spec


def test_files_follow_the_umask(tmp_path):
    folder = tmp_path / "out"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "sub/b.json"):
        (folder / name).write_text("x")
        os.chmod(folder / name, 0o600)  # what safetensors 0.8 writes
    old = os.umask(0o027)
    try:
        follow_umask(str(folder))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder / "a.safetensors").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(folder / "sub" / "b.json").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(folder / "sub").st_mode) == 0o750


def test_a_crafted_legacy_rank_file_is_refused_and_a_plain_one_restores_the_generators(tmp_path):
    """Rank files before checkpoint format 2 were pickles: they open with weights_only=True and numpy's
    array types only; a payload in one is refused naming the file, and its marker never appears."""
    import random as pyrandom

    good = tmp_path / "good"
    good.mkdir()
    pyrandom.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = {"python": pyrandom.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save({"rank": 0, "rng": state, "reader": {"epoch": 4}}, str(good / "rank00000.pt"))
    want = (pyrandom.random(), np.random.rand(), torch.rand(1).item())
    ckpt.check_files(str(good), None)
    loaded = ckpt.read_rank_file(str(good), 0)
    ckpt.set_rng_state(loaded["rng"])
    assert (pyrandom.random(), np.random.rand(), torch.rand(1).item()) == want and loaded["reader"] == {"epoch": 4}

    bad = tmp_path / "bad"
    bad.mkdir()
    marker = str(tmp_path / "marker")
    torch.save({"rank": 0, "rng": state, "reader": Payload(marker)}, str(bad / "rank00000.pt"))
    for step in (lambda: ckpt.check_files(str(bad), None), lambda: ckpt.read_rank_file(str(bad), 0)):
        with pytest.raises(ckpt.CheckpointError, match=r"rank00000\.pt: needs builtins\.exec"):
            step()
    assert not os.path.exists(marker)


def test_the_rng_state_survives_json():
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    np.random.randn()  # numpy's cached gaussian is part of its state
    saved = json.loads(json.dumps(ckpt.rng_state()))
    want = (random.random(), np.random.randn(), torch.rand(2).tolist())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    ckpt.set_rng_state(saved)
    assert (random.random(), np.random.randn(), torch.rand(2).tolist()) == want


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from tests.launcher.eval.test_serving import tiny_export as write

    return write(tmp_path_factory.mktemp("trust-export"))


def test_format2_layout_hashes_fingerprint_and_modes(tiny_export):
    with open(os.path.join(tiny_export, EXPORT_META)) as fh:
        meta = json.load(fh)
    assert meta["format"] == 2 and meta["adapters"] == {} and meta["trust"]["needs_trust_code"] is False
    assert meta["vision"]["path"] == "tower" and meta["model"]["vision"]["path"] == "tower"
    assert set(meta["vision"]["files"]) == {"config.json", "model.safetensors"}
    assert set(meta["files"]) == set(tree_files(tiny_export, exclude=(EXPORT_META,)))
    assert all(sha256_file(os.path.join(tiny_export, n)) == h for n, h in meta["files"].items())
    assert meta["fingerprint"] == export_fingerprint(meta) and len(meta["vision"]["tower_key"]) == 64
    mask = os.umask(0o022)
    os.umask(mask)
    for name in [EXPORT_META, *meta["files"]]:
        assert stat.S_IMODE(os.stat(os.path.join(tiny_export, name)).st_mode) == 0o666 & ~mask, name
    # the fingerprint moves with what decides the vectors, and not with where things are
    changed = json.loads(json.dumps(meta))
    changed["prompt"]["max_text_tokens"] += 1
    assert export_fingerprint(changed) != meta["fingerprint"]
    changed = json.loads(json.dumps(meta))
    changed["vision"]["files"]["model.safetensors"] = "0" * 64
    assert export_fingerprint(changed) != meta["fingerprint"]
    changed = json.loads(json.dumps(meta))
    changed["model"]["llm"]["path"], changed["source"] = "/elsewhere", {}
    assert export_fingerprint(changed) == meta["fingerprint"]
    enc = NoteEncoder.from_pretrained(tiny_export)
    assert enc.fingerprint == meta["fingerprint"]


def test_adapters_this_version_does_not_know_are_refused(tiny_export, tmp_path):
    copy = str(tmp_path / "with-adapters")
    shutil.copytree(tiny_export, copy)
    reseal_export(copy, lambda m: m["adapters"].update(lora={"path": "adapters/lora"}))
    with pytest.raises(ExportError, match=r"holds adapters \(lora\)"):
        NoteEncoder.from_pretrained(copy)


def test_a_tower_kept_by_relative_path_moves_with_its_export_or_is_given(tiny_export, tmp_path):
    """`--tower relative`: the export names its tower by a path relative to itself. Moved together, they
    load; moved apart, the load says to give --tower-path; a tower given that is not the one the export
    was written with is refused."""
    from notellm2.launcher.config import config_from_dict
    from notellm2.launcher.export import write_export
    from safetensors.torch import load_file

    with open(os.path.join(tiny_export, EXPORT_META)) as fh:
        meta = json.load(fh)
    home = tmp_path / "home"
    clip = shutil.copytree(os.path.join(tiny_export, "tower"), str(home / "towers" / "clip"))
    cfg = config_from_dict({"model": dict(meta["model"], vision=dict(meta["model"]["vision"], path=clip)),
                            "loss": meta["loss"]})
    out = str(home / "exports" / "enc")
    write_export(load_file(os.path.join(tiny_export, "model.safetensors")), cfg, out, {"step": 0}, tower="relative")
    with open(os.path.join(out, EXPORT_META)) as fh:
        assert json.load(fh)["vision"]["path"] == "../../towers/clip"
    assert not os.path.exists(os.path.join(out, "tower"))

    moved = tmp_path / "server"
    shutil.move(str(home), str(moved))  # together: the relative path still holds
    enc = NoteEncoder.from_pretrained(str(moved / "exports" / "enc"))
    assert max(enc.reference_gap().values()) <= GAP

    alone = str(tmp_path / "alone")
    shutil.move(str(moved / "exports" / "enc"), alone)  # apart: the tower must be given
    with pytest.raises(ExportError, match="--tower-path") as e:
        NoteEncoder.from_pretrained(alone)
    assert "\n" not in str(e.value)
    given = NoteEncoder.from_pretrained(alone, tower_path=str(moved / "towers" / "clip"))
    assert max(given.reference_gap().values()) <= GAP
    other = make_tiny_clip_dir(str(tmp_path / "other"), hidden=32, layers=1, seed=1)
    with pytest.raises(ExportError, match="not the tower this export was trained with"):
        NoteEncoder.from_pretrained(alone, tower_path=other)


def test_a_crafted_factory_in_an_export_is_refused_and_its_code_never_runs(tiny_export, tmp_path):
    """An export whose JSON names a factory outside notellm2 (a module that writes a marker when imported,
    or `sys:exit`) is refused by NoteEncoder.from_pretrained and by `notellm2 embed` without the trust
    option; the marker does not appear. With trust_code=True the same export does import it and its
    factory exits the process (the payload is live: the refusal is what kept it out)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    marker = str(tmp_path / "factory-ran")
    (plugins / "evil_tower_plugin.py").write_text(
        f"open({marker!r}, 'w').write('imported')\n\ndef build(cfg=None):\n    raise SystemExit(3)\n")
    sys.path.insert(0, str(plugins))
    try:
        for factory in ("evil_tower_plugin:build", "sys:exit"):
            crafted = str(tmp_path / f"crafted-{factory.split(':')[0]}")
            shutil.copytree(tiny_export, crafted)

            def name_factory(meta, factory=factory):
                meta["model"]["vision"].update(kind="plugin", factory=factory, path="")
                meta["vision"].update(kind="plugin", factory=factory, path="", files={})
                meta["trust"]["needs_trust_code"] = False  # a crafted export claims what it likes

            reseal_export(crafted, name_factory)
            try:
                NoteEncoder.from_pretrained(crafted)
            except Exception as e:  # noqa: BLE001 - a SystemExit would not be caught here, and fail the test
                assert isinstance(e, ExportError) and factory in str(e) and "--trust-code" in str(e), repr(e)
            else:
                pytest.fail(f"{factory}: loaded without trust_code")
        (tmp_path / "shards").mkdir()
        (tmp_path / "shards" / "notes-test-000000.tar").write_bytes(b"")  # never read: the model is refused first
        rc, err = _cli("embed", "--model", str(tmp_path / "crafted-evil_tower_plugin"), "--out", str(tmp_path / "out"),
                       "--shards", str(tmp_path / "shards" / "notes-test-*.tar"))
        assert rc == 2, err
        _one_line(err, "notellm2 embed:", "evil_tower_plugin:build", "--trust-code")
        assert not os.path.exists(tmp_path / "out")
        assert "evil_tower_plugin" not in sys.modules and not os.path.exists(marker)
        with pytest.raises(SystemExit):  # trusted, the module is imported (the marker) and its build runs
            NoteEncoder.from_pretrained(str(tmp_path / "crafted-evil_tower_plugin"), trust_code=True)
        assert os.path.exists(marker)
    finally:
        sys.path.remove(str(plugins))
        sys.modules.pop("evil_tower_plugin", None)


def test_export_asks_for_trust_before_importing_a_factory_a_run_folder_names(tmp_path):
    """`notellm2 export` reads the config stored in the run folder's manifest: a plugin factory from outside
    notellm2 there is refused without --trust-code, before any checkpoint file is opened."""
    from notellm2.files import atomic_write_json, seal_json
    from notellm2.launcher.cli.export import TOWER_MODES
    from notellm2.launcher.config import config_to_dict, load_config
    from notellm2.launcher.export import TOWER_MODES as LIBRARY_TOWER_MODES

    assert TOWER_MODES == LIBRARY_TOWER_MODES  # the CLI's torch-free mirror
    cfg = load_config(TINY_CPU, ["model.vision.kind=plugin", "model.vision.factory=evil_tower_plugin:build"])
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    atomic_write_json(str(step / ckpt.MANIFEST), seal_json({"format": ckpt.FORMAT, "step": 1, "world_size": 1,
                                                            "config": config_to_dict(cfg), "files": {}}))
    rc, err = _cli("export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "exp"))
    assert rc == 2
    _one_line(err, "notellm2 export:", "manifest.json", "evil_tower_plugin:build", "--trust-code")
    assert not os.path.exists(tmp_path / "exp")


# ----------------------------------------------------------------------------- slow: a real run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 1-rank ZeRO-3 run of configs/tiny_cpu.yaml (tiny Llama, tiny Hugging Face CLIP), 2 steps,
    a checkpoint at step 2, and its export."""
    from notellm2.launcher.export import export

    root = tmp_path_factory.mktemp("trust-run")
    inputs = str(root / "inputs")
    run = str(root / "run")
    run_command(["-m", "notellm2.launcher", "train", "--config", TINY_CPU, *tiny_cpu_overrides(inputs),
                 f"train.output_dir={run}", "train.max_steps=2", "checkpoint.every_steps=2"], nproc=1, timeout=600)
    out = str(root / "export")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(run, out)
    return {"root": root, "inputs": inputs, "run": run, "export": out, "deleted": False,
            "checkpoint": os.path.join(run, "checkpoints", "step_00000002")}


def _use(run: dict) -> dict:
    assert not run["deleted"], "the moved-export test deleted this run's inputs: it must stay the module's last test"
    return run


def _copy_run(run: dict, dest: str) -> str:
    shutil.copytree(run["run"], dest)
    return dest


@pytest.mark.slow
def test_a_crafted_pickle_in_a_run_folder_is_refused_on_export_and_on_resume(tiny_run, tmp_path):
    """A DeepSpeed file of a copied run folder carries a payload, and the manifest's hashes were listed
    again (as an attacker would): `notellm2 export` and a resuming `notellm2 train` refuse it in one
    line naming the file and the type it needs, before DeepSpeed unpickles it; the marker never
    appears. Unpickled without limits, the same file does write the marker."""
    run = _use(tiny_run)
    evil = _copy_run(run, str(tmp_path / "run"))
    step = os.path.join(evil, "checkpoints", "step_00000002")
    target = os.path.join(step, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    marker = str(tmp_path / "pickle-ran")
    states = torch.load(target, weights_only=False)  # our own file, made by the fixture
    states["extra"] = Payload(marker)
    torch.save(states, target)
    reseal_checkpoint(step)

    rc, err = _cli("export", "--run-dir", evil, "--out", str(tmp_path / "exp"))
    assert rc == 2, err
    _one_line(err, "notellm2 export:", "zero_pp_rank_0_mp_rank_00_model_states.pt", "builtins.exec")
    assert not os.path.exists(tmp_path / "exp") and not os.path.exists(marker)

    res = run_command(["-m", "notellm2.launcher", "train", "--config", os.path.join(run["run"], "config.resolved.yaml"),
                       f"train.output_dir={evil}", "train.max_steps=4", "checkpoint.resume=auto"], nproc=1,
                      timeout=300, check=False)
    assert res.returncode != 0, res.describe()
    rank0 = res.rank_logs[0]
    assert "Traceback" not in rank0, res.describe()
    _one_line(next(line for line in rank0.splitlines() if "notellm2 train:" in line),
              "zero_pp_rank_0_mp_rank_00_model_states.pt", "builtins.exec")
    assert not os.path.exists(marker), "the payload ran during the resume"
    assert not os.path.exists(os.path.join(evil, "checkpoints", "step_00000004"))

    control = _fresh(f"import torch; torch.load({target!r}, weights_only=False)")
    assert control.returncode == 0 and os.path.exists(marker), control.stderr[-2000:]


def _damaged(data: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """Seeded damages of a file: one flipped byte, a cut at a random length, emptied."""
    flipped = bytearray(data)
    if flipped:
        at = rng.randrange(len(flipped))
        flipped[at] ^= 1 << rng.randrange(8)
    cut = data[:rng.randrange(len(data))] if data else data
    return [("flip", bytes(flipped)), ("cut", cut), ("empty", b"")]


def _fresh_dir(path) -> str:
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def _damaged_copies(folder: str, rng: random.Random, make_copy):
    """(file name, damage, copy root) for each file under `folder` and each of its seeded damages:
    `make_copy(damage)` gives a fresh (copy root, the copy of `folder` in it), and the damaged bytes
    replace that file there."""
    for name in tree_files(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            data = fh.read()
        for kind, damaged in _damaged(data, rng):
            root, inner = make_copy(kind)
            with open(os.path.join(inner, name), "wb") as fh:
                fh.write(damaged)
            yield name, kind, root


@pytest.mark.slow
def test_damaged_checkpoint_and_export_files_give_the_same_output_or_a_one_line_refusal(tiny_run, tmp_path):
    """Seeded corruption pass over every file of the run's checkpoint (through `notellm2 export`) and of its
    export (through NoteEncoder.from_pretrained): each damaged copy exports/loads to the intact output, or
    is refused in one line naming the damaged file. Never a traceback (anything but a user's error
    propagates and fails the test)."""
    run = _use(tiny_run)
    rng = random.Random(27)
    intact = sha256_file(os.path.join(run["export"], "model.safetensors"))
    outcomes = {"same": 0, "refused": 0}

    def run_copy(kind):
        copy = _fresh_dir(tmp_path / f"run-{kind}")
        _copy_run(run, copy)
        return copy, os.path.join(copy, "checkpoints", "step_00000002")

    for name, kind, copy in _damaged_copies(run["checkpoint"], rng, run_copy):
        out = _fresh_dir(tmp_path / f"exp-{kind}")
        rc, err = _cli("export", "--run-dir", copy, "--out", out)
        if rc == 0:
            assert sha256_file(os.path.join(out, "model.safetensors")) == intact, (name, kind)
            outcomes["same"] += 1
        else:
            assert rc == 2 and not os.path.exists(out), (name, kind, err)
            _one_line(err, "notellm2 export:", name)
            outcomes["refused"] += 1

    def export_copy(kind):
        copy = _fresh_dir(tmp_path / f"export-{kind}")
        shutil.copytree(run["export"], copy)
        return copy, copy

    for name, kind, copy in _damaged_copies(run["export"], rng, export_copy):
        try:
            gaps = NoteEncoder.from_pretrained(copy).reference_gap()
        except ExportError as e:
            assert "\n" not in str(e) and name in str(e), (name, kind, str(e))
            outcomes["refused"] += 1
        else:
            assert max(gaps.values()) <= GAP, (name, kind, gaps)
            outcomes["same"] += 1
    files = len(tree_files(run["checkpoint"])) + len(tree_files(run["export"]))
    assert sum(outcomes.values()) == 3 * files, outcomes  # every damaged copy was tried (all refused, as measured)


@pytest.mark.slow
def test_zz_a_moved_export_loads_without_its_tower_and_inputs(tiny_run, tmp_path):
    """The export of a run whose tower is a Hugging Face folder is moved; the tower folder, the training
    inputs and the run are deleted; in a fresh interpreter it loads (no DeepSpeed) and gives its stored
    reference vectors. (Named zz: it deletes the inputs the module's other slow tests use.)"""
    run = _use(tiny_run)
    with open(os.path.join(run["export"], EXPORT_META)) as fh:
        tower = json.load(fh)["vision"]["source_path"]
    assert tower.startswith(run["inputs"]) and os.path.isdir(tower)
    moved = str(tmp_path / "elsewhere" / "encoder")
    shutil.move(run["export"], moved)
    run["deleted"] = True
    for gone in (tower, run["inputs"], run["run"]):
        shutil.rmtree(gone, ignore_errors=True)
        assert not os.path.exists(gone)
    out = _fresh(f"""
        import json, sys
        from notellm2.modeling.pretrained import NoteEncoder
        enc = NoteEncoder.from_pretrained({moved!r})
        print(json.dumps({{"gaps": enc.reference_gap(), "tower": enc.config.model.vision.path,
                           "heavy": sorted(m for m in sys.modules if m.split(".")[0] == "deepspeed")}}))
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tower"] == os.path.join(moved, "tower") and got["heavy"] == []
    assert set(got["gaps"]) == {"both", "text", "image"} and max(got["gaps"].values()) <= GAP, got["gaps"]
