#!/usr/bin/env bash
# Test folders follow the packages (issue #11, item 6). Run from the repository root, on a clean tree:
#
#     bash scripts/reorg_tests.sh            # moves, rewrites, then `pytest --collect-only -q`
#
# Idempotent: a second run moves and rewrites nothing. It only uses `git mv` (so git's rename
# detection carries edits made elsewhere) and in-place text rewrites; review with `git status`.
#
# Target layout:
#   tests/conftest.py, tests/helpers/     shared fixtures; tiny models, data, runs, the multi-rank harness
#   tests/modeling/                       (unchanged)
#   tests/data_shards/{catalog,mining,openclipart,reader}/
#   tests/launcher/{train,eval,plan}/ and tests/launcher/test_*.py (CLI, config, paper recipe)
#   tests/slurm/                          (unchanged)
#   tests/e2e/                            the demo smoke and the real end-to-end runs
#
# The table below lists every file (FILE_MAP, applied first) and every folder rule (DIR_MAP: every
# other file of a folder keeps its relative path, so test files added there later move too, each
# one reported). A test module directly under tests/ that is in neither table
# is reported and left where it is. Afterwards every mention of a moved path or module is rewritten
# in every tracked text file (imports, "module:function" strings given to run_ranks, script paths
# given to torchrun, docs, benchmarks, scripts), as is any `REPO = os.path.dirname(...(__file__))`
# in tests (REPO is computed once, in tests/helpers/paths.py).
set -euo pipefail

