"""Every `notellm2 ...` command line in README.md and docs/*.md runs (litgpt's test_readme.py idea).

A command line is a line of a fenced code block (no info string, or bash/sh/shell/console) that
starts with `notellm2` (after an optional `$ `); a trailing `\\` joins the next line, a `# comment`
is dropped, and whitespace and shell quotes are normalised: the key is the command's words joined
by single spaces. Options in `[...]` (a synopsis) are not part of the key: each must be an option
of the verb's parser (`test_synopsis_options_are_options_of_their_verb`), and the command runs
without them. Each key must be either

- in RUN: it runs on tiny inputs built here, with only its paths substituted (PATHS); or
- in ALLOWLIST, with the reason it cannot run here (cluster-only or long-running).

Any other command line fails `test_every_docs_command_is_run_or_allowlisted`, and so does an entry
of RUN or ALLOWLIST that no document holds any more.

To add a documented command: add its key (the failure message prints it) as one line of RUN, and,
if it names a placeholder path not in PATHS, one PATHS entry pointing at the tiny input it stands
for (the inputs are built in `tiny_inputs`).
"""
from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil

import numpy as np
import pytest

from tests.helpers.multirank import REPO

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}

RUN = [
    "notellm2 data validate --catalog A/catalog.jsonl",
    "notellm2 data simulate-views --catalog A/catalog.jsonl --out A/views.parquet",
    "notellm2 data mine-pairs --views A/views.parquet --out A/pairs --split-by hash --test-fraction 0.3 --pair-split both",
    "notellm2 data write-shards --pairs A/pairs --catalog A/catalog.jsonl --out A/shards",
    "notellm2 embed --model A/export --shards A/shards/notes-test-*.tar --out A/emb",
    "notellm2 embed --model A/export --shards A/shards/notes-test-*.tar --out A/emb --part-every 50 --dtype float16",
    "notellm2 embed --model A/export --shards A/shards/notes-test-*.tar --out A/emb --restart",
    "notellm2 eval --embeddings A/emb --pairs A/pairs --split test --k 10 50 100",
    "notellm2 eval --embeddings A/emb --reference bm25 category --pairs A/pairs --catalog A/catalog.jsonl --k 1 10 "
    "--baseline bm25",
    "notellm2 plan --config configs/paper_scale.yaml --nodes 2 --gpus-per-node 8 --gpu-memory-gib 80",
    "notellm2 plan --config configs/paper_scale.yaml --json",
    "notellm2 plan --config my.yaml --nodes 4 model.llm.gradient_checkpointing=false data.pairs_per_rank=8",
    "notellm2 plan --config configs/paper_scale.yaml --nodes 1 --gpus-per-node 1 --gpu-memory-gib 80 "
    "model.llm.lora.enabled=true data.pairs_per_rank=128 train.chunk_pairs=16",
    "notellm2 data validate --catalog notes.jsonl",
    "notellm2 data write-shards --pairs pairs_dir --catalog notes.jsonl --out shards_dir",
    "notellm2 data mine-pairs --views logs.parquet --out pairs_dir",
    "notellm2 analyze attention --model EXPORT_DIR --shards data/shards/pairs-test-*.tar --out analysis/",
    "notellm2 data import-pairs --catalog notes.jsonl --out pairs_dir --train train.csv --val val.csv --test test.csv",
    "notellm2 data import-pairs --catalog notes.jsonl --out pairs_dir --pairs all.parquet",
    "notellm2 neighbors --embeddings DIR --k 100 --out related.parquet",
    "notellm2 neighbors --embeddings emb_minilm --k 100 --out related.parquet",
    "notellm2 neighbors --embeddings emb_minilm --k 100 --out related_hnsw.parquet --backend faiss-hnsw",
    "notellm2 data cache-vision --config run.yaml --out data/shards/vision-cache",
    "notellm2 data cache-vision --config run.yaml --shards data/shards/pairs-train-*.tar --shards "
    "data/shards/notes-test-*.tar --flip --out data/shards/vision-cache",
    "notellm2 data note-stats --shards shards_dir",
    # docs/new_notes.md, the daily loop's runbook (A/daily: a 120-note catalog, day 0 and day 1 built in tiny_inputs)
    "notellm2 data write-notes --catalog catalog/notes.jsonl --out notes/2026-12-07",
    "notellm2 embed --model encoder --shards notes/2026-12-07 --out emb/2026-12-07",
    "notellm2 index build --embeddings emb/2026-12-07 --out index/2026-12-07 --k 100 --drop-duplicates",
    "notellm2 data write-notes --catalog catalog/new-2026-12-08.jsonl --deleted catalog/deleted-2026-12-08.txt "
    "--out notes/2026-12-08",
    "notellm2 embed --model encoder --shards notes/2026-12-08 --base emb/2026-12-07 --out emb/2026-12-08",
    "notellm2 index update --index index/2026-12-07 --embeddings emb/2026-12-08 --out index/2026-12-08",
    "notellm2 data simulate-views --catalog A/catalog.jsonl --out A/views.parquet --visual-browsing 0.5",
]

