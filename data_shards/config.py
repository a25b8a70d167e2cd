"""Configuration dataclasses owned by the data_shards package (validated by `notellm2.launcher.config`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# The decoder's pixel limit: a larger image counts as bad (a decompression bomb is refused from its header,
# before any pixel is decoded). The default of every option, key and function that takes a limit.
MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class DataConfig:
    # Brace-expandable shard patterns, e.g. "data/shards/pairs-train-{000000..000009}.tar".
    train_shards: str = ""
    val_shards: str = ""
    # Notes-only shards (one note per sample) used for embedding and evaluation.
    notes_shards: str = ""
    # Pairs per rank per micro-step (each pair gives 2 notes: query and target).
    pairs_per_rank: int = field(default=16, metadata={"check": lambda v: v > 0, "allowed": "an integer > 0"})
    num_workers: int = field(default=2, metadata={"check": lambda v: v >= 0, "allowed": "an integer >= 0"})
    shuffle_buffer: int = field(default=1000, metadata={"check": lambda v: v >= 0, "allowed": "an integer >= 0"})
    seed: int = 0
    # Sample shards with replacement (endless stream) instead of epochs over the shard list.
    resampled: bool = False
    # What happens to a pair whose image cannot be decoded or whose sample is malformed.
    bad_sample_policy: Literal["drop", "blank_image"] = "drop"
    # Images with more pixels than this are rejected before decoding (decompression-bomb guard).
    max_image_pixels: int = field(default=MAX_IMAGE_PIXELS, metadata={"check": lambda v: v > 0, "allowed": "an integer > 0"})
    random_flip: bool = False
    # Loader workers hand pixels over through a few reused shared-memory buffers per worker instead of
    # fresh shared memory per batch (docs/reader.md, "Moving pixels"); off only to compare or debug.
    pixel_slots: bool = True
    # How loader workers start: "fork" (the default: cheapest, inherits the shard index) or a fresh
    # interpreter per worker ("forkserver", "spawn"), for hosts where forking a threaded process is unsafe.
    worker_start_method: Literal["fork", "forkserver", "spawn"] = "fork"
    # A frozen-tower feature cache written by `notellm2 data cache-vision` (docs/reader.md, "The vision
    # cache"): the loaders serve its features instead of pixels and the tower is not run. null: pixels.
    vision_cache: Optional[str] = None
