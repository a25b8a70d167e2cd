"""The walls of the house (docs/layout.md): what each package may import, checked two ways.

* Statically: every import statement of every source file of `modeling/` and `data_shards/` (and of
  the import root `notellm2/`) is parsed; a forbidden module is an offence.
* Dynamically: every module of the package is imported in a fresh interpreter, and what is then in
  `sys.modules` is checked, so an import made by a third party on our behalf is caught too.

And no file of the project spells a module the old way (`from launcher.x import`, `import modeling`):
in a checkout those would import a second copy of the module beside `notellm2.*`.
"""
import ast
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

# package folder -> module prefixes it must not import
WALLS = {
    "notellm2": ("notellm2.launcher", "notellm2.modeling", "notellm2.data_shards"),
    "modeling": ("deepspeed", "webdataset", "notellm2.launcher"),
    "data_shards": ("deepspeed", "notellm2.launcher", "notellm2.modeling"),
}
# What importing a package's modules may not load (the import root's compat module imports deepspeed,
# torch and transformers inside its functions only, so that `notellm2.modeling` can use it).
LOADED = {**WALLS, "notellm2": WALLS["notellm2"] + ("deepspeed", "torch", "transformers", "webdataset")}
OLD_ROOTS = ("launcher", "modeling", "data_shards")


def _forbidden(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _sources(folder: str):
    for root, _, files in os.walk(os.path.join(REPO, folder)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    rel = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
    return rel if rel.startswith("notellm2") else "notellm2." + rel


def _imports(path: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for a in node.names:  # `from notellm2 import launcher`
                yield node.lineno, f"{node.module}.{a.name}"


@pytest.mark.parametrize("folder", sorted(WALLS))
def test_no_import_statement_crosses_a_wall(folder):
    offenders = [f"{os.path.relpath(p, REPO)}:{line} imports {name}" for p in _sources(folder)
                 for line, name in _imports(p) if _forbidden(name, WALLS[folder])]
    assert offenders == []


@pytest.mark.parametrize("folder", ["notellm2", "modeling", "data_shards"])
def test_importing_every_module_loads_nothing_behind_the_wall(folder):
    modules = [_module_name(p) for p in _sources(folder)]
    assert len(modules) >= 5
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if _forbidden(m, LOADED[folder])] == []


def test_the_wall_check_sees_a_forbidden_import(tmp_path):
    """Negative control: the parser finds `from notellm2.launcher...` and `import deepspeed` in a source."""
    src = tmp_path / "bad.py"
    src.write_text("import os\nfrom notellm2.launcher.config import RunConfig\n\ndef f():\n    import deepspeed\n")
    found = [name for _, name in _imports(str(src)) if _forbidden(name, WALLS["modeling"])]
    assert found == ["notellm2.launcher.config", "notellm2.launcher.config.RunConfig", "deepspeed"]


def test_no_file_uses_the_old_top_level_spelling():
    offenders = []
    for folder in ("launcher", "modeling", "data_shards", "notellm2", "tests", "scripts", "benchmarks"):
        for path in _sources(folder):
            for line, name in _imports(path):
                if name.split(".")[0] in OLD_ROOTS:
                    offenders.append(f"{os.path.relpath(path, REPO)}:{line} {name}")
    assert offenders == []
