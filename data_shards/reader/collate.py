"""Turning decoded notes into batch tensors (runs inside the loader workers).

A pair batch holds N = 2B rows: the B queries first, then the B targets, so that row i (a query)
is paired with row B + i (its target). A notes batch holds one row per note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from PIL import Image

from notellm2.data_shards.ids import note_id_hash
from notellm2.data_shards.images import center_crop, resize_shorter_side

# note id hash used for padding rows of the notes loader (real hashes are never negative)
DUMMY_NOTE_ID = -1


@dataclass
class NoteItem:
    """One note ready for collation: its text encoding (from encode_fn) and its image tensor."""
    note_id: str
    encoding: dict
    pixels: Optional[Image.Image]  # RGB, already S x S (see prepare_image), or None: no usable image
    is_dummy: bool = False
    # with a vision cache instead of pixels: (orientation, row) of the note's image features, None: no image
    feature: Optional[tuple] = None

    @property
    def has_picture(self) -> bool:
        """The note has a usable image (pixels, or features in the vision cache)."""
        return self.pixels is not None or self.feature is not None


def prepare_image(img: Image.Image, size: int, flip: bool = False) -> Image.Image:
    """The geometric half of `images.clip_transform`: shorter side to `size` (bicubic), centre crop, flip."""
    img = center_crop(resize_shorter_side(img, size), size)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def _copy_image(out_hwc: torch.Tensor, img: Image.Image) -> None:
    """One RGB S x S image into a contiguous uint8 [S, S, 3] row: PIL's own byte order, so a plain
    memory copy (no transpose in the loader worker; `batch.normalize_pixels` makes it [3, S, S] later)."""
    memoryview(out_hwc.numpy()).cast("B")[:] = img.tobytes()


def note_text_dict(note: dict, has_image: bool) -> dict:
    """The note dict handed to `encode_fn` (the prompter's input)."""
    return {
        "note_id": note["note_id"],
        "title": note["title"],
        "content": note["content"],
        "topics": list(note.get("topics") or []),
        "has_image": bool(has_image),
    }


def pixel_buffer(n: int, image_size: int) -> torch.Tensor:
    """An uninitialised uint8 [n, S, S, 3] buffer in the layout `collate_notes` writes."""
    return torch.empty(n, image_size, image_size, 3, dtype=torch.uint8)


def collate_notes(notes: list[NoteItem], collate_text_fn: Callable[[list[dict]], dict], image_size: int,
                  out: Optional[torch.Tensor] = None, cache=None) -> dict:
    """Stack notes into the tensors of the batch contract (data_shards/batch.py): the text tensors of
    `collate_text_fn`, `pixel_values` uint8 [N,3,S,S] (zeros for a note without a usable image),
    `image_present`, `has_image`, `note_ids` (-1 for padding rows) and `note_id_strs`.

    `pixel_values` is a channels-last view [N,3,S,S] of an [N,S,S,3] buffer: `out` (at least N rows of
    `pixel_buffer`, e.g. a shared-memory slot) or a new one. `has_image` is the `has_image` of
    `collate_text_fn` when it returns one, else `image_present`; a row it marks without an image is
    an error.

    With a vision cache (`cache`, a notellm2.data_shards.vision_cache.VisionCache) the batch carries the cached
    `image_tokens` / `image_pooled` of each item's `feature` (the blank image's for a row without one)
    and the cache's key instead of `pixel_values`; `out` is not used.
    """
    n = len(notes)
    text = collate_text_fn([item.encoding for item in notes])
    if not isinstance(text, dict):
        raise TypeError(f"collate_text_fn must return a dict of tensors, got {type(text).__name__}")
    if cache is not None:
        return _with_text(notes, text, torch.tensor([item.feature is not None for item in notes], dtype=torch.bool),
                          dict(zip(("image_tokens", "image_pooled"), cache.gather([item.feature for item in notes])),
                               vision_cache_key=cache.key, vision_cache=cache.path))
    if out is None:
        out = pixel_buffer(n, image_size)
    elif out.dtype != torch.uint8 or out.shape[0] < n or tuple(out.shape[1:]) != (image_size, image_size, 3) \
            or not out.is_contiguous():
        raise ValueError(f"collate_notes: out must be a contiguous uint8 [>= {n}, {image_size}, {image_size}, 3] "
                         f"buffer, got {out.dtype} {tuple(out.shape)}")
    pixels = out[:n]
    present = torch.zeros(n, dtype=torch.bool)
    for i, item in enumerate(notes):
        if item.pixels is not None:
            if item.pixels.size != (image_size, image_size) or item.pixels.mode != "RGB":
                raise ValueError(f"note {item.note_id!r}: image of {item.pixels.size} {item.pixels.mode}, expected "
                                 f"RGB {image_size}x{image_size} (prepare_image)")
            _copy_image(pixels[i], item.pixels)
            present[i] = True
        else:
            pixels[i].zero_()
    return _with_text(notes, text, present, {"pixel_values": pixels.permute(0, 3, 1, 2)})


def _with_text(notes: list[NoteItem], text: dict, present: torch.Tensor, images: dict) -> dict:
    """The batch: the text tensors, `images` (pixels or cached features), the image flags and the ids."""
    has_image = present
    if "has_image" in text:  # the prompter says which rows feed image features to the model
        has_image = torch.as_tensor(text["has_image"]).bool()
        wrong = (has_image & ~present).nonzero().flatten().tolist()
        if has_image.shape != present.shape or wrong:
            raise ValueError(f"collate_text_fn's has_image marks rows {wrong[:5]} (notes "
                             f"{[notes[i].note_id for i in wrong[:5]]}) as using an image they do not have")
    note_ids = torch.tensor([DUMMY_NOTE_ID if item.is_dummy else note_id_hash(item.note_id) for item in notes],
                            dtype=torch.long)
    batch = dict(text)
    batch.update(images)
    batch.update(has_image=has_image, image_present=present, note_ids=note_ids,
                 note_id_strs=[item.note_id for item in notes])
    return batch


def collate_pairs(pairs: list[tuple[NoteItem, NoteItem]], collate_text_fn: Callable[[list[dict]], dict],
                  image_size: int, out: Optional[torch.Tensor] = None, cache=None) -> dict:
    """[queries; targets]: row i is the query of pair i, row B + i its target."""
    rows = [q for q, _ in pairs] + [t for _, t in pairs]
    return collate_notes(rows, collate_text_fn, image_size, out, cache)
