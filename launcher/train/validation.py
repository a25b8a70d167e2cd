"""The validation loss every `eval.every_steps` steps: one pass over the validation pairs."""
from __future__ import annotations

import hashlib
from typing import Callable, Optional

import torch

from notellm2.data_shards.batch import to_device
from notellm2.launcher.train.components import Components
from notellm2.launcher.distributed import all_reduce
from notellm2.modeling.vision import encode_images


class TowerMemo:
    """The frozen tower's outputs for the evaluation's batches, kept for the whole run.

    Every evaluation reads the same val pairs and the same retrieval slice again, and the tower is
    frozen, so its outputs for a batch never change: it was most of an evaluation's time on the demo
    model (docs/training.md). A batch is served stored features only when its note ids *and* a digest
    of its uint8 pixels equal those of the batch that produced them, so a changed image (a random
    flip, another slice) is computed live. Features are held on the CPU (`eval.tower_memo_mb` bounds
    them; past the bound new batches are computed live every time) and moved to the batch's device.
    A batch the loader already serves with cached features (no pixels) goes through unchanged."""

    def __init__(self, tower, max_mb: float):
        self.tower = tower
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self.store: dict = {}
        self.hits = self.misses = 0

    def __call__(self, cpu_batch: dict, batch: dict, cast=None):
        pixels = cpu_batch.get("pixel_values")
        if self.tower is None or pixels is None or self.max_bytes <= 0:
            return encode_images(self.tower, batch, cast)
        digest = hashlib.blake2b(pixels.numpy().tobytes(), digest_size=16).digest()
        key = (tuple(cpu_batch["note_id_strs"]), digest)
        hit = self.store.get(key)
        if hit is None:
            self.misses += 1
            tokens, pooled = encode_images(self.tower, batch)
            size = sum(t.numel() * t.element_size() for t in (tokens, pooled) if t is not None)
            if self.bytes + size <= self.max_bytes:
                self.store[key] = tuple(None if t is None else t.detach().to("cpu", copy=True) for t in (tokens, pooled))
                self.bytes += size
        else:
            self.hits += 1
            device = batch["pixel_values"].device
            tokens, pooled = (None if t is None else t.to(device) for t in hit)
        if cast is not None:
            tokens, pooled = (None if t is None else t.to(cast) for t in (tokens, pooled))
        return tokens, pooled


def validation_loss(engine, comps: Components, device, cast, tick: Callable[[], None],
                    memo: Optional[TowerMemo] = None) -> dict:
    """Mean loss (and mICL parts) over one pass of the validation pairs, averaged over ranks.
    In-batch negatives come from the validation batch, as in training."""
    engine.module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, loss_mm, loss_vis, batches
    try:
        with torch.no_grad():
            for cpu_batch in comps.make_val_loader():
                tick()
                batch = to_device(cpu_batch, device)
                image_tokens, image_pooled = (memo(cpu_batch, batch, cast) if memo is not None
                                              else encode_images(comps.vision_tower, batch, cast))
                out = engine(batch, image_tokens=image_tokens, image_pooled=image_pooled)
                for i, key in enumerate(("loss", "loss_mm", "loss_vis")):
                    if out.get(key) is not None:
                        sums[i] += float(out[key].float())
                sums[3] += 1
    finally:
        engine.module.train()
    all_reduce(sums)
    if sums[3] == 0:
        return {}
    result = {"val_loss": (sums[0] / sums[3]).item()}
    if sums[1] != 0:
        result["val_loss_mm"] = (sums[1] / sums[3]).item()
        result["val_loss_vis"] = (sums[2] / sums[3]).item()
    return result


def retrieval_metrics(engine, comps: Components, cfg, rank: int, world_size: int, tick: Callable[[], None],
                      val_pairs: list, memo: Optional[TowerMemo] = None) -> dict:
    """Recall@K on the val slice (eval.notes_shards, its first eval.max_notes notes) for each probe of
    eval.probes the variant has: `recall@K` for the full input, `<probe>_recall@K` for the others.

    Every rank embeds its part of the slice through the engine's module (the same number of batches on
    every rank, so ZeRO-3's parameter gathers line up), the parts are all-gathered, and every rank
    computes the same figures, so that a keep_best decision is the same everywhere. `val_pairs`: the
    (query_id, target_id) val pairs; those with both notes in the slice are ranked among the slice's
    notes (the all-pairs protocol of launcher/eval/evaluate.py)."""
    import numpy as np

    from notellm2.launcher.distributed import all_gather_object
    from notellm2.launcher.eval.embed import embed_notes
    from notellm2.launcher.eval.evaluate import recall_at_k
    from notellm2.modeling.names import probe_unavailable

    from notellm2.modeling.names import variant_spec

    model = engine.module
    probes = [p for p in cfg.eval.probes if not probe_unavailable(model.variant, p)]
    # mICL: the image probe is the visual representation of the full input's own forward
    # (NoteModel.encode_with_visual), so one pass over the slice gives both figures
    shared = variant_spec(model.variant).micl and {"both", "image"} <= set(probes)
    vectors: dict = {}
    try:
        for probe in probes:
            if probe in vectors:
                continue
            tick()
            visual: Optional[list] = [] if shared and probe == "both" else None
            vectors[probe] = embed_notes(model, comps.vision_tower, comps.prompter, cfg.eval.notes_shards, cfg.data,
                                         cfg.eval.batch_size, probe, rank, world_size, cfg.model.vision.image_size,
                                         progress=False, max_notes=cfg.eval.max_notes, image_features=memo,
                                         visual_out=visual)
            if visual is not None:
                vis_ids = [i for part_ids, _ in visual for i in part_ids]
                dim = vectors[probe][1].shape[1]
                vis = np.concatenate([v for _, v in visual]) if visual else np.zeros((0, dim), np.float32)
                vectors["image"] = (vis_ids, vis)
    finally:
        model.train()
    out = {}
    for probe in probes:
        parts = all_gather_object(vectors[probe])
        all_ids = [i for p in parts for i in p[0]]
        emb = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        ks = [k for k in cfg.eval.k_values if k < len(all_ids)] or [max(1, len(all_ids) - 1)]
        try:
            report = recall_at_k(emb, all_ids, val_pairs, ks)
        except ValueError:  # no val pair has both notes in the slice (e.g. the image probe's pool)
            continue
        prefix = "" if probe == "both" else f"{probe}_"
        for k, v in report.recall.items():
            out[f"{prefix}recall@{k}"] = v
        out[f"{prefix}retrieval_pairs"] = float(report.num_pairs)
    return out


def read_val_pairs(cfg) -> list:
    """The val pairs of eval.pairs, in file order (a clear one-line error when the file is missing)."""
    from notellm2.data_shards.mining.pairs_file import read_pairs

    df = read_pairs(cfg.eval.pairs, split="val", columns=["query_id", "target_id", "split"])
    return list(zip(df["query_id"].astype(str), df["target_id"].astype(str)))
