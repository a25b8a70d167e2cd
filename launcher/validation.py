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