# The mapping table: old path -> new path (a trailing / marks a folder rule).
REORG_TABLE=$(cat <<'TABLE'
# old path                                       new path
# --- files (today's, and those the parallel branches add) ---
tests/_rank_entry.py                             tests/helpers/rank_entry.py
tests/data_catalog/test_catalog.py               tests/data_shards/catalog/test_catalog.py
tests/data_catalog/test_cli_data.py              tests/data_shards/catalog/test_cli_data.py
tests/data_catalog/test_ids.py                   tests/data_shards/catalog/test_ids.py
tests/data_catalog/test_image_guard.py           tests/data_shards/catalog/test_image_guard.py
tests/data_catalog/test_pipeline.py              tests/data_shards/catalog/test_pipeline.py
tests/data_catalog/test_synthetic.py             tests/data_shards/catalog/test_synthetic.py
tests/data_catalog/test_writer.py                tests/data_shards/catalog/test_writer.py
tests/data_mining/test_cli_and_reference.py      tests/data_shards/mining/test_cli_and_reference.py
tests/data_mining/test_mining.py                 tests/data_shards/mining/test_mining.py
tests/data_openclipart/test_openclipart.py       tests/data_shards/openclipart/test_openclipart.py
tests/data_reader/dist_cases.py                  tests/data_shards/reader/dist_cases.py
tests/data_reader/helpers.py                     tests/helpers/shards.py
tests/data_reader/test_bad_input.py              tests/data_shards/reader/test_bad_input.py
tests/data_reader/test_bench_loader.py           tests/data_shards/reader/test_bench_loader.py
tests/data_reader/test_multirank_reader.py       tests/data_shards/reader/test_multirank_reader.py
tests/data_reader/test_pixel_slots.py            tests/data_shards/reader/test_pixel_slots.py
tests/data_reader/test_reader.py                 tests/data_shards/reader/test_reader.py
tests/data_reader/test_with_prompter.py          tests/data_shards/reader/test_with_prompter.py
tests/data_reader/test_writer_to_reader.py       tests/data_shards/reader/test_writer_to_reader.py
tests/dist_cases_harness.py                      tests/helpers/harness_cases.py
tests/eval/test_embed.py                         tests/launcher/eval/test_embed.py
tests/eval/test_eval_cli.py                      tests/launcher/eval/test_eval_cli.py
tests/eval/test_probes.py                        tests/launcher/eval/test_probes.py
tests/eval/test_recall.py                        tests/launcher/eval/test_recall.py
tests/fixtures.py                                tests/helpers/models.py
tests/fixtures_data.py                           tests/helpers/data.py
tests/multirank.py                               tests/helpers/multirank.py
tests/plan/test_plan.py                          tests/launcher/plan/test_plan.py
tests/slurm/real_inputs.py                       tests/helpers/real_inputs.py
tests/test_cli.py                                tests/launcher/test_cli.py
tests/test_config.py                             tests/launcher/test_config.py
tests/test_demo.py                               tests/e2e/test_demo.py
tests/test_gpu_check.py                          tests/e2e/test_gpu_check.py
tests/test_multirank_harness.py                  tests/helpers/test_multirank_harness.py
tests/test_paper_recipe.py                       tests/launcher/test_paper_recipe.py
tests/train/collective_cases.py                  tests/launcher/train/collective_cases.py
tests/train/common.py                            tests/helpers/double_runs.py
tests/train/doubles.py                           tests/helpers/doubles.py
tests/train/engine_grad_cases.py                 tests/launcher/train/engine_grad_cases.py
tests/train/real_setup.py                        tests/helpers/real_setup.py
tests/train/run_double.py                        tests/helpers/run_double.py
tests/train/test_collectives.py                  tests/launcher/train/test_collectives.py
tests/train/test_compare_scalars.py              tests/launcher/train/test_compare_scalars.py
tests/train/test_engine.py                       tests/launcher/train/test_engine.py
tests/train/test_engine_gradients.py             tests/launcher/train/test_engine_gradients.py
tests/train/test_partitioning.py                 tests/launcher/train/test_partitioning.py
tests/train/test_preempt_one_rank.py             tests/launcher/train/test_preempt_one_rank.py
tests/train/test_real.py                         tests/e2e/test_real_training.py
tests/train/test_soak.py                         tests/e2e/test_soak.py
tests/train/test_temperature_clamp.py            tests/launcher/train/test_temperature_clamp.py
tests/train/test_units.py                        tests/launcher/train/test_units.py
tests/data_reader/test_batch_contract.py         tests/data_shards/reader/test_batch_contract.py   # reader branch
tests/eval/test_serving.py                       tests/launcher/eval/test_serving.py   # cli branch
tests/eval/test_attention.py                     tests/launcher/eval/test_attention.py   # attn branch
tests/eval/test_search.py                        tests/launcher/eval/test_search.py   # evalx branch
tests/test_docs_commands.py                      tests/e2e/test_docs_commands.py   # cli branch
tests/modeling/conftest.py                       tests/conftest.py   # merged into the root conftest already; listed so a stray copy is reported
# --- folders: every other file below old/ keeps its relative path below new/ (and is reported) ---
tests/data_catalog/                              tests/data_shards/catalog/
tests/data_mining/                               tests/data_shards/mining/
tests/data_openclipart/                          tests/data_shards/openclipart/
tests/data_reader/                               tests/data_shards/reader/
tests/train/                                     tests/launcher/train/
tests/eval/                                      tests/launcher/eval/
tests/plan/                                      tests/launcher/plan/
TABLE
)
export REORG_TABLE
[ -f pytest.ini ] && [ -d tests ] || { echo "reorg_tests: run from the repository root" >&2; exit 2; }
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

"$PY" - <<'PYEOF'
import ast
import os
import re
import shutil
import subprocess
import sys

FILE_MAP, DIR_MAP = [], []
for row in os.environ["REORG_TABLE"].splitlines():
    row = row.split("#", 1)[0].split()
    if not row:
        continue
    old, new = row
    if old.endswith("/") != new.endswith("/"):
        sys.exit(f"reorg_tests: table row {old} {new}: both or neither must be folders (trailing /)")
    (DIR_MAP if old.endswith("/") else FILE_MAP).append((old.rstrip("/"), new.rstrip("/")))
