"""Embedding export: notes shards -> L2-normalised vectors, one process or several ranks.

Each rank embeds its share of the notes (`data_shards.reader.NotesLoader` gives every note exactly
once across ranks); rank 0 gathers ids and vectors and writes `embeddings.npy`, `ids.txt` and
`embeddings.json` (see `launcher.evaluate.save_embeddings`).

The probe `mode` is one definition with the model's own: the loader renders each note with
`prompter.encode(note, mode)` and the batch goes through `note_model.encode(..., mode=mode)`
(modeling.names.PROBES). The image probe is only defined for a note with an image: a note without
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
from launcher.errors import UserError
from modeling.names import PROBE_MODES, probe_unavailable


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
                progress: bool = True, skipped: dict | None = None,
                max_notes: int | None = None, image_features=None,
                visual_out: list | None = None) -> tuple[list[str], np.ndarray]:
    """This rank's (ids, vectors); dummy padding rows of the loader are dropped, and in the image probe
    the notes without an image (their count is added to `skipped["no_image"]` when given).
    `image_features(cpu_batch, device_batch) -> (tokens, pooled)` replaces the tower call when given
    (the in-training evaluation's launcher.validation.TowerMemo). `visual_out` (mode both, mICL
    variants): gets (ids, vectors) of the image probe read from the same forward
    (NoteModel.encode_with_visual), for the notes with an image."""
    if mode not in PROBE_MODES:
        raise ValueError(f"embed mode {mode!r}: allowed {', '.join(PROBE_MODES)}")
    why = probe_unavailable(prompter.variant, mode)
    if why:
        raise ValueError(f"embed --mode {mode}: {why}")
    loader = NotesLoader(shards, data_cfg, functools.partial(probe_encode, prompter, mode), prompter.collate,
                         rank=rank, world_size=world_size, batch_size=batch_size, image_size=image_size,
                         max_notes=max_notes)
    note_model.eval()
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    bar = tqdm(loader, total=len(loader), desc=f"embed rank {rank}", disable=not progress or rank != 0,
               unit="batch")
    no_image = 0
    from modeling.vision import encode_images  # the one tower call of training, validation and embedding

    device = next(note_model.parameters()).device  # under ZeRO-3 a partitioned parameter still sits on the rank's device
    for cpu_batch in bar:
        batch = to_device(cpu_batch, device)  # uint8 pixels -> CLIP-normalised there, as in training
        # has_image: the prompter's word that image features enter this row (an <IMG> slot or the gate).
        # The tower runs for every batch but the text probe's, even one without such a row: then the
        # model still calls its connector and gate (with zero effect), so that every rank calls the same
        # modules in the same order, which ZeRO-3's parameter gathers need (in-training evaluation).
        feeds = batch["has_image"]
        tokens = pooled = None
        if mode != "text":
            tokens, pooled = (image_features(cpu_batch, batch) if image_features is not None
                              else encode_images(vision_tower, batch))
        keep = ~batch["is_dummy"]
        if visual_out is not None:
            emb, vis = note_model.encode_with_visual(batch, tokens, pooled)
            emb, with_image = emb.float(), keep & feeds
            visual_out.append(([s for s, k in zip(batch["note_id_strs"], with_image.tolist()) if k],
                               vis.float()[with_image].cpu().numpy()))
        else:
            emb = note_model.encode(batch, tokens, pooled, mode=mode).float()
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


# Ranks wait for each other only at the final gather; the slowest rank's whole share must fit in it.
EMBED_COLLECTIVE_TIMEOUT_S = 1800  # torch's default, what embed had before


def embed_variant(model_dir: str | None, cfg) -> str:
    """The variant `notellm2 embed` would embed with: the export's (reads only its JSON) or the config's."""
    from launcher.serving import read_export_config

    if model_dir:
        return read_export_config(model_dir).model.variant
    if cfg is None:
        raise UserError("give --model EXPORT_DIR, or --config for the untrained baseline")
    return cfg.model.variant


def load_embedder(model_dir: str | None, cfg, config_path: str | None = None):
    """(note_model, vision_tower, prompter, image_size, source) for `notellm2 embed`: the export in
    `model_dir` (through the serving encoder), or the untrained model `cfg` describes (the zero-shot
    baseline; its new modules are drawn from cfg.train.seed, the same on every rank and run)."""
    if model_dir:
        from launcher.serving import NoteEncoder

        enc = NoteEncoder.from_pretrained(model_dir)
        return enc.note_model, enc.vision_tower, enc.prompter, enc.image_size, {"model": os.path.abspath(model_dir)}
    from modeling.encoder import build_all

    torch.manual_seed(cfg.train.seed)
    note_model, tower, prompter = build_all(cfg.model, cfg.loss)
    source = {"model": "untrained", "config": os.path.abspath(config_path) if config_path else None}
    return note_model, tower, prompter, cfg.model.vision.image_size, source


def embed_command(model_dir: str | None, cfg, config_path: str | None, shards: str | None, out_dir: str,
                  mode: str = "both", batch_size: int = 32, num_workers: int = 1) -> int:
    """`notellm2 embed`: the user's mistakes are refused before any rank starts or loads a model; then
    every rank (torchrun / srun, or one process) embeds its share and rank 0 writes `out_dir`."""
    from launcher import distributed

    distributed.enable_crash_traces()  # a native crash prints every thread's stack into this rank's log
    variant = embed_variant(model_dir, cfg)
    why = probe_unavailable(variant, mode)
    if why:
        raise UserError(f"--mode {mode}: {why}; use --mode text or --mode both")
    shards = shards or (None if model_dir or cfg is None else cfg.data.notes_shards)
    if not shards:
        raise UserError("no notes shards (--shards, or data.notes_shards in the config)")
    data_cfg = DataConfig(num_workers=num_workers) if model_dir else cfg.data
    topo = distributed.detect_topology()
    if topo.world_size > 1:
        # The trainer's start-up (the rank's CUDA device is set before the group starts under NCCL),
        # before anything below touches CUDA; DeepSpeed's comm layer is not needed here.
        distributed.init_distributed(topo, timeout_s=EMBED_COLLECTIVE_TIMEOUT_S, deepspeed_comm=False)
    note_model, tower, prompter, image_size, source = load_embedder(model_dir, cfg, config_path)
    rc = run_embed(note_model, tower, prompter, shards, out_dir, data_cfg, batch_size, mode,
                   topo.rank, topo.world_size, image_size, source)
    distributed.shutdown()
    return rc
