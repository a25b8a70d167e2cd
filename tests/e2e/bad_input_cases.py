"""The bad-input table of tests/e2e/test_bad_inputs.py: every verb against inputs a user gets wrong.

A case names the failure class it stands for (`kind`, the classes of issue #27), builds what it needs
in its own folder (`prepare(ws, d)`), gives the verb's arguments (`argv(ws, d)`) and the words the one
line on stderr must hold (`needles`, formatted with `d` = its folder and `ws` = the workspace root).
The workspace (`build_workspace`) is built once: a tiny catalog, its views, a mining, shards, two tiny
models, a run config, a finished embedding. Cases never change it; the test checks that.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

# The failure classes of issue #27 that this table must cover, each by at least one named case.
KINDS = {
    "config": "a config key, value or file the schema refuses",
    "missing_input": "an input path that does not exist",
    "third_party": "a library's error on the user's file (DuckDB, pandas, PIL, safetensors, YAML)",
    "numeric_option": "a numeric option out of range (0, negative, nan, inf)",
    "output_kind": "an output path of the wrong kind (a file for a folder, a folder for a file)",
    "rerun_other": "a finished output of other inputs or settings, without --overwrite",
    "zero_rows": "inputs that would give an empty output",
    "timestamp_unit": "view timestamps whose magnitude says they are not seconds",
    "shard_kind": "shards of the wrong kind for the verb",
    "backbone": "a model folder that is not one (missing, no config.json)",
    "batch_too_large": "a batch larger than the shards hold at training start-up",
    "nonfinite": "non-finite vectors or scores",
    "malformed_file": "an input file of the right name but broken contents",
    "eval_k": "eval/neighbors K <= 0 (bench-eval)",
    "eval_bootstrap": "eval --bootstrap 0 (bench-eval)",
}

@dataclass
class Case:
    name: str
    kind: str
    argv: Callable
    needles: tuple = ()
    prepare: Optional[Callable] = None
    xfail: Optional[str] = None
    # paths (relative to the workspace root) a case may leave: a log the one line points at
    may_leave: tuple = field(default_factory=tuple)


def write(path: Path, data, mode: str = "w") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as fh:
        fh.write(data)
    return str(path)


# ----------------------------------------------------------------------------- the workspace

def build_workspace(root: Path) -> dict:
    """Everything the cases read, under `root` (about 30 s on the 2-core box, most of it one embedding)."""
    import pandas as pd
    import yaml

    from notellm2.data_shards.catalog.synthetic import make_synthetic_views
    from notellm2.data_shards.mining.mine import MiningSettings, mine_pairs
    from notellm2.launcher.cli import main
    from tests.helpers.data import synthetic_shards
    from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir

    shard_dir, _ = synthetic_shards(root / "data", n_notes=40, n_categories=3, n_pairs=60, shard_size=16,
                                    image_size=32)
    cat = str(root / "data" / "catalog" / "notes.jsonl")
    views = make_synthetic_views(cat, str(root / "views.parquet"), n_users=30, seed=0)
    mine_pairs(views, root / "mined", MiningSettings(memory_limit="256MB", threads=1))
    llm = make_tiny_llm_dir(str(root / "models"), arch="llama", num_layers=2, hidden=32)
    clip = make_tiny_clip_dir(str(root / "models"), hidden=32, layers=1)
    run_cfg = {"model": {"variant": "notellm2", "llm": {"path": llm, "attn_implementation": "sdpa"},
                         "vision": {"kind": "hf", "path": clip, "image_size": 32},
                         "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32,
                                       "num_heads": 2},
                         "max_text_tokens": 16, "embed_dim": 8},
               "data": {"train_shards": os.path.join(shard_dir, "pairs-train-*.tar"),
                        "notes_shards": os.path.join(shard_dir, "notes-test-*.tar"), "num_workers": 0,
                        "pairs_per_rank": 4},
               "train": {"seed": 0, "ds_config": "ds_configs/cpu_zero3.json", "precision": "fp32",
                         "output_dir": str(root / "run"), "max_steps": 2, "collective_timeout_s": 120}}
    config = write(root / "run.yaml", yaml.safe_dump(run_cfg))
    assert main(["embed", "--config", config, "--out", str(root / "emb"), "--batch-size", "8",
                 "--num-workers", "0"]) == 0
    pd.DataFrame({"note_id": ["a"]}).to_parquet(root / "one_column.parquet")
    return {"root": str(root), "shards": shard_dir, "catalog": cat, "views": views, "pairs": str(root / "data" / "pairs"),
            "mined": str(root / "mined"), "llm": llm, "clip": clip, "config": config, "emb": str(root / "emb")}


# ----------------------------------------------------------------------------- helpers of the cases

def _ms_views(ws, d):
    import pandas as pd

    df = pd.read_parquet(ws["views"])
    df["timestamp"] = df["timestamp"] * 1000
    d.mkdir(parents=True, exist_ok=True)
    df.to_parquet(d / "views_ms.parquet")


def _other_catalog(ws, d):
    lines = [json.loads(x) for x in open(ws["catalog"])]
    write(d / "other.jsonl", "".join(json.dumps({**n, "note_id": "other-" + n["note_id"]}) + "\n" for n in lines))


def _nan_llm(ws, d):
    """The tiny LLM with NaN norms: a damaged model that embeds to NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(ws["llm"], d / "llm")
    name = next(n for n in os.listdir(d / "llm") if n.endswith(".safetensors"))
    weights = load_file(str(d / "llm" / name))
    save_file({k: torch.full_like(v, float("nan")) if "norm" in k else v for k, v in weights.items()},
              str(d / "llm" / name), metadata={"format": "pt"})


