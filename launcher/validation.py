"""The validation loss every `eval.every_steps` steps: one pass over the validation pairs."""
from __future__ import annotations

from typing import Callable

import torch

from data_shards.batch import to_device
from launcher.components import Components
from launcher.distributed import all_reduce
from modeling.vision import encode_images


def validation_loss(engine, comps: Components, device, cast, tick: Callable[[], None]) -> dict:
    """Mean loss (and mICL parts) over one pass of the validation pairs, averaged over ranks.
    In-batch negatives come from the validation batch, as in training."""
    engine.module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, loss_mm, loss_vis, batches
    try:
        with torch.no_grad():
            for batch in comps.make_val_loader():
                tick()
                batch = to_device(batch, device)
                image_tokens, image_pooled = encode_images(comps.vision_tower, batch, cast)
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
                      val_pairs: list) -> dict:
    """Recall@K on the val slice (eval.notes_shards, its first eval.max_notes notes) for each probe of
    eval.probes the variant has: `recall@K` for the full input, `<probe>_recall@K` for the others.

    Every rank embeds its part of the slice through the engine's module (the same number of batches on
    every rank, so ZeRO-3's parameter gathers line up), the parts are all-gathered, and every rank
    computes the same figures, so that a keep_best decision is the same everywhere. `val_pairs`: the
    (query_id, target_id) val pairs; those with both notes in the slice are ranked among the slice's
    notes (the all-pairs protocol of launcher/evaluate.py)."""
    import numpy as np

    from launcher.distributed import all_gather_object
    from launcher.embed import embed_notes
    from launcher.evaluate import recall_at_k
    from modeling.names import probe_unavailable

    model = engine.module
    out = {}
    try:
        for probe in cfg.eval.probes:
            if probe_unavailable(model.variant, probe):
                continue
            tick()
            ids, vecs = embed_notes(model, comps.vision_tower, comps.prompter, cfg.eval.notes_shards, cfg.data,
                                    cfg.eval.batch_size, probe, rank, world_size, cfg.model.vision.image_size,
                                    progress=False, max_notes=cfg.eval.max_notes)
            parts = all_gather_object((ids, vecs))
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
    finally:
        model.train()
    return out


def read_val_pairs(cfg) -> list:
    """The val pairs of eval.pairs, in file order (a clear one-line error when the file is missing)."""
    from data_shards.pairs_file import read_pairs

    df = read_pairs(cfg.eval.pairs, split="val", columns=["query_id", "target_id", "split"])
    return list(zip(df["query_id"].astype(str), df["target_id"].astype(str)))
