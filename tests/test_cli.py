"""The `notellm2` CLI: every verb module is listed by --help and answers its own --help."""
import os
import pkgutil
import subprocess
import sys

import launcher.commands
from tests.multirank import REPO

NOTELLM2 = os.path.join(os.path.dirname(sys.executable), "notellm2")


def _verbs():
    from launcher.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


def test_console_script_lists_every_verb():
    out = subprocess.run([NOTELLM2, "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    verbs = _verbs()
    assert {"config", "data", "eval"} <= set(verbs)
    for verb in verbs:
        assert verb in out.stdout
    modules = [m.name for m in pkgutil.iter_modules(launcher.commands.__path__)]
    assert len(verbs) >= len(modules) - 1  # every module contributes (config_cmd -> "config")


def test_every_verb_answers_help():
    for verb in _verbs():
        out = subprocess.run([sys.executable, "-m", "launcher", verb, "--help"], capture_output=True, text=True, cwd=REPO)
        assert out.returncode == 0, f"{verb}: {out.stderr}"
        assert "usage: notellm2 " + verb in out.stdout.replace("\n", " ")


def test_no_verb_prints_help_and_fails():
    out = subprocess.run([sys.executable, "-m", "launcher"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "<verb>" in out.stdout


def test_building_the_cli_imports_no_heavy_library():
    """`notellm2 --help` and the light verbs start in a fraction of a second: torch, pandas,
    deepspeed and transformers are imported only by the verbs that run them."""
    code = ("import sys; from launcher.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'pandas', 'deepspeed', 'transformers', 'duckdb') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported while building the CLI: {out.stdout.strip()}"


def test_embed_cli_offers_exactly_the_model_probes():
    from launcher.commands.embed import MODES as cli_modes
    from modeling.prompts import MODES

    assert cli_modes == MODES