def _truncated_llm(ws, d):
    """The tiny LLM with its safetensors cut in half (a download that stopped)."""
    shutil.copytree(ws["llm"], d / "llm")
    name = next(n for n in os.listdir(d / "llm") if n.endswith(".safetensors"))
    with open(d / "llm" / name, "r+b") as fh:
        fh.truncate(os.path.getsize(d / "llm" / name) // 2)


def _unreadable_notes(ws, d):
    """A notes shard whose every note JSON lacks its title (each note unusable)."""
    from tests.helpers.shards import write_note_shards

    write_note_shards(str(d), [5], mutate=lambda s, i, smp: {**smp, "json": json.dumps({"note_id": f"n{i}"}).encode()})


def _garbage_jpegs(src: str, dst: Path) -> str:
    """A copy of the shard `src` whose every image member is garbage (same names, same samples)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tf, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            if m.name.endswith(".jpg"):
                data = b"\xff\xd8\xff not a jpeg " * 8
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    return str(dst)


def _nan_embeddings(ws, d):
    import numpy as np

    from notellm2.launcher.eval.evaluate import save_embeddings

    ids = [x.strip() for x in open(os.path.join(ws["emb"], "ids.txt")) if x.strip()]
    vectors = np.ones((len(ids), 4), np.float32)
    vectors[0] = np.nan
    save_embeddings(str(d / "emb_nan"), ids, vectors)


def _pairs_csv(ws, d, text: bytes):
    write(d / "train.csv", text, "wb")


def _empty_catalog(ws, d):
    write(d / "empty.jsonl", "")


def _folder_named(name):
    return lambda ws, d: (d / name).mkdir(parents=True)


def _file_named(name, text="x\n"):
    return lambda ws, d: write(d / name, text)


def _other_views(ws, d):
    from notellm2.data_shards.catalog.synthetic import make_synthetic_views

    d.mkdir(parents=True, exist_ok=True)
    make_synthetic_views(ws["catalog"], str(d / "views.parquet"), n_users=30, seed=1)


def _tiny_shard_set(ws, d):
    """A one-shard pairs set with 3 pairs (a batch of 4 per rank cannot be filled)."""
    from tests.helpers.shards import write_pair_shards

    write_pair_shards(str(d / "few"), [3])


def _corrupt_train_shards(ws, d):
    src = sorted(p for p in os.listdir(ws["shards"]) if p.startswith("pairs-train"))
    for name in src:
        _garbage_jpegs(os.path.join(ws["shards"], name), d / "bad" / name)


W = "--num-workers"


def _mine(ws, d, *extra):
    return ["data", "mine-pairs", "--views", ws["views"], "--out", str(d / "o"), "--quiet", *extra]


def _embed(ws, *extra):
    return ["embed", "--config", ws["config"], "--batch-size", "8", W, "0", *extra]


def _train(ws, *overrides):
    return ["train", "--config", ws["config"], *overrides]


# ----------------------------------------------------------------------------- the table

CASES = [
    # config ------------------------------------------------------------------------------------
    Case("config_unknown_key", "config", lambda ws, d: ["config", "--config", ws["config"], "model.nope=1"],
         ("notellm2 config:", "model.nope")),
    Case("config_bad_value", "config", lambda ws, d: ["config", "--config", ws["config"], "train.max_steps=-3"],
         ("train.max_steps",)),
    Case("config_not_yaml", "third_party", lambda ws, d: ["config", "--config", str(d / "bad.yaml")],
         ("{d}/bad.yaml", "not valid YAML"), prepare=_file_named("bad.yaml", "model: [unclosed\n")),
    Case("config_is_a_folder", "malformed_file", lambda ws, d: ["config", "--config", str(d / "cfg.yaml")],
         ("{d}/cfg.yaml",), prepare=_folder_named("cfg.yaml")),
    Case("config_missing", "missing_input", lambda ws, d: ["config", "--config", str(d / "none.yaml")],
         ("{d}/none.yaml", "does not exist")),
    # data validate -------------------------------------------------------------------------------
    Case("validate_missing_catalog", "missing_input",
         lambda ws, d: ["data", "validate", "--catalog", str(d / "none.jsonl"), "--no-progress"], ("{d}/none.jsonl",)),
    Case("validate_unknown_format", "malformed_file",
         lambda ws, d: ["data", "validate", "--catalog", str(d / "notes.txt"), "--no-progress"],
         ("{d}/notes.txt", "format"), prepare=_file_named("notes.txt")),
    Case("validate_workers_zero", "numeric_option",
         lambda ws, d: ["data", "validate", "--catalog", ws["catalog"], "--workers", "0"], ("--workers", "0")),
    Case("validate_csv_field_too_long", "third_party",
         lambda ws, d: ["data", "validate", "--catalog", str(d / "notes.csv"), "--no-progress"],
         ("{d}/notes.csv", "not a readable CSV row", "field larger than field limit"),
         prepare=lambda ws, d: write(d / "notes.csv", 'n1,"' + "x" * 200_000 + '",c,,cat\n')),
    # simulate-views ------------------------------------------------------------------------------
    Case("simulate_out_is_a_folder", "output_kind",
         lambda ws, d: ["data", "simulate-views", "--catalog", ws["catalog"], "--out", str(d / "v.parquet")],
         ("--out", "{d}/v.parquet", "is a folder"), prepare=_folder_named("v.parquet")),
    Case("simulate_p_in_category_nan", "numeric_option",
         lambda ws, d: ["data", "simulate-views", "--catalog", ws["catalog"], "--out", str(d / "v.parquet"),
                        "--p-in-category", "nan"], ("--p-in-category", "nan")),
    Case("simulate_zero_users", "numeric_option",
         lambda ws, d: ["data", "simulate-views", "--catalog", ws["catalog"], "--out", str(d / "v.parquet"),
                        "--users", "0"], ("--users", "0")),
    Case("simulate_unknown_extension", "output_kind",
         lambda ws, d: ["data", "simulate-views", "--catalog", ws["catalog"], "--out", str(d / "v.txt")],
         ("--out", "v.txt", ".parquet or .csv")),
    Case("simulate_over_other_views", "rerun_other",
         lambda ws, d: ["data", "simulate-views", "--catalog", ws["catalog"], "--out", ws["views"], "--seed", "5"],
         ("{ws}/views.parquet", "--overwrite")),
    Case("simulate_empty_catalog", "zero_rows",
         lambda ws, d: ["data", "simulate-views", "--catalog", str(d / "empty.jsonl"), "--out", str(d / "v.parquet")],
         ("{d}/empty.jsonl", "no note"), prepare=_empty_catalog),
    # mine-pairs ----------------------------------------------------------------------------------
    Case("mine_empty_csv", "third_party",
         lambda ws, d: ["data", "mine-pairs", "--views", str(d / "v.csv"), "--out", str(d / "o"), "--quiet"],
         ("{d}/v.csv", "the file is empty"), prepare=_file_named("v.csv", "")),
    Case("mine_csv_without_events", "third_party",
         lambda ws, d: ["data", "mine-pairs", "--views", str(d / "v.csv"), "--out", str(d / "o"), "--quiet"],
         ("{d}/v.csv", "has no events"), prepare=_file_named("v.csv", "user_id,note_id,timestamp\n")),
    Case("mine_missing_column", "third_party",
         lambda ws, d: ["data", "mine-pairs", "--views", str(ws["root"]) + "/one_column.parquet", "--out", str(d / "o"),
                        "--quiet"], ("one_column.parquet", "missing column", "user_id")),
    Case("mine_not_parquet", "third_party",
         lambda ws, d: ["data", "mine-pairs", "--views", str(d / "v.parquet"), "--out", str(d / "o"), "--quiet"],
         ("{d}/v.parquet", "cannot read the view log as PARQUET"), prepare=_file_named("v.parquet", "not parquet\n")),
    Case("mine_memory_limit_lots", "third_party",
         lambda ws, d: _mine(ws, d, "--memory-limit", "lots"), ("memory_limit", "lots")),
    Case("mine_min_score_nan", "numeric_option",
         lambda ws, d: _mine(ws, d, "--min-score", "nan"), ("--min-score", "nan")),
    Case("mine_window_inf", "numeric_option",
         lambda ws, d: _mine(ws, d, "--window-days", "inf"), ("--window-days", "inf")),
    Case("mine_test_fraction_one", "numeric_option",
         lambda ws, d: _mine(ws, d, "--test-fraction", "1"), ("--test-fraction", "1")),
    Case("mine_milliseconds", "timestamp_unit",
         lambda ws, d: ["data", "mine-pairs", "--views", str(d / "views_ms.parquet"), "--out", str(d / "o"), "--quiet"],
         ("{d}/views_ms.parquet", "--timestamp-unit ms"), prepare=_ms_views),
    Case("mine_out_is_a_file", "output_kind",
         lambda ws, d: _mine(ws, d), ("--out", "{d}/o", "is a file"), prepare=_file_named("o")),
    Case("mine_over_other_mining", "rerun_other",
         lambda ws, d: ["data", "mine-pairs", "--views", ws["views"], "--out", ws["mined"], "--quiet", "--top-k", "3",
                        "--memory-limit", "256MB", "--threads", "1"], ("{ws}/mined", "top_k 10 there, 3 now", "--overwrite")),
    Case("mine_other_log_over_mining", "rerun_other",
         lambda ws, d: ["data", "mine-pairs", "--views", str(d / "views.parquet"), "--out", ws["mined"], "--quiet",
                        "--memory-limit", "256MB", "--threads", "1"], ("{ws}/mined", "view_log_sha256 differs"),
         prepare=_other_views),
    Case("mine_no_pair", "zero_rows",
         lambda ws, d: _mine(ws, d, "--window-days", "0.00001"), ("views.parquet", "no related pair")),
    # write-shards --------------------------------------------------------------------------------
    Case("shards_catalog_of_other_ids", "zero_rows",
         lambda ws, d: ["data", "write-shards", "--pairs", ws["pairs"], "--catalog", str(d / "other.jsonl"), "--out",
                        str(d / "s"), "--no-progress", "--workers", "1"], ("pairs.parquet", "no pair to write"),
         prepare=_other_catalog),
    Case("shards_out_is_a_file", "output_kind",
         lambda ws, d: ["data", "write-shards", "--pairs", ws["pairs"], "--catalog", ws["catalog"], "--out", str(d / "s"),
                        "--no-progress"], ("--out", "{d}/s", "is a file"), prepare=_file_named("s")),
    Case("shards_over_other_set", "rerun_other",
         lambda ws, d: ["data", "write-shards", "--pairs", ws["pairs"], "--catalog", ws["catalog"], "--out", ws["shards"],
                        "--no-progress", "--workers", "1", "--shard-size", "7", "--image-size", "32"],
         ("{ws}/data/shards", "shard_size 16 there, 7 now", "--overwrite")),
    Case("shards_no_pairs_file", "missing_input",
         lambda ws, d: ["data", "write-shards", "--pairs", str(d), "--catalog", ws["catalog"], "--out", str(d / "s"),
                        "--no-progress"], ("{d}/pairs.parquet", "does not exist"), prepare=lambda ws, d: d.mkdir()),
    Case("shards_pairs_not_parquet", "malformed_file",
         lambda ws, d: ["data", "write-shards", "--pairs", str(d), "--catalog", ws["catalog"], "--out", str(d / "s"),
                        "--no-progress"], ("{d}/pairs.parquet", "cannot read as Parquet"),
         prepare=_file_named("pairs.parquet", "PAR1 garbage")),
    Case("shards_size_zero", "numeric_option",
         lambda ws, d: ["data", "write-shards", "--pairs", ws["pairs"], "--catalog", ws["catalog"], "--out", str(d / "s"),
                        "--shard-size", "0"], ("--shard-size", "0")),
    # import-pairs --------------------------------------------------------------------------------
    Case("import_score_inf", "nonfinite",
         lambda ws, d: ["data", "import-pairs", "--catalog", ws["catalog"], "--out", str(d / "o"), "--train",
                        str(d / "train.csv")], ("{d}/train.csv", "score is not finite"),
         prepare=lambda ws, d: _pairs_csv(ws, d, b"query_id,target_id,score\nn000000,n000001,inf\n")),
    Case("import_not_utf8", "third_party",
         lambda ws, d: ["data", "import-pairs", "--catalog", ws["catalog"], "--out", str(d / "o"), "--train",
                        str(d / "train.csv")], ("{d}/train.csv", "UTF-8"),
         prepare=lambda ws, d: _pairs_csv(ws, d, b"n000000,\xff\xfe\xfa\n")),
    Case("import_out_is_a_file", "output_kind",
         lambda ws, d: ["data", "import-pairs", "--catalog", ws["catalog"], "--out", str(d / "o"), "--train",
                        str(d / "train.csv")], ("--out", "{d}/o", "is a file"),
         prepare=lambda ws, d: (_pairs_csv(ws, d, b"n000000,n000001\n"), write(d / "o", "x"))),
    Case("import_over_mined_pairs", "rerun_other",
         lambda ws, d: ["data", "import-pairs", "--catalog", ws["catalog"], "--out", ws["mined"], "--train",
                        str(d / "train.csv")], ("{ws}/mined", "written_by", "--overwrite"),
         prepare=lambda ws, d: _pairs_csv(ws, d, b"n000000,n000001\n")),
    # note-stats, cache-vision --------------------------------------------------------------------
    Case("note_stats_no_manifest", "missing_input", lambda ws, d: ["data", "note-stats", "--shards", str(d)],
         ("{d}/manifest.json",), prepare=lambda ws, d: d.mkdir()),
    Case("cache_vision_batch_zero", "numeric_option",
         lambda ws, d: ["data", "cache-vision", "--config", ws["config"], "--out", str(d / "c"), "--batch-size", "0"],
         ("--batch-size", "0")),
    Case("cache_vision_out_exists", "rerun_other",
         lambda ws, d: ["data", "cache-vision", "--config", ws["config"], "--out", str(d / "c"), "--no-progress"],
         ("{d}/c", "--overwrite"), prepare=lambda ws, d: (d / "c").mkdir(parents=True)),
    # train (the checks before any model loads) ---------------------------------------------------
    Case("train_llm_path_missing", "backbone", lambda ws, d: _train(ws, f"model.llm.path={d}/no-llm"),
         ("model.llm.path", "{d}/no-llm")),
    Case("train_llm_path_not_a_model", "backbone", lambda ws, d: _train(ws, f"model.llm.path={d}"),
         ("model.llm.path", "no config.json"), prepare=lambda ws, d: d.mkdir()),
    Case("train_batch_larger_than_shards", "batch_too_large",
         lambda ws, d: _train(ws, f"data.train_shards={d}/few/pairs-train-*.tar"),
         ("data.pairs_per_rank", "pairs-train-000000.tar", "fewer than pairs_per_rank=4"), prepare=_tiny_shard_set),
    Case("train_on_notes_shards", "shard_kind",
         lambda ws, d: _train(ws, f"data.train_shards={ws['shards']}/notes-test-*.tar"),
         ("data.train_shards", "holds notes")),
    Case("train_shards_match_nothing", "missing_input",
         lambda ws, d: _train(ws, f"data.train_shards={d}/pairs-*.tar"), ("data.train_shards", "matches no file")),
    Case("train_max_steps_zero", "config", lambda ws, d: _train(ws, "train.max_steps=0"), ("train.max_steps",)),
    # embed ---------------------------------------------------------------------------------------
    Case("embed_pairs_shards", "shard_kind",
         lambda ws, d: _embed(ws, "--shards", f"{ws['shards']}/pairs-train-*.tar", "--out", str(d / "e")),
         ("--shards", "holds pairs", "notes")),
    Case("embed_out_is_a_file", "output_kind", lambda ws, d: _embed(ws, "--out", str(d / "e")),
         ("--out", "{d}/e", "is a file"), prepare=_file_named("e")),
    Case("embed_over_other_settings", "rerun_other", lambda ws, d: _embed(ws, "--out", ws["emb"], "--mode", "text"),
         ("{ws}/emb", "mode 'both' there, 'text' now", "--overwrite")),
    Case("embed_nan_model", "nonfinite",
         lambda ws, d: _embed(ws, f"model.llm.path={d}/llm", "--out", str(d / "e")),
         ("non-finite", "{d}/e"), prepare=_nan_llm),
    Case("embed_llm_weights_truncated", "third_party",
         lambda ws, d: _embed(ws, f"model.llm.path={d}/llm", "--out", str(d / "e")),
         ("model.llm.path", "{d}/llm", "SafetensorError"), prepare=_truncated_llm),
    Case("embed_every_note_unreadable", "zero_rows",
         lambda ws, d: _embed(ws, "--shards", f"{d}/notes-test-*.tar", "--out", str(d / "e")),
         ("embed", "no note of the shards could be embedded", "missing_field", "{d}/e"), prepare=_unreadable_notes),
    Case("embed_batch_zero", "numeric_option", lambda ws, d: _embed(ws, "--out", str(d / "e"), "--batch-size", "0"),
         ("--batch-size", "0")),
    Case("embed_workers_negative", "numeric_option",
         lambda ws, d: ["embed", "--config", ws["config"], "--out", str(d / "e"), "--num-workers", "-1"],
         ("--num-workers", "-1")),
    Case("embed_no_model", "missing_input", lambda ws, d: ["embed", "--out", str(d / "e")], ("--model",)),
    # export, plan, analyze -----------------------------------------------------------------------
    Case("export_no_checkpoint", "missing_input",
         lambda ws, d: ["export", "--run-dir", str(d / "run"), "--out", str(d / "x")], ("no complete checkpoint",)),
    Case("export_out_is_a_file", "output_kind",
         lambda ws, d: ["export", "--run-dir", str(d / "run"), "--out", str(d / "x")], ("--out", "{d}/x", "is a file"),
         prepare=_file_named("x")),
    Case("plan_zero_nodes", "numeric_option", lambda ws, d: ["plan", "--config", ws["config"], "--nodes", "0"],
         ("--nodes", "0")),
    Case("plan_memory_nan", "numeric_option",
         lambda ws, d: ["plan", "--config", ws["config"], "--gpu-memory-gib", "nan"], ("--gpu-memory-gib", "nan")),
    Case("analyze_batches_zero", "numeric_option",
         lambda ws, d: ["analyze", "attention", "--model", str(d), "--shards", "x.tar", "--out", str(d / "a"),
                        "--batches", "0"], ("--batches", "0")),
    Case("analyze_not_an_export", "missing_input",
         lambda ws, d: ["analyze", "attention", "--model", ws["emb"], "--shards", f"{ws['shards']}/pairs-val-*.tar",
                        "--out", str(d / "a")], ("--model", "{ws}/emb")),
    # eval, neighbors (their internals belong to the bench-eval branch) ------------------------------
    Case("eval_missing_embeddings", "missing_input",
         lambda ws, d: ["eval", "--embeddings", str(d / "none"), "--pairs", ws["pairs"], "--bootstrap", "10"],
         ("{d}/none",)),
    Case("eval_k_zero", "eval_k",
         lambda ws, d: ["eval", "--embeddings", ws["emb"], "--pairs", ws["pairs"], "--k", "0", "--bootstrap", "10"],
         ("--k", "0")),
    Case("eval_bootstrap_zero", "eval_bootstrap",
         lambda ws, d: ["eval", "--embeddings", ws["emb"], "--pairs", ws["pairs"], "--k", "5", "--bootstrap", "0"],
         ("--bootstrap", "0")),
    Case("eval_nan_embeddings", "nonfinite",
         lambda ws, d: ["eval", "--embeddings", str(d / "emb_nan"), "--pairs", ws["mined"], "--k", "5",
                        "--bootstrap", "10"], ("{d}/emb_nan", "NaN or inf"), prepare=_nan_embeddings),
    Case("write_notes_missing_catalog", "missing_input",
         lambda ws, d: ["data", "write-notes", "--catalog", str(d / "nope.jsonl"), "--out", str(d / "notes")],
         ("{d}/nope.jsonl",)),
    Case("index_build_missing_embeddings", "missing_input",
         lambda ws, d: ["index", "build", "--embeddings", str(d / "no_emb"), "--out", str(d / "ix")], ("{d}/no_emb",)),
    Case("index_build_k_zero", "numeric_option",
         lambda ws, d: ["index", "build", "--embeddings", ws["emb"], "--out", str(d / "ix"), "--k", "0"], ("--k", "0")),
    Case("index_update_missing_index", "missing_input",
         lambda ws, d: ["index", "update", "--index", str(d / "no_index"), "--embeddings", ws["emb"], "--out",
                        str(d / "ix")], ("{d}/no_index",)),
    Case("neighbors_k_zero", "eval_k",
         lambda ws, d: ["neighbors", "--embeddings", ws["emb"], "--k", "0", "--out", str(d / "r.parquet")],
         ("--k", "0")),
]