ALLOWLIST = {
    "notellm2 eval --embeddings minilm=emb_minilm --reference bm25 category tower:vision-cache --pairs pairs "
    "--catalog catalog.jsonl --k 1 10 50 --baseline bm25 --out-dir report":
        "needs the example's zero-shot MiniLM vectors and an EfficientNet-Lite0 vision cache of an openclipart slice; "
        "the line above runs embeddings, bm25 and category with --baseline here, tests/launcher/eval/test_reference.py "
        "runs the tower row on a hand-built cache",
    "notellm2 data mine-pairs --engine spark --views logs.parquet --out pairs_dir":
        "a fresh Spark session with default settings took 186 s on tiny views here; tests/data_shards/mining runs every "
        "mining rule on the Spark engine in one shared session tuned for small inputs",
    "notellm2 data mine-pairs --engine spark --spark-master local[2] --spark-conf spark.driver.memory=6g "
    "spark.local.dir=/scratch/spark --views logs/ --out pairs_dir":
        "sized for a large log (6g driver, a scratch disk); the line above runs the same engine on tiny views, "
        "tests/data_shards/mining runs every rule on both engines",
    "notellm2 analyze attention --model basic_mm=exports/basic_mm notellm2=exports/notellm2 "
    "text_only=exports/text_only --shards data/shards/pairs-test-*.tar --out analysis/ --batches 4 --batch-size 8":
        "needs three trained exports of different variants; tests/launcher/eval/test_attention.py runs the CLI on two tiny ones",
    "notellm2 data import-openclipart --out A/catalog.jsonl":
        "long-running: reads and renders all 8,121 items of /usr/share/openclipart (scripts/demo.sh runs it; "
        "tests/data_shards/openclipart covers the importer on a slice)",
    "notellm2 data import-openclipart --out A/catalog.jsonl --max-per-category 100 --blank-text-fraction 0.5":
        "reads all 8,121 items of /usr/share/openclipart (scripts/bench_catalog.py runs it); "
        "tests/data_shards/catalog/test_shaping.py runs the verb with these options on a small tree",
    "notellm2 export --run-dir A/run --out A/export":
        "needs a DeepSpeed checkpoint of a training run; tests/e2e/test_real_training.py exports one and checks the vectors",
    "notellm2 train --config run.yaml data.vision_cache=data/shards/vision-cache":
        "a training run; tests/data_shards/vision_cache/test_train_with_cache.py trains 2 ranks with and without "
        "a cache written by `notellm2 data cache-vision` and compares every logged scalar",
    "notellm2 eval --reference category bm25 tower=tower:/work/bench_data/vision_cache/lite0 --pairs "
    "/work/bench_data/pairs --split test --catalog /work/bench_data/catalog.jsonl --k 1 5 10 --baseline category "
    "--out docs/ladder/references/bench.test.json":
        "needs the benchmark catalog and its Lite0 cache (scripts/bench_catalog.py, hours); "
        "tests/launcher/eval/test_reference.py runs the three reference kinds on hand-built inputs",
    "notellm2 eval --embeddings notellm2_lr1e-04=$B/notellm2_lr1e-04_s0/emb_val visw0=$B/notellm2_visw0_lr1e-04_s0/emb_val "
    "visw3=$B/notellm2_visw3_lr1e-04_s0/emb_val newlr1x=$B/notellm2_newlr1x_lr1e-04_s0/emb_val "
    "newlr5x=$B/notellm2_newlr5x_lr1e-04_s0/emb_val paperinit=$B/notellm2_paperinit_lr1e-04_s0/emb_val --pairs "
    "/work/bench_data/pairs --split val --protocol paper --k 1 5 10 --catalog /work/bench_data/catalog.jsonl "
    "--baseline notellm2_lr1e-04 --out docs/ladder/references/causes.val.json":
        "needs six trained runs' val embeddings of the benchmark ladder (scripts/ladder.py, about 40 minutes of training); "
        "the README's stage chain runs `eval` on real embeddings, tests/launcher/eval runs --baseline on hand-built ones",
    "notellm2 export --run-dir artifacts/demo/run --out artifacts/demo/encoder":
        "needs a DeepSpeed checkpoint of a training run; tests/e2e/test_real_training.py exports one and checks the vectors",
}

