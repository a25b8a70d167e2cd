"""Functions run in every rank by tests.helpers.multirank.run_ranks (gloo already initialised)."""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import NotesLoader, PairLoader
from tests.helpers.shards import CharCollate, CharEncoder


def _gathered_ids(note_ids: torch.Tensor) -> list:
    """What the loss does each step: all_gather the batch's ids (equal shapes on every rank)."""
    out = [torch.empty_like(note_ids) for _ in range(dist.get_world_size())]
    dist.all_gather(out, note_ids)
    return out


def pair_epochs(pair_dir: str, notes_dir: str, B: int, notes_B: int, num_workers: int, epochs: int, take: int) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(num_workers=num_workers, shuffle_buffer=4)
    loader = PairLoader(f"{pair_dir}/pairs-train-*.tar", data_cfg=cfg, encode_fn=CharEncoder(),
                        collate_text_fn=CharCollate(), rank=rank, world_size=world, pairs_per_rank=B, image_size=32)
    out = {"epochs": []}
    for _ in range(epochs):
        planned = loader.batches_per_epoch
        keys = []
        for batch in loader:
            _gathered_ids(batch["note_ids"])  # a rank with fewer batches would leave the other one hanging here
            keys.extend(batch["sample_keys"])
        out["epochs"].append({"planned": planned, "keys": keys})
    out["stats"] = loader.stats()

    # a second run: take a few batches and save the position (for the world-size change test)
    again = PairLoader(f"{pair_dir}/pairs-train-*.tar", data_cfg=cfg, encode_fn=CharEncoder(),
                       collate_text_fn=CharCollate(), rank=rank, world_size=world, pairs_per_rank=B, image_size=32)
    out["taken_keys"] = [k for b in itertools.islice(iter(again), take) for k in b["sample_keys"]]
    out["state"] = again.state_dict()

    notes = NotesLoader(f"{notes_dir}/notes-test-*.tar", cfg, CharEncoder(), CharCollate(), rank=rank,
                        world_size=world, batch_size=notes_B, image_size=32)
    ids, rows, n = [], 0, 0
    for batch in notes:
        _gathered_ids(batch["note_ids"])
        rows += len(batch["note_id_strs"])
        n += 1
        ids.extend(s for s, dummy in zip(batch["note_id_strs"], batch["is_dummy"].tolist()) if not dummy)
    out["notes"] = {"batches": n, "len": len(notes), "rows": rows, "ids": ids}
    return out
