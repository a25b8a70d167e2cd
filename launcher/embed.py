"""Embedding export: notes shards -> L2-normalised vectors, one process or several ranks.

Each rank embeds its share of the notes (`data_shards.reader.NotesLoader` gives every note exactly
once across ranks); rank 0 gathers ids and vectors and writes `embeddings.npy`, `ids.txt` and
`embeddings.json` (see `launcher.evaluate.save_embeddings`).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
from tqdm import tqdm

from data_shards.config import DataConfig
from data_shards.reader import NotesLoader
from launcher.distributed import gather_object
from launcher.evaluate import save_embeddings
from modeling.prompts import MODES


@torch.no_grad()
def embed_notes(note_model, vision_tower, prompter, shards, data_cfg: DataConfig, batch_size: int,
                mode: str = "both", rank: int = 0, world_size: int = 1, image_size: int = 224,
                progress: bool = True) -> tuple[list[str], np.ndarray]:
    """This rank's (ids, vectors); dummy padding rows of the loader are dropped."""
    if mode not in MODES:
        raise ValueError(f"embed mode {mode!r}: allowed {', '.join(MODES)}")
    loader = NotesLoader(shards, data_cfg, prompter.encode, prompter.collate, rank=rank, world_size=world_size,
                         batch_size=batch_size, image_size=image_size)
    note_model.eval()
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    bar = tqdm(loader, total=len(loader), desc=f"embed rank {rank}", disable=not progress or rank != 0,
               unit="batch")
    for batch in bar:
        tokens = pooled = None
        if vision_tower is not None and "pixel_values" in batch:
            tokens, pooled = vision_tower(batch["pixel_values"])
        emb = note_model.encode(batch, tokens, pooled, mode=mode).float()
        keep = ~batch["is_dummy"]
        vectors.append(emb[keep].cpu().numpy())
        ids.extend(s for s, k in zip(batch["note_id_strs"], keep.tolist()) if k)
    dim = vectors[0].shape[1] if vectors else 0
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))


def gather_to_rank0(ids: list[str], vectors: np.ndarray):
    """All ranks' (ids, vectors) on rank 0 (None elsewhere); identity without torch.distributed."""
    parts = gather_object((ids, vectors), dst=0)
    if parts is None:
        return None
    all_ids = [i for p in parts for i in p[0]]
    return all_ids, np.concatenate([p[1] for p in parts])


def run_embed(note_model, vision_tower, prompter, shards, out_dir: str, data_cfg: DataConfig, batch_size: int,
              mode: str, rank: int, world_size: int, image_size: int, meta: dict) -> int:
    t0 = time.time()
    ids, vectors = embed_notes(note_model, vision_tower, prompter, shards, data_cfg, batch_size, mode, rank,
                               world_size, image_size)
    gathered = gather_to_rank0(ids, vectors)
    if gathered is not None:
        all_ids, all_vec = gathered
        if len(set(all_ids)) != len(all_ids):
            raise RuntimeError(f"embed: {len(all_ids) - len(set(all_ids))} notes were embedded twice")
        save_embeddings(out_dir, all_ids, all_vec, {"mode": mode, "world_size": world_size, **meta})
        print(f"embedded {len(all_ids)} notes ({all_vec.shape[1] if all_vec.ndim == 2 else 0} dims, mode {mode}) "
              f"in {time.time() - t0:.1f} s -> {os.path.abspath(out_dir)}")
    return 0