KEEP_DIRS = ("tests/modeling", "tests/slurm", "tests/helpers", "tests/e2e", "tests/launcher", "tests/data_shards")
KEEP_ROOT = ("tests/__init__.py", "tests/conftest.py")
NEW_PACKAGES = ("tests/helpers", "tests/e2e", "tests/launcher", "tests/data_shards")
SELF = "scripts/reorg_tests.sh"


def git(*args, check=True):
    return subprocess.run(["git", *args], check=check, capture_output=True, text=True).stdout


def tracked(prefix=""):
    return [p for p in git("ls-files", "-z", *([prefix] if prefix else [])).split("\0") if p]


# ------------------------------------------------------------------ 1. what moves where
file_map = dict(FILE_MAP)
moves, notes = [], []
for path in tracked("tests"):
    if "__pycache__" in path:
        continue
    new = file_map.get(path)
    if new is None:
        for old_dir, new_dir in DIR_MAP:
            if path.startswith(old_dir + "/"):
                new = new_dir + path[len(old_dir):]
                if path.endswith(".py") and not path.endswith("__init__.py"):
                    notes.append(f"NEW FILE moved by the folder rule {old_dir}/ -> {new_dir}/: {path} "
                                 "(add it to the table)")
                break
    if new is None:
        top = path.split("/")
        if len(top) == 2 and path not in KEEP_ROOT and path.endswith(".py"):
            notes.append(f"NOT MOVED (in no table; move it by hand and add it to FILE_MAP): {path}")
        elif len(top) > 2 and not path.startswith(KEEP_DIRS):
            notes.append(f"NOT MOVED (folder in no table): {path}")
        continue
    moves.append((path, new))

untracked = [p for p in git("ls-files", "-z", "--others", "--exclude-standard", "tests").split("\0") if p]
for p in untracked:
    notes.append(f"NOT MOVED (untracked; commit it first, then run again): {p}")

# ------------------------------------------------------------------ 2. git mv
for pkg in NEW_PACKAGES:
    init = os.path.join(pkg, "__init__.py")
    if not os.path.exists(init):
        os.makedirs(pkg, exist_ok=True)
        open(init, "w").close()
        git("add", init)
for old, new in moves:
    if os.path.exists(new):
        if old == "tests/modeling/conftest.py":
            notes.append(f"NOT MOVED ({new} exists; merge {old} into it by hand)")
            continue
        sys.exit(f"reorg_tests: {new} exists already; refusing to overwrite it with {old}")
    parent = os.path.dirname(new)
    os.makedirs(parent, exist_ok=True)
    # every folder on the way is a package (tests/launcher/train/__init__.py comes with the folder's own)
    d = parent
    while d.startswith("tests/") and d != "tests":
        init = os.path.join(d, "__init__.py")
        if not os.path.exists(init) and not any(o == init for o, _ in moves) and not any(n == init for _, n in moves):
            open(init, "w").close()
            git("add", init)
        d = os.path.dirname(d)
    git("mv", old, new)
print(f"[reorg] moved {len(moves)} file(s)")

# emptied folders (only __pycache__ or nothing left) go
for old_dir, _ in DIR_MAP:
    if os.path.isdir(old_dir):
        left = [os.path.join(r, f) for r, _, fs in os.walk(old_dir) for f in fs if "__pycache__" not in r]
        if not left:
            shutil.rmtree(old_dir)
        else:
            notes.append(f"folder {old_dir} not removed, it still holds: {', '.join(sorted(left)[:5])}")

# ------------------------------------------------------------------ 3. rewrite mentions
def module(path):
    return path[:-3].replace("/", ".") if path.endswith(".py") else None

pairs = []  # (old token, new token), slash and dotted forms
for old, new in FILE_MAP:
    pairs.append((old, new))
    if module(old) and module(new):
        pairs.append((module(old), module(new)))
for old_dir, new_dir in DIR_MAP:
    pairs.append((old_dir, new_dir))
    pairs.append((old_dir.replace("/", "."), new_dir.replace("/", ".")))
