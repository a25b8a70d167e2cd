"""The one PairLoader builder of the reader tests (it replaces test_reader's make_loader, test_bad_input's
loader_for and test_pixel_slots' pair_loader, which differed only in their defaults).

    loader = pair_loader(pattern, B=4, image_size=32, num_workers=2, bad_sample_policy="drop")

Keyword arguments that are DataConfig fields build the DataConfig (defaults here: num_workers=0,
shuffle_buffer=8, in-process and small); any other keyword goes to PairLoader itself. The text side is
the char-level test double (CharEncoder / CharCollate) unless encode_fn / collate_text_fn are given.
"""
from __future__ import annotations

import dataclasses


def pair_loader(shards, B: int = 4, image_size: int = 32, rank: int = 0, world_size: int = 1, manifest=None, *,
                encode_fn=None, collate_text_fn=None, **options):
    from notellm2.data_shards.config import DataConfig
    from notellm2.data_shards.reader import PairLoader
    from tests.helpers.shards import CharCollate, CharEncoder

    fields = {f.name for f in dataclasses.fields(DataConfig)}
    data = {"num_workers": 0, "shuffle_buffer": 8, **{k: v for k, v in options.items() if k in fields}}
    extra = {k: v for k, v in options.items() if k not in fields}
    return PairLoader(shards, manifest, data_cfg=DataConfig(**data), encode_fn=encode_fn or CharEncoder(),
                      collate_text_fn=collate_text_fn or CharCollate(), rank=rank, world_size=world_size,
                      pairs_per_rank=B, image_size=image_size, **extra)
