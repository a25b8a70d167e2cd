"""Embedding export: notes shards -> L2-normalised vectors, one process or several ranks.

Each rank embeds its share of the notes (`data_shards.reader.NotesLoader` gives every note exactly
once across ranks); rank 0 gathers ids and vectors and writes `embeddings.npy`, `ids.txt` and
`embeddings.json` (see `launcher.evaluate.save_embeddings`).

The probe `mode` is one definition with the model's own: the loader renders each note with
`prompter.encode(note, mode)` and the batch goes through `note_model.encode(..., mode=mode)`
(modeling.encoder.PROBES). The image probe is only defined for a note with an image: a note without
one (or whose image could not be read) is left out of the output and counted in embeddings.json.
"""
from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from data_shards.batch import to_device
from data_shards.config import DataConfig
from data_shards.reader import NotesLoader
from launcher.distributed import gather_object
from launcher.evaluate import save_embeddings
from modeling.config import probe_unavailable
from modeling.prompts import MODES


def probe_encode(prompter, mode: str, note: dict) -> dict:
    """The notes loader's encode_fn for probe `mode` (module level: DataLoader workers pickle it).

    A note without an image has no image probe: it gets its text prompt with `has_image` False, and
    `embed_notes` drops the row (every row of an image-probe prompt has `has_image` True)."""
    if mode == "image" and not note.get("has_image"):
        return prompter.encode(note, "text")
    return prompter.encode(note, mode)


@torch.no_grad()
def embed_notes(note_model, vision_tower, prompter, shards, data_cfg: DataConfig, batch_size: int,
                mode: str = "both", rank: int = 0, world_size: int = 1, image_size: int = 224,
                progress: bool = True, skipped: dict | None = None) -> tuple[list[str], np.ndarray]:
    """This rank's (ids, vectors); dummy padding rows of the loader are dropped, and in the image probe
    the notes without an image (their count is added to `skipped["no_image"]` when given)."""
    if mode not in MODES:
        raise ValueError(f"embed mode {mode!r}: allowed {', '.join(MODES)}")
    why = probe_unavailable(prompter.variant, mode)
    if why:
        raise ValueError(f"embed --mode {mode}: {why}")
    loader = NotesLoader(shards, data_cfg, functools.partial(probe_encode, prompter, mode), prompter.collate,
                         rank=rank, world_size=world_size, batch_size=batch_size, image_size=image_size)
    note_model.eval()
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    bar = tqdm(loader, total=len(loader), desc=f"embed rank {rank}", disable=not progress or rank != 0,
               unit="batch")
    no_image = 0
    from modeling.vision import encode_images  # the one tower call of training, validation and embedding

    device = next(note_model.parameters()).device
    for batch in bar:
        batch = to_device(batch, device)  # uint8 pixels -> CLIP-normalised there, as in training
        # has_image: the prompter's word that image features enter this row (an <IMG> slot or the gate);
        # the frozen tower runs only for a batch that has such a row (never in the text probe).
        feeds = batch["has_image"]
        tokens = pooled = None
        if bool(feeds.any()):
            tokens, pooled = encode_images(vision_tower, batch)
        emb = note_model.encode(batch, tokens, pooled, mode=mode).float()
        keep = ~batch["is_dummy"]
        if mode == "image":
            no_image += int((keep & ~feeds).sum())
            keep = keep & feeds
        vectors.append(emb[keep].cpu().numpy())
        ids.extend(s for s, k in zip(batch["note_id_strs"], keep.tolist()) if k)
    if skipped is not None:
        skipped["no_image"] = skipped.get("no_image", 0) + no_image
    dim = vectors[0].shape[1] if vectors else 0
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))


def gather_to_rank0(ids: list[str], vectors: np.ndarray, left_out: int = 0):
    """All ranks' (ids, vectors, summed left_out) on rank 0 (None elsewhere); identity without
    torch.distributed."""
    parts = gather_object((ids, vectors, left_out), dst=0)
    if parts is None:
        return None
    all_ids = [i for p in parts for i in p[0]]
    return all_ids, np.concatenate([p[1] for p in parts]), sum(p[2] for p in parts)


def run_embed(note_model, vision_tower, prompter, shards, out_dir: str, data_cfg: DataConfig, batch_size: int,
              mode: str, rank: int, world_size: int, image_size: int, meta: dict) -> int:
    t0 = time.time()
    skipped = {"no_image": 0}
    ids, vectors = embed_notes(note_model, vision_tower, prompter, shards, data_cfg, batch_size, mode, rank,
                               world_size, image_size, skipped=skipped)
    gathered = gather_to_rank0(ids, vectors, skipped["no_image"])
    if gathered is not None:
        all_ids, all_vec, no_image = gathered
        if len(set(all_ids)) != len(all_ids):
            raise RuntimeError(f"embed: {len(all_ids) - len(set(all_ids))} notes were embedded twice")
        info = {"mode": mode, "world_size": world_size, **meta}
        if mode == "image":
            info["left_out_no_image"] = no_image
        save_embeddings(out_dir, all_ids, all_vec, info)
        print(f"embedded {len(all_ids)} notes ({all_vec.shape[1] if all_vec.ndim == 2 else 0} dims, mode {mode}) "
              f"in {time.time() - t0:.1f} s -> {os.path.abspath(out_dir)}")
        if mode == "image" and no_image:
            print(f"left out {no_image} notes without a usable image (the image probe needs one)")
    return 0
