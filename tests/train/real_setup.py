"""Builds the real pieces for the engine's end-to-end tests: a tiny Llama (hidden 64, 2 layers) with
a SentencePiece tokenizer trained here, a tiny CLIP, synthetic catalog -> pairs -> WebDataset shards,
and a run YAML. Nothing is downloaded."""
from __future__ import annotations

import os

import yaml

from tests.fixtures import make_tiny_clip_dir, make_tiny_llm_dir
from tests.fixtures_data import synthetic_shards


def build_inputs(root: str) -> dict:
    os.makedirs(root, exist_ok=True)
    llm = make_tiny_llm_dir(root, arch="llama", num_layers=2, hidden=64)
    clip = make_tiny_clip_dir(root, hidden=32, layers=2)
    shard_dir, manifest = synthetic_shards(os.path.join(root, "data"), n_notes=80, n_categories=4, n_pairs=160,
                                           shard_size=8, image_size=32, splits=("train", "val"))
    pattern = os.path.join(shard_dir, manifest["patterns"]["pairs-train"])
    val = os.path.join(shard_dir, manifest["patterns"]["pairs-val"])
    return {"llm": llm, "clip": clip, "train_shards": pattern, "val_shards": val}


def write_config(path: str, inputs: dict, run_dir: str, **train) -> str:
    cfg = {
        "name": "engine-e2e",
        "data": {"train_shards": inputs["train_shards"], "val_shards": inputs["val_shards"], "pairs_per_rank": 4, "num_workers": 1,
                 "shuffle_buffer": 16, "seed": 3},
        "model": {"variant": "notellm2", "llm": {"path": inputs["llm"], "attn_implementation": "sdpa"},
                  "vision": {"kind": "hf", "path": inputs["clip"], "image_size": 32},
                  "connector": {"kind": "qformer", "num_query_tokens": 4, "num_layers": 1, "hidden_size": 32,
                                "num_heads": 4},
                  "max_text_tokens": 24, "embed_dim": 16},
        "train": {"output_dir": run_dir, "ds_config": "ds_configs/cpu_zero3.json", "max_steps": 4,
                  "lr_llm": 1e-3, "lr_new": 3e-3, "warmup_steps": 1, "precision": "bf16",
                  "collective_timeout_s": 120, **train},
        "checkpoint": {"every_steps": 2, "keep_last": 3},
        "eval": {"every_steps": 2},
    }
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    return path