# Placeholder paths of the docs -> paths under the tiny work folder (a token equal to a key, or
# starting with a key that ends in '/', is replaced).
PATHS = {
    "A/": "A/",
    "notes.jsonl": "A/catalog.jsonl",
    "logs.parquet": "A/views.parquet",
    "pairs_dir": "A/pairs",
    "shards_dir": "A/shards",
    "EXPORT_DIR": "A/export",
    "train.csv": "A/train.csv",
    "val.csv": "A/val.csv",
    "test.csv": "A/test.csv",
    "all.parquet": "A/all.parquet",
    "DIR": "A/emb_big",
    "emb_minilm": "A/emb_big",
    "related.parquet": "A/related.parquet",
    "related_hnsw.parquet": "A/related_hnsw.parquet",
    "data/shards/": "A/shards/",
    "analysis/": "A/analysis/",
    "my.yaml": os.path.join(REPO, "configs", "paper_scale.yaml"),
    "run.yaml": "A/run.yaml",
    "catalog/": "A/daily/catalog/",
    "notes/": "A/daily/notes/",
    "emb/": "A/daily/emb/",
    "index/": "A/daily/index/",
    "encoder": "A/export",
}


def _blocks(path: str):
    """(line number, text) of the lines of the shell-like fenced blocks of a markdown file."""
    fence = None
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            m = re.match(r"\s*```\s*(\S*)", line)
            if m:
                fence = None if fence is not None else m.group(1).lower()
                continue
            if fence in SHELL_BLOCKS:
                yield no, line.rstrip("\n")


def docs_commands() -> dict[str, tuple[str, list[str]]]:
    """{key: ('file:line', the [...] option names)} of every notellm2 command line in README.md and docs/*.md."""
    found: dict[str, tuple[str, list[str]]] = {}
    for path in [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]:
        pending, start = "", 0
        for no, line in _blocks(path):
            text = line.strip()
            if pending:
                text = pending + " " + text
            elif text.startswith("$ "):
                text = text[2:]
            if not (pending or text == "notellm2" or text.startswith("notellm2 ")):
                continue
            start = start if pending else no
            if text.endswith("\\"):
                pending = text[:-1].strip()
                continue
            pending = ""
            words, optional = _split_synopsis(" ".join(shlex.split(text, comments=True)))
            found.setdefault(" ".join(["notellm2", *words]), (f"{os.path.relpath(path, REPO)}:{start}", optional))
    return found


def _split_synopsis(command: str) -> tuple[list[str], list[str]]:
    """(the words that run, the option names inside `[...]`)."""
    run, optional, depth = [], [], 0
    for word in command.split()[1:]:
        opens, closes = word.startswith("["), word.endswith("]")
        depth += opens
        if depth:
            name = word.strip("[]")
            if name.startswith("--"):
                optional.append(name)
        else:
            run.append(word)
        if closes and depth:  # a word like local[2] closes nothing
            depth -= 1
    return run, optional


def _substitute(words: list[str], work: str) -> list[str]:
    out = []
    for word in words:
        for key, value in PATHS.items():
            if word == key or (key.endswith("/") and word.startswith(key)):
                word = os.path.join(work, value + word[len(key):]) if not os.path.isabs(value) else value
                break
        out.append(word)
    return out


