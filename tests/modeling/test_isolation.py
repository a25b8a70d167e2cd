"""modeling/ is a plain library: importing it pulls in no deepspeed, webdataset or launcher."""
import ast
import json
import os
import subprocess
import sys

from tests.helpers.paths import REPO

MODULES = ["modeling", "modeling.config", "modeling.backbone", "modeling.vision", "modeling.connector",
           "modeling.prompts", "modeling.fusion", "modeling.loss", "modeling.encoder",
           "modeling.plugins.efficientnet_lite"]
FORBIDDEN = ("deepspeed", "launcher", "webdataset")


def test_importing_modeling_loads_no_forbidden_package():
    code = ("import importlib, json, sys\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            f"print(json.dumps(sorted({{k.split('.')[0] for k in sys.modules}} & set({FORBIDDEN!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_no_forbidden_import_statement_in_modeling_sources():
    offenders = []
    for root, _, files in os.walk(os.path.join(REPO, "modeling")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            tree = ast.parse(open(path).read(), path)
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