pairs.sort(key=lambda p: -len(p[0]))  # longest first: the file exceptions before their folder rule
table = dict(pairs)
# A token starts a path/module (not preceded by a word character or a dot) and ends at a non-word
# character; "tests/train/x.py" matches the folder token "tests/train" followed by "/".
TOKEN = re.compile(r"(?<![\w.])(" + "|".join(re.escape(p[0]) for p in pairs) + r")(?![\w])")
# `from tests import fixtures` (a root module imported by name)
root_modules = {module(o).split(".")[1]: module(n) for o, n in FILE_MAP if o.count("/") == 1 and module(n)}
FROM_TESTS = re.compile(r"^(\s*)from tests import (" + "|".join(map(re.escape, root_modules)) + r")\s*$", re.M)
REPO_LINE = re.compile(r"^(\s*)(REPO|ROOT) = (?:os\.path\.dirname\()+os\.path\.abspath\(__file__\)\)+\s*$", re.M)


def from_tests(m):
    mod = root_modules[m.group(2)]
    pkg, name = mod.rsplit(".", 1)
    alias = "" if name == m.group(2) else f" as {m.group(2)}"
    return f"{m.group(1)}from {pkg} import {name}{alias}"


def repo_line(m):
    line = f"{m.group(1)}from tests.helpers.paths import REPO"
    return line + (f"\n{m.group(1)}ROOT = REPO" if m.group(2) == "ROOT" else "")


changed = []
for path in tracked():
    if path == SELF or not os.path.isfile(path):
        continue
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (UnicodeDecodeError, OSError):
        continue
    new = TOKEN.sub(lambda m: table[m.group(1)], text)
    if path.startswith("tests/") and path.endswith(".py"):
        new = FROM_TESTS.sub(from_tests, new)
        if path != "tests/helpers/paths.py":
            new = REPO_LINE.sub(repo_line, new)
    if new != text:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(new)
        changed.append(path)
print(f"[reorg] rewrote mentions in {len(changed)} file(s)")

# ------------------------------------------------------------------ 4. one PairLoader builder
# The reader tests' three local builders (make_loader, loader_for, pair_loader) become calls of
# tests/helpers/loaders.py:pair_loader. A file whose builder no longer looks as expected is left
# alone and reported (switch it by hand).
READER = "tests/data_shards/reader"
HELPER_IMPORT = "from tests.helpers.loaders import pair_loader\n"


def drop_def(text, name):
    """Remove the top-level `def name(...)` block; returns (text, the removed block or None)."""
    m = re.search(rf"^def {name}\(.*?(?=^\S)", text, re.S | re.M)
    if not m or "PairLoader(" not in m.group(0):
        return text, None
    return text[:m.start()] + text[m.end():], m.group(0)


def add_import(text):
    if HELPER_IMPORT in text:
        return text
    lines = text.splitlines(keepends=True)
    last = max(i for i, ln in enumerate(lines) if ln.startswith(("from tests.", "import tests.")))
    # after the whole (possibly parenthesised) statement that starts on line `last`
    j = last
    while "(" in lines[last] and ")" not in "".join(lines[last:j + 1]):
        j += 1
    lines.insert(j + 1, HELPER_IMPORT)
    return "".join(lines)


def merged_call(m, first, defaults, extra):
    """pair_loader(<first>, k=v, ...): `defaults`, then the call's own `, k=v` keywords over them; wrapped
    under its opening parenthesis when the line would pass 110 characters."""
    kwargs = dict(defaults)
    for part in filter(None, (extra or "").split(",")):
        k, v = part.split("=", 1)
        kwargs[k.strip()] = v.strip()
    args = [first] + [f"{k}={v}" for k, v in kwargs.items()]
    col = m.start() - (m.string.rfind("\n", 0, m.start()) + 1)
    line_end = m.string.find("\n", m.end())
    rest = len(m.string[m.end():line_end if line_end >= 0 else None])
    lines, cur = [], "pair_loader("
    for i, a in enumerate(args):
        piece = a + ("" if i == len(args) - 1 else ", ")
        if lines or len(cur) > len("pair_loader("):
            if col + len(cur) + len(piece.rstrip()) > 110 - (rest if i == len(args) - 1 else 0):
                lines.append(cur.rstrip())
                cur = " " * (col + len("pair_loader("))
        cur += piece
    return "\n".join(lines + [cur + ")"])