def _verb_parser(words: list[str]):
    from notellm2.launcher.cli import build_parser

    parser = build_parser()
    for word in words:
        sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        if sub is None or word not in sub.choices:
            break
        parser = sub.choices[word]
    return parser


def test_every_docs_command_is_run_or_allowlisted():
    found = docs_commands()
    unknown = {c: where for c, (where, _) in found.items() if c not in RUN and c not in ALLOWLIST}
    assert not unknown, ("command lines in the docs that tests/e2e/test_docs_commands.py neither runs nor allowlists "
                         "(add each to RUN):\n" + "\n".join(f"  {w}: {c}" for c, w in unknown.items()))
    stale = [c for c in [*RUN, *ALLOWLIST] if c not in found]
    assert not stale, f"RUN/ALLOWLIST entries no document holds any more: {stale}"
    assert len(set(RUN)) == len(RUN) and not set(RUN) & set(ALLOWLIST)


def test_extraction_joins_continuations_and_skips_output_blocks(tmp_path, monkeypatch):
    import tests.e2e.test_docs_commands as me

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("```bash\n$ notellm2 eval --k 1 \\\n    --out 'x y'   # note\n```\n"
                                        "```text\nnotellm2 plan: output, not a command\n```\n"
                                        "notellm2 prose outside a block\n")
    (tmp_path / "docs" / "a.md").write_text("```\nnotellm2 data validate --catalog c.jsonl [--json]\n```\n")
    monkeypatch.setattr(me, "REPO", str(tmp_path))
    assert me.docs_commands() == {"notellm2 eval --k 1 --out x y": ("README.md:2", []),
                                  "notellm2 data validate --catalog c.jsonl": ("docs/a.md:2", ["--json"])}
    assert _split_synopsis("notellm2 data validate --catalog c.jsonl [--format jsonl|csv] [--json]") == \
        (["data", "validate", "--catalog", "c.jsonl"], ["--format", "--json"])


def test_synopsis_options_are_options_of_their_verb():
    found = docs_commands()
    assert any(optional for _, optional in found.values())  # the docs do hold synopses
    for command, (where, optional) in found.items():
        parser = _verb_parser(command.split()[1:])
        known = {s for a in parser._actions for s in a.option_strings}
        missing = [o for o in optional if o not in known]
        assert not missing, f"{where}: {command}: the verb has no option {missing}"


