"""The batch contract: what `PairLoader` and `NotesLoader` yield, and its one way onto the device.

A batch is a dict (so the model, the loss and test doubles index it by key) of one of two kinds.
With N rows and S = the image size:

    key              dtype / type   shape       meaning
    <text keys>      from collate_text_fn        e.g. input_ids, attention_mask [N, L]; whatever the prompter adds
    pixel_values     uint8          [N, 3, S, S] the decoded, resized, centre-cropped image (zeros: no image);
                                                 a channels-last view of an [N, S, S, 3] buffer
    image_present    bool           [N]          the note HAS a usable image (decoded without error)
    has_image        bool           [N]          image features ENTER THE MODEL for this row
    note_ids         int64          [N]          note_id_hash of each note id (-1: a padding row)
    note_id_strs     list of str    N            the note ids
  or, instead of pixel_values, with data.vision_cache (data_shards/vision_cache.py):
    image_tokens     float32|16     [N, T, D]    the frozen tower's tokens of each row's image (a row without
                                                 an image: the tower's output for the blank image)
    image_pooled     float32|16     [N, Dp]      its pooled feature
    vision_cache_key str            -            the cache's tower key (encode_images checks it against the tower)
    vision_cache     str            -            the cache folder (for messages)
  pair batch (PairBatch), N = 2B: rows 0..B-1 the queries, row B + i the target of query i
    sample_keys      list of str    B            "shard/key" of each pair (for logs)
    sample_logq      float32        [N]          only with loss.logq_correction: log of each note's share of
                                                 the training-pair appearances (data_shards/writing/note_stats.py)
    known_pos        int64          [N, K]       only with loss.mask_known_positives: note_id_hash of each
                                                 note's known related notes (training pairs), padded with -2
  notes batch (NoteBatch), one row per note:
    is_dummy         bool           [N]          a padding row or a note that could not be read at all

`image_present` vs `has_image`: the first is a fact about the data, the second a decision of the
prompter. `has_image` is the `has_image` that `collate_text_fn` returns when it returns one (all
False for a text-only variant, True only where the prompt holds an image slot or the gate fuses),
else `image_present`. A row may have an image the model does not use (`image_present` and not
`has_image`); the reverse is an error, raised at collation. Pixel normalisation masks by
`image_present` (a row without an image becomes the mean colour, whatever the prompter does); the
model and the embedding's image probe go by `has_image`.

A batch carries either pixels or cached features, never both; `encode_images` (modeling/vision.py)
runs the tower on the pixels or returns the cached features, so the model sees the same inputs
either way (docs/reader.md, "The vision cache").

Pixels stay uint8 from the loader workers to the device: 4 times fewer bytes through shared memory
and over the host-to-device copy, and no normalising on the loader's CPU. `to_device()` moves a batch
and CLIP-normalises uint8 `pixel_values` there, in one place (`normalize_pixels`): float32
[N, 3, S, S], contiguous, bit-identical to `notellm2.data_shards.images.clip_transform` of the same image.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import torch

from notellm2.data_shards.images import CLIP_BIAS, CLIP_SCALE


class BatchError(ValueError):
    """A batch that breaks the contract (names the key)."""


class Field(NamedTuple):
    key: str
    dtype: Optional[torch.dtype]  # None: a list (of str)
    rows: str                     # "N" (one per row) or "B" (one per pair)
    ndim: int                     # tensor dimensions (ignored for lists)
    meaning: str


PIXEL_FIELDS = (
    Field("pixel_values", torch.uint8, "N", 4, "decoded pixels [N, 3, S, S] (float32 after to_device)"),
)
FEATURE_FIELDS = (
    Field("image_tokens", torch.float32, "N", 3, "the cached tower tokens [N, T, D] (float32 or float16)"),
    Field("image_pooled", torch.float32, "N", 2, "the cached pooled tower feature [N, Dp] (float32 or float16)"),
)
# the batch-level (not per-row) keys of a batch with cached features
FEATURE_KEYS = ("vision_cache_key", "vision_cache")

COMMON_FIELDS = (
    Field("image_present", torch.bool, "N", 1, "the note has a usable image"),
    Field("has_image", torch.bool, "N", 1, "image features enter the model for this row"),
    Field("note_ids", torch.int64, "N", 1, "note_id_hash of the note id, -1 for padding"),
    Field("note_id_strs", None, "N", 0, "the note ids"),
)


class Batch(dict):
    """A loader batch: a dict with its contract (`FIELDS`), `check()` and `to_device()`."""

    FIELDS: tuple = COMMON_FIELDS
    OPTIONAL: tuple = ()  # checked like FIELDS when present

    @property
    def num_rows(self) -> int:
        return len(self["note_id_strs"])

    @property
    def has_cached_features(self) -> bool:
        """The batch carries the vision cache's features (image_tokens, image_pooled), not pixels."""
        return "image_tokens" in self

    def check(self, where: str = "") -> "Batch":
        """Raise BatchError naming the key that breaks the contract; returns the batch."""
        where = f"{where}: " if where else ""
        name = type(self).__name__
        n = self.num_rows if "note_id_strs" in self else None
        cached = "image_tokens" in self or "image_pooled" in self
        if cached and "pixel_values" in self:
            raise BatchError(f"{where}{name} has both 'pixel_values' and cached features ('image_tokens'): a batch "
                             "carries one or the other")
        fields = self.FIELDS + (FEATURE_FIELDS if cached else PIXEL_FIELDS) + \
            tuple(f for f in self.OPTIONAL if f.key in self)
        for key in FEATURE_KEYS if cached else ():
            if not isinstance(self.get(key), str):
                raise BatchError(f"{where}{name} has cached features but no {key!r} (str)")
        for f in fields:
            if f.key not in self:
                raise BatchError(f"{where}{name} has no {f.key!r} ({f.meaning})")
            value = self[f.key]
            want = n if f.rows == "N" else (n // 2 if n is not None else None)
            if f.dtype is None:
                if not isinstance(value, list) or len(value) != want:
                    raise BatchError(f"{where}{name}[{f.key!r}]: expected a list of {want} str, got "
                                     f"{type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'}")
                continue
            if not torch.is_tensor(value):
                raise BatchError(f"{where}{name}[{f.key!r}]: expected a tensor, got {type(value).__name__}")
            # pixel_values may already be on the device (float32 after to_device); features may be stored in fp16
            ok_dtype = value.dtype == f.dtype or (f.key == "pixel_values" and value.dtype == torch.float32) or \
                (f.key in ("image_tokens", "image_pooled") and value.dtype == torch.float16)
            if not ok_dtype or value.dim() != f.ndim or value.shape[0] != want:
                raise BatchError(f"{where}{name}[{f.key!r}]: expected {f.dtype} with {f.ndim} dims and {want} rows, "
                                 f"got {value.dtype} {tuple(value.shape)}")
        if not cached:
            pix = self["pixel_values"]
            if pix.shape[1] != 3 or pix.shape[2] != pix.shape[3]:
                raise BatchError(f"{where}{name}['pixel_values']: expected [N, 3, S, S], got {tuple(pix.shape)}")
        for key, value in self.items():  # the text keys of collate_text_fn: one row per note too
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] != n:
                raise BatchError(f"{where}{name}[{key!r}]: {value.shape[0]} rows for a batch of {n} "
                                 f"(collate_text_fn must return one row per note)")
        return self

    def to_device(self, device) -> "Batch":
        """This batch on `device`, uint8 pixels CLIP-normalised there (see `to_device`)."""
        return to_device(self, device)