KW = r"((?:, \w+=[\w.]+)*)"  # the keyword arguments of a call: ", name=value" ...
SWITCHES = [  # file, local builder, [(call pattern, rewrite(match, removed def))]
    (f"{READER}/test_reader.py", "make_loader",  # same signature as the helper: a rename
     [(re.compile(r"\bmake_loader\("), lambda m, d: "pair_loader(")]),
    (f"{READER}/test_pixel_slots.py", "pair_loader",  # pair_loader(pattern, workers, **cfg), 3 pairs
     [(re.compile(r"\bpair_loader\(([\w.]+), (\d+)" + KW + r"\)"),
       lambda m, d: merged_call(m, m.group(1), {"B": "3", "num_workers": m.group(2),
                                             # before the uint8-only reader: its builder's normalize=False
                                             **({"normalize": "False"} if "normalize=normalize" in d else {})},
                                m.group(3)))]),
    (f"{READER}/test_bad_input.py", "loader_for",  # loader_for(tmp_path, policy, num_workers=2, B=4)
     [(re.compile(r'\bloader_for\(tmp_path, ("[a-z_]+")' + KW + r"\)"),
       lambda m, d: merged_call(m, 'str(tmp_path / "pairs-train-*.tar")',
                                {"num_workers": "2", "shuffle_buffer": "4", "max_image_pixels": "10_000_000",
                                 "bad_sample_policy": m.group(1)}, m.group(2)))]),
]
for path, name, subs in SWITCHES:
    if not os.path.exists(path):
        continue
    text = open(path).read()
    if HELPER_IMPORT in text:
        continue  # switched already
    new, removed = drop_def(text, name)
    if removed is None:
        notes.append(f"PairLoader builder: {path} has no `def {name}` that builds a PairLoader; switch it by hand")
        continue
    for rx, repl in subs:
        new = rx.sub(lambda m: repl(m, removed), new)
    new = add_import(new)
    # nothing may call the old builder's way: its name (renamed ones) or a positional second argument
    leftover = re.search(rf"\b{name}\(" if name != "pair_loader" else r"\bpair_loader\([^,()]+, (?!\w+=)", new)
    try:
        ast.parse(new)
        ok = leftover is None
    except SyntaxError:
        ok = False
    if not ok:
        notes.append(f"PairLoader builder: {path}: some calls of {name} have an unexpected form; switch it by hand")
        continue
    with open(path, "w") as fh:
        fh.write(new)
    print(f"[reorg] {path}: its {name} is now tests.helpers.loaders.pair_loader")

# ------------------------------------------------------------------ 5. what is left to look at
stale = []
for path in tracked("tests"):
    if not path.endswith(".py") or not os.path.exists(path):
        continue
    text = open(path, encoding="utf-8").read()
    if re.search(r'"tests",\s*"', text):
        stale.append(f"{path}: a path built from parts (\"tests\", ...): check it by hand")
    if "__file__" in text and path not in ("tests/helpers/paths.py", "tests/helpers/rank_entry.py",
                                           "tests/helpers/run_double.py"):
        stale.append(f"{path}: uses __file__ (a path relative to the test's old place?): check it")
for line in notes + stale:
    print("[reorg] " + line)
PYEOF

echo "[reorg] collecting:"
"$PY" -m pytest --collect-only -q -p no:cacheprovider 2>&1 | tail -n 1
