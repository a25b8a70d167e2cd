"""Builds the real pieces for the engine's end-to-end tests: a tiny Llama (hidden 64, 2 layers) with
a SentencePiece tokenizer trained here, a tiny CLIP, synthetic catalog -> pairs -> WebDataset shards,
and a run YAML (configs/tiny_cpu.yaml plus overrides). Nothing is downloaded."""
from __future__ import annotations

import os

from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
from tests.helpers.data import synthetic_shards
from tests.helpers.configs import write_tiny_config


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
    """configs/tiny_cpu.yaml with these inputs, bf16, 4 steps, checkpoints and validation every 2 steps."""
    values = {
        "name": "engine-e2e",
        "data.train_shards": inputs["train_shards"], "data.val_shards": inputs["val_shards"], "data.seed": 3,
        "model.llm.path": inputs["llm"], "model.vision.path": inputs["clip"], "model.connector.num_heads": 4,
        "model.max_text_tokens": 24,
        "train.output_dir": run_dir, "train.max_steps": 4, "train.lr_llm": 1e-3, "train.lr_new": 3e-3,
        "train.warmup_steps": 1, "train.precision": "bf16", **{f"train.{k}": v for k, v in train.items()},
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 3, "eval.every_steps": 2,
    }
    return write_tiny_config(path, values)