def test_allowlisted_commands_parse():
    """What cannot run here must at least be a valid command line of today's CLI."""
    from notellm2.launcher.cli import build_parser

    for command in ALLOWLIST:
        args = build_parser().parse_args(command.split()[1:])
        assert hasattr(args, "handler"), command


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory):
    """A/: catalog.jsonl (+ images), views.parquet, pairs/, shards/, export/ (untrained tiny model), emb/,
    run.yaml (configs/tiny_cpu.yaml with a tiny CLIP tower and the shards)."""
    from notellm2.data_shards.catalog.synthetic import make_synthetic_views
    from notellm2.launcher.eval.evaluate import save_embeddings
    from tests.launcher.eval.test_serving import tiny_export
    from tests.helpers.data import synthetic_shards

    root = tmp_path_factory.mktemp("docs-commands")
    a = root / "A"
    shard_dir, _ = synthetic_shards(str(root / "data"), n_notes=24, n_categories=3, n_pairs=40, shard_size=8,
                                    image_size=32)
    a.mkdir()
    shutil.copy(root / "data" / "catalog" / "notes.jsonl", a / "catalog.jsonl")
    shutil.copytree(root / "data" / "catalog" / "images", a / "images")
    shutil.copytree(root / "data" / "pairs", a / "pairs")
    # the synthetic pairs carry no note split (mining writes one): give each note its most held-out split
    import pandas as pd

    pairs = pd.read_parquet(a / "pairs" / "pairs.parquet")
    rank = {"test": 0, "val": 1, "train": 2}
    best = {}
    for q, t, split in zip(pairs["query_id"], pairs["target_id"], pairs["split"]):
        for n in (q, t):
            best[n] = min(best.get(n, split), split, key=rank.get)
    pd.DataFrame({"note_id": list(best), "split": list(best.values())}).to_parquet(a / "pairs" / "note_split.parquet")
    shutil.copytree(shard_dir, a / "shards")
    make_synthetic_views(str(a / "catalog.jsonl"), str(a / "views.parquet"), n_users=40, sessions_per_user=2,
                         views_per_session=4, seed=0)
    shutil.copytree(tiny_export(root / "model"), a / "export")
    ids = [json.loads(line)["note_id"] for line in open(a / "catalog.jsonl")]
    # the paper's header-less per-split CSVs (each note in one split) and one Parquet with a split column
    import pandas as pd

    rows = {"train": [(ids[i], ids[i + 1]) for i in range(0, 12, 2)], "val": [(ids[12], ids[13])],
            "test": [(ids[14], ids[15]), (ids[16], ids[14])]}
    for split, pairs in rows.items():
        (a / f"{split}.csv").write_text("".join(f"{q},{t}\n" for q, t in pairs))
    pd.DataFrame([(q, t, s) for s, pairs in rows.items() for q, t in pairs],
                 columns=["query_id", "target_id", "split"]).to_parquet(a / "all.parquet")
    vec = np.random.default_rng(0).normal(size=(len(ids), 8)).astype(np.float32)
    save_embeddings(str(a / "emb"), ids, vec / np.linalg.norm(vec, axis=1, keepdims=True))
    big = np.random.default_rng(1).normal(size=(150, 8)).astype(np.float32)  # neighbors --k 100 needs > 100 notes
    save_embeddings(str(a / "emb_big"), [f"x{i}" for i in range(150)], big / np.linalg.norm(big, axis=1, keepdims=True))
    daily_loop(a)
    from tests.helpers.configs import write_tiny_config
    from tests.helpers.models import make_tiny_clip_dir

    shards = a / "shards"
    write_tiny_config(a / "run.yaml", {"model.vision.path": make_tiny_clip_dir(str(root / "model")),
                                       "data.train_shards": f"{shards}/pairs-train-*.tar",
                                       "data.val_shards": f"{shards}/pairs-val-*.tar",
                                       "data.notes_shards": f"{shards}/notes-test-*.tar", "data.num_workers": 0})
    return root


def daily_loop(a) -> None:
    """A/daily for docs/new_notes.md's runbook: a 120-note catalog, a day's changes (3 edited, 5 new notes, 2
    deleted), and every folder the runbook's lines read, written by the same commands (each line then runs
    again on its own)."""
    from notellm2.data_shards.catalog.synthetic import make_synthetic_catalog
    from notellm2.launcher.cli import main

    daily = a / "daily"
    cat = make_synthetic_catalog(str(daily / "catalog"), n_notes=128, n_categories=4, image_size=32)
    notes = [json.loads(line) for line in open(cat)]
    (daily / "catalog" / "notes.jsonl").write_text("".join(json.dumps(n) + "\n" for n in notes[:120]))
    edited = [dict(n, title=n["title"] + " (edited)") for n in notes[10:13]]
    (daily / "catalog" / "new-2026-12-08.jsonl").write_text("".join(json.dumps(n) + "\n" for n in edited + notes[120:125]))
    (daily / "catalog" / "deleted-2026-12-08.txt").write_text(f"{notes[0]['note_id']}\n{notes[1]['note_id']}\n")
    d = str(daily)
    assert main(["data", "write-notes", "--catalog", f"{d}/catalog/notes.jsonl", "--out", f"{d}/notes/2026-12-07"]) == 0
    # day 0's embedding set: random vectors with the export's fingerprint and the notes' content hashes (what
    # `embed` would record; its own line runs below), so that the fixture embeds 120 notes once, not twice
    from notellm2.data_shards.reader.content_hash import shard_content_hashes
    from notellm2.launcher.eval.evaluate import save_embeddings
    from notellm2.launcher.eval.provenance import export_fingerprint, write_content_hashes

    ids, hashes = shard_content_hashes(f"{d}/notes/2026-12-07/notes-catalog-*.tar")
    meta = {"mode": "both", "fingerprint": export_fingerprint(str(a / "export")),
            **write_content_hashes(f"{d}/emb/2026-12-07", hashes)}
    vec = np.random.default_rng(2).normal(size=(len(ids), 8)).astype(np.float32)
    save_embeddings(f"{d}/emb/2026-12-07", ids, vec / np.linalg.norm(vec, axis=1, keepdims=True), meta)
    for argv in (["index", "build", "--embeddings", f"{d}/emb/2026-12-07", "--out", f"{d}/index/2026-12-07", "--k", "100"],
                 ["data", "write-notes", "--catalog", f"{d}/catalog/new-2026-12-08.jsonl", "--deleted",
                  f"{d}/catalog/deleted-2026-12-08.txt", "--out", f"{d}/notes/2026-12-08"],
                 ["embed", "--model", str(a / "export"), "--shards", f"{d}/notes/2026-12-08", "--base",
                  f"{d}/emb/2026-12-07", "--out", f"{d}/emb/2026-12-08"]):
        assert main(argv) == 0, argv


