"""The tiny embedding set-up the embed tests share: a 2-layer llama, a 1-layer CLIP tower, 30 notes
in 7-note test shards, and a notellm2 config that names them."""
from __future__ import annotations

import os

import yaml

from tests.helpers.data import synthetic_shards
from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir


def tiny_embed_setup(root) -> dict:
    """{"root", "config" (a YAML path), "notes" (how many), "shards" (the notes pattern)}."""
    llm = make_tiny_llm_dir(str(root), arch="llama", num_layers=2, hidden=32)
    clip = make_tiny_clip_dir(str(root), hidden=32, layers=1)
    shard_dir, manifest = synthetic_shards(str(root / "data"), n_notes=30, n_categories=3, n_pairs=40,
                                           shard_size=7, image_size=32, splits=("test",))
    cfg = {"model": {"variant": "notellm2", "llm": {"path": llm, "attn_implementation": "sdpa"},
                     "vision": {"kind": "hf", "path": clip, "image_size": 32},
                     "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32,
                                   "num_heads": 2},
                     "max_text_tokens": 16, "embed_dim": 8},
           "data": {"notes_shards": os.path.join(shard_dir, "notes-test-*.tar"), "num_workers": 0},
           "train": {"seed": 0}}
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    notes = sum(s["count"] for s in manifest["shards"] if s["kind"] == "notes")
    return {"root": root, "config": str(path), "notes": notes, "shards": cfg["data"]["notes_shards"]}
