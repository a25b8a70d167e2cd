"""The `notellm2` CLI: the verb table, --help, and a user's mistakes as one line + exit 2."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.multirank import REPO, base_env

NOTELLM2 = os.path.join(os.path.dirname(sys.executable), "notellm2")


def _table_paths(table=None, prefix=()):
    from notellm2.launcher.cli import VERBS

    for verb, target in (VERBS if table is None else table).items():
        if isinstance(target, dict):
            yield from _table_paths(target, (*prefix, verb))
        else:
            yield (*prefix, verb), target


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "notellm2.launcher", *args], capture_output=True, text=True, cwd=REPO,
                          env=base_env(), timeout=timeout)


def test_every_verb_module_is_named_like_its_verb_and_every_module_is_in_the_table():
    modules = {target for _, target in _table_paths()}
    for path, target in _table_paths():
        assert target == "notellm2.launcher.cli." + ".".join(p.replace("-", "_") for p in path), (path, target)
    on_disk = set()
    for folder, _, files in os.walk(os.path.join(REPO, "launcher", "cli")):
        package = "notellm2." + os.path.relpath(folder, REPO).replace(os.sep, ".")
        on_disk |= {f"{package}.{f[:-3]}" for f in files if f.endswith(".py") and f != "__init__.py"}
    assert on_disk == modules, f"modules in launcher/cli without a verb: {sorted(on_disk - modules)}"


def test_console_script_lists_every_verb():
    from notellm2.launcher.cli import VERBS

    out = subprocess.run([NOTELLM2, "--help"], capture_output=True, text=True, cwd=REPO, env=base_env())
    assert out.returncode == 0, out.stderr
    assert {"config", "data", "train", "export", "embed", "eval", "plan"} <= set(VERBS)
    for verb in VERBS:
        assert verb in out.stdout
    data = subprocess.run([NOTELLM2, "data", "--help"], capture_output=True, text=True, cwd=REPO, env=base_env())
    for sub in VERBS["data"]:
        assert sub in data.stdout


def test_every_verb_answers_help():
    for path, _ in _table_paths():
        out = _cli(*path, "--help")
        assert out.returncode == 0, f"{path}: {out.stderr}"
        assert "usage: notellm2 " + " ".join(path) in " ".join(out.stdout.split())


def test_no_verb_prints_help_and_fails():
    out = _cli()
    assert out.returncode == 2 and "<verb>" in out.stdout
    out = _cli("data")
    assert out.returncode == 2 and "<data-verb>" in out.stdout


def test_building_the_cli_imports_no_heavy_library():
    """`notellm2 --help` and the light verbs start in a fraction of a second: torch, pandas,
    deepspeed and transformers are imported only by the verbs that run them."""
    code = ("import sys; from notellm2.launcher.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'deepspeed', 'transformers', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=base_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported while building the CLI: {out.stdout.strip()}"


def test_embed_cli_offers_exactly_the_registered_probes():
    from notellm2.launcher.cli import build_parser
    from notellm2.modeling.names import PROBE_MODES

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    mode = next(a for a in sub.choices["embed"]._actions if a.dest == "mode")
    assert tuple(mode.choices) == PROBE_MODES


def _assert_one_line(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_eval_with_missing_embeddings_is_one_line_exit_2(tmp_path):
    import pandas as pd

    (tmp_path / "pairs").mkdir()  # valid pairs, so that the missing embeddings are what is reported
    pd.DataFrame({"query_id": ["a"], "target_id": ["b"], "score": [1.0], "split": ["test"]}).to_parquet(
        tmp_path / "pairs" / "pairs.parquet")
    pd.DataFrame({"note_id": ["a", "b", "c"], "split": ["test"] * 3}).to_parquet(tmp_path / "pairs" / "note_split.parquet")
    out = _cli("eval", "--embeddings", str(tmp_path / "missing"), "--pairs", str(tmp_path / "pairs"))
    _assert_one_line(out, "notellm2 eval:", str(tmp_path / "missing"))


def test_embed_with_a_folder_that_is_not_an_export_is_one_line_exit_2(tmp_path):
    (tmp_path / "not-an-export").mkdir()
    (tmp_path / "not-an-export" / "weights.bin").write_bytes(b"x")
    out = _cli("embed", "--model", str(tmp_path / "not-an-export"), "--out", str(tmp_path / "o"),
               "--shards", str(tmp_path / "s-*.tar"))
    _assert_one_line(out, "notellm2 embed:", "not-an-export", "notellm2_export.json")
    assert not (tmp_path / "o").exists()


def test_embed_with_a_broken_export_meta_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad-export"
    bad.mkdir()
    (bad / "notellm2_export.json").write_text(json.dumps({"format": 1, "model": {"variant": "nope"}, "loss": {}}))
    out = _cli("embed", "--model", str(bad), "--out", str(tmp_path / "o"), "--shards", "x.tar")
    _assert_one_line(out, "notellm2 embed:", "model.variant", "nope")


def test_embed_without_model_or_config_is_one_line_exit_2(tmp_path):
    _assert_one_line(_cli("embed", "--out", str(tmp_path / "o")), "notellm2 embed:", "--model")


def test_config_error_is_one_line_exit_2():
    _assert_one_line(_cli("config", "model.variant=nope"), "notellm2 config:", "model.variant", "notellm2")


def test_export_of_a_run_without_checkpoints_is_one_line_exit_2(tmp_path):
    _assert_one_line(_cli("export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "e")),
                     "notellm2 export:", "no complete checkpoint")


def test_data_error_is_one_line_exit_2(tmp_path):
    views = tmp_path / "v.csv"
    views.write_text("user,note_id,timestamp\nu,a,1\n")
    _assert_one_line(_cli("data", "mine-pairs", "--views", str(views), "--out", str(tmp_path / "o"), "--quiet"),
                     "notellm2 data mine-pairs:", "v.csv", "user_id")


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """Only the user's mistakes are shortened: any other exception propagates."""
    import notellm2.launcher.cli.config as verb
    from notellm2.launcher.cli import main

    def boom(args):
        raise KeyError("internal")

    monkeypatch.setattr(verb, "_run", boom)
    with pytest.raises(KeyError):
        main(["config"])


def test_user_error_types_cover_the_data_errors_once_imported():
    from notellm2.data_shards.catalog.notes import CatalogError
    from notellm2.data_shards.mining.mine import MiningError
    from notellm2.data_shards.writing.shards import ShardWriteError
    from notellm2.launcher.config import ConfigError
    from notellm2.errors import user_error_types
    from notellm2.launcher.plan import PlanError
    from notellm2.modeling.pretrained import ExportError

    types = user_error_types()
    for cls in (CatalogError, MiningError, ShardWriteError, ConfigError, PlanError, ExportError, FileNotFoundError):
        assert issubclass(cls, types), cls
    assert not issubclass(KeyError, types) and not issubclass(RuntimeError, types)