@pytest.mark.parametrize("command", RUN)
def test_docs_command_runs(command, tiny_inputs, tmp_path, monkeypatch, capsys):
    from notellm2.launcher.cli import main

    work = str(tmp_path)
    shutil.copytree(tiny_inputs / "A", tmp_path / "A")
    argv = _substitute(command.split()[1:], work)
    out = argv[argv.index("--out") + 1] if "--out" in argv else None
    if out and os.path.isdir(out):  # the command's own output: written fresh, as on a first run
        shutil.rmtree(out)
    elif out and os.path.exists(out):
        os.remove(out)
    monkeypatch.chdir(REPO)
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, f"{command}\n-> {argv}\nexit {rc}\n{captured.err[-3000:]}"
    assert out is None or os.path.exists(out), f"{command}: wrote nothing to {out}"
    _check_output(argv, out, captured.out)


def _check_output(argv: list[str], out: str | None, stdout: str) -> None:
    """What each verb wrote holds what it should, not only a file of the right name."""
    import pandas as pd

    verb = argv[:2] if argv[0] == "data" else argv[:1]
    if verb == ["data", "simulate-views"]:
        views = pd.read_parquet(out)
        assert len(views) > 0 and {"user_id", "note_id", "timestamp"} <= set(views.columns)
    elif verb in (["data", "mine-pairs"], ["data", "import-pairs"]):
        pairs = pd.read_parquet(os.path.join(out, "pairs.parquet"))
        assert len(pairs) > 0 and set(pairs["split"]) <= {"train", "val", "test"}
    elif verb == ["data", "write-shards"]:
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        assert sum(e["count"] for e in manifest["shards"]) > 0
    elif verb == ["embed"]:
        info = json.load(open(os.path.join(out, "embeddings.json")))
        ids = open(os.path.join(out, "ids.txt")).read().split()
        vectors = np.load(os.path.join(out, "embeddings.npy"))
        assert info["count"] == len(ids) == len(vectors) > 0 and np.isfinite(vectors.astype(np.float32)).all()
    elif verb == ["neighbors"]:
        table = pd.read_parquet(out)
        k = int(argv[argv.index("--k") + 1])
        assert len(table) == k * table["note_id"].nunique() and table["rank"].max() == k
    elif verb == ["eval"]:
        runs = [a.split("=")[0] if "=" in a else os.path.basename(a) for a in argv[argv.index("--embeddings") + 1:]
                if not a.startswith("--")][:1]
        assert runs and f"{runs[0]}: pool " in stdout and "queries" in stdout, stdout[-2000:]
    elif verb == ["data", "write-notes"]:
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        assert manifest["format"] == "notellm2-notes" and manifest["counts"]["notes_written"] > 0
    elif verb == ["index"]:
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        table = pd.read_parquet(os.path.join(out, "related.parquet"))
        k = manifest["settings"]["k"]
        assert manifest["counts"]["notes"] == table["note_id"].nunique() > k and len(table) == k * manifest["counts"]["notes"]
        assert manifest["version"] == (2 if argv[1] == "update" else 1) and manifest["fingerprint"]
    elif verb == ["data", "cache-vision"]:
        assert os.path.isfile(os.path.join(out, "cache.json"))
    elif verb == ["analyze"]:
        assert any(f.endswith(".json") for f in os.listdir(out))