class PairBatch(Batch):
    """N = 2B rows: the B queries, then their B targets (row B + i is the target of query i)."""

    FIELDS = COMMON_FIELDS + (Field("sample_keys", None, "B", 0, "'shard/key' of each pair"),)
    # present only when the run's loss asks for them (NoteStats.annotate)
    OPTIONAL = (Field("sample_logq", torch.float32, "N", 1, "log sampling frequency of each row's note"),
                Field("known_pos", torch.int64, "N", 2, "hashes of each row's known related notes"))


class NoteBatch(Batch):
    """One row per note of the notes shards, padding rows included (`is_dummy`)."""

    FIELDS = COMMON_FIELDS + (Field("is_dummy", torch.bool, "N", 1, "a padding or unreadable row"),)


# ----------------------------------------------------------------------------- onto the device

_AFFINE: dict = {torch.device("cpu"): (torch.from_numpy(CLIP_SCALE).view(3, 1, 1),
                                        torch.from_numpy(CLIP_BIAS).view(3, 1, 1))}


def _affine(dev: torch.device) -> tuple:
    """CLIP_SCALE, CLIP_BIAS on `dev`, copied there once (not on every training step)."""
    if dev not in _AFFINE:
        _AFFINE[dev] = tuple(t.to(dev) for t in _AFFINE[torch.device("cpu")])
    return _AFFINE[dev]


def normalize_pixels(pixels_u8: torch.Tensor, image_present: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,S,S] -> CLIP-normalised float32, (x / 255 - mean) / std, on the tensor's device:
    the same float32 operations in the same order as `images.clip_transform`, so the values are
    bit-identical. Rows without an image become zeros (the mean colour). Any memory layout in
    (e.g. the loaders' channels-last view); a contiguous [N,3,S,S] tensor out."""
    scale, bias = _affine(pixels_u8.device)
    # the loaders' uint8 pixels are a channels-last view: made [N,3,S,S]-contiguous while still uint8
    out = pixels_u8.contiguous().to(torch.float32)
    out.mul_(scale).add_(bias)
    # masked_fill_ with a broadcast mask: no boolean indexing, so no device sync in the training step
    out.masked_fill_(~image_present.to(out.device).view(-1, 1, 1, 1), 0.0)
    return out


def copy_can_be_async(src_device: torch.device, src_pinned: bool, target: torch.device) -> bool:
    """Whether `tensor.to(target, non_blocking=True)` is safe and useful: only a pinned host tensor
    going to a CUDA device. From pageable memory CUDA stages the copy synchronously anyway, and a
    non-blocking copy *to* the host can be read before it has landed."""
    return torch.device(target).type == "cuda" and torch.device(src_device).type == "cpu" and bool(src_pinned)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    # is_pinned() only matters (and is only asked) when the copy goes to CUDA.
    async_ok = torch.device(device).type == "cuda" and copy_can_be_async(t.device, t.is_pinned(), device)
    return t.to(device, non_blocking=async_ok)


def to_device(batch: Mapping, device) -> dict:
    """Tensors of `batch` to `device` (non-blocking only from pinned memory to CUDA, see
    `copy_can_be_async`), other values as they are; uint8 `pixel_values` are then CLIP-normalised on
    `device` (masked by `image_present`); cached features (`image_tokens`, `image_pooled`) just move. A `Batch` stays its own kind; any other mapping (a test
    double's batch) becomes a dict. Already-normalised pixels are left alone, so calling it twice is
    harmless."""
    out = {k: (_to(v, device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    pix = out.get("pixel_values")
    if torch.is_tensor(pix) and pix.dtype == torch.uint8:
        if "image_present" not in out:
            raise BatchError("to_device: uint8 pixel_values need 'image_present' to know the rows without an image")
        out["pixel_values"] = normalize_pixels(pix, out["image_present"])
    return type(batch)(out) if isinstance(batch, Batch) else out