# ----------------------------------------------------------------------------- the README's stage block

README_CHAIN_START = "notellm2 data import-openclipart --out A/catalog.jsonl"
# What the chain test changes, and why: the openclipart import renders 8,121 images (minutes), so a
# tiny synthetic catalog stands in for its output; the demo's SmolLM2 and EfficientNet are swapped for
# the tiny models of the tests, training runs 2 steps of 2 pairs per rank, and write-shards cuts small
# shards (the default size would put the tiny catalog's train pairs in one shard, too few for 2 ranks).
CHAIN_TRAIN_OVERRIDES = {"model.llm.num_layers": None, "model.vision.kind": "hf", "model.vision.image_size": 32,
                         "model.connector.hidden_size": 32, "model.connector.num_heads": 2, "model.max_text_tokens": 32,
                         "model.embed_dim": 16, "data.pairs_per_rank": 2, "data.num_workers": 0,
                         "data.shuffle_buffer": 16, "train.max_steps": 2, "train.warmup_steps": 0,
                         "checkpoint.every_steps": 2}


def readme_chain() -> list[list[str]]:
    """The README's stage-by-stage block: its command lines in order, each as argv words."""
    lines, pending, inside = [], "", False
    for _, line in _blocks(os.path.join(REPO, "README.md")):
        text = line.strip()
        if text.startswith(README_CHAIN_START):
            inside = True
        if not inside:
            continue
        if not text:
            break
        text = (pending + " " + text).strip() if pending else text
        if text.endswith("\\"):
            pending = text[:-1].strip()
            continue
        pending = ""
        lines.append(shlex.split(text, comments=True))
    return lines


@pytest.mark.slow
def test_readme_stage_block_runs_as_one_chain(tmp_path):
    """Every line of the README's stage block, in order, in one folder: each reads what the one before
    it wrote (the catalog -> views -> pairs -> shards -> run -> export -> embeddings -> eval)."""
    import subprocess
    import sys

    from notellm2.data_shards.catalog.synthetic import make_synthetic_catalog
    from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
    from tests.helpers.multirank import base_env

    chain = readme_chain()
    assert [c[:3] for c in chain[:2]] == [["notellm2", "data", "import-openclipart"], ["notellm2", "data", "validate"]]
    assert any(c[0] == "torchrun" for c in chain) and chain[-2][:2] == ["notellm2", "eval"], chain
    models = tmp_path / "models"
    tiny = {"model.llm.path": make_tiny_llm_dir(str(models), arch="llama", num_layers=2, hidden=32),
            "model.vision.path": make_tiny_clip_dir(str(models), hidden=32, layers=1), **CHAIN_TRAIN_OVERRIDES}
    env = base_env({"TOKENIZERS_PARALLELISM": "false"})
    bindir = os.path.dirname(sys.executable)
    for argv in chain:
        if argv[:3] == ["notellm2", "data", "import-openclipart"]:
            out = tmp_path / argv[argv.index("--out") + 1]
            src = make_synthetic_catalog(str(tmp_path / "synthetic"), n_notes=90, n_categories=3, image_size=32)
            shutil.copytree(os.path.dirname(src), out.parent, dirs_exist_ok=True)
            os.replace(os.path.join(out.parent, "notes.jsonl"), out)
            continue
        if argv[0] == "torchrun":
            argv = [*argv, *(f"{k}={json.dumps(v)}" for k, v in tiny.items())]
        if argv[:3] == ["notellm2", "data", "write-shards"]:
            argv = [*argv, "--shard-size", "64"]  # several train shards from a tiny catalog: one per rank at least
        argv = [os.path.join(bindir, argv[0]), *argv[1:]]
        out = subprocess.run(argv, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    report = json.load(open(tmp_path / "A" / "emb" / "embeddings.json"))
    assert report["count"] > 0 and report["model"].endswith(os.path.join("A", "export"))
    assert os.path.exists(tmp_path / "A" / "run" / "metrics.jsonl")
