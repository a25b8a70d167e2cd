"""The serving encoder: an exported model that embeds raw notes, with no DeepSpeed anywhere.

    from notellm2.modeling.pretrained import NoteEncoder

    encoder = NoteEncoder.from_pretrained("artifacts/demo/encoder")            # device="cuda", dtype=torch.bfloat16
    vectors = encoder.encode([{"title": "Pasta", "topics": ["cooking"], "content": "tomato sauce",
                               "image": "pasta.jpg"}], batch_size=32)         # [N, embed_dim] float32, L2-normalised

This is the one place an export directory (written by `notellm2.launcher.export`) is read: `notellm2 embed`
and the export's own check load through `NoteEncoder.from_pretrained`. A note is a dict with
`title`, `content`, `topics` (a list of strings) and `image`: a file path, a PIL image or None.
Images go through the same decoding (`notellm2.data_shards.images.open_image`), geometry (`prepare_image`)
and normalisation (`normalize_pixels`) as the shards' notes loader, so a note gets the vector it
gets from `notellm2 embed` when its image is the one stored in the shard.

`mode` is a probe (notellm2.modeling.names.PROBES): both inputs, the text alone, or the image alone.

The export also holds the vectors of a few fixed notes computed at export time
(`reference_notes.json`, `reference_embeddings.npz`); `reference_gap()` re-embeds them, which shows
that a copied or moved export still gives the vectors it gave when it was written.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from notellm2.compat import without_hf_zero3
from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.errors import UserError
from notellm2.modeling.config import LossConfig, ModelConfig, check_model_and_loss
from notellm2.modeling.names import PROBE_MODES, probe_unavailable
from notellm2.schema import ConfigError, build_dataclass

EXPORT_META = "notellm2_export.json"
WEIGHTS = "model.safetensors"
REFERENCE_NOTES = "reference_notes.json"
REFERENCE_EMBEDDINGS = "reference_embeddings.npz"
FORMAT = 1


@dataclass
class EncoderConfig:
    """What the serving encoder is built from, and all it reads of a run's config: the `model` and
    `loss` sections (an export's JSON stores them; a training run's RunConfig has them too)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)


def encoder_config(data: dict, where: str = "config") -> EncoderConfig:
    """An EncoderConfig from plain data ({"model": ..., "loss": ...}), validated (ConfigError names the key)."""
    cfg = build_dataclass(EncoderConfig, data)
    check_model_and_loss(cfg.model, cfg.loss)
    return cfg


class ExportError(UserError, RuntimeError):
    """An export directory that is missing, incomplete or from another format."""


class NoteInputError(UserError, ValueError):
    """A note handed to `NoteEncoder.encode` that cannot be embedded (names the note)."""


def read_export_config(export_dir: str) -> EncoderConfig:
    """The run config (model and loss) an export dir was written with; reads only its JSON."""
    meta_path = os.path.join(export_dir, EXPORT_META)
    if not os.path.isfile(meta_path):
        raise ExportError(f"{export_dir}: no {EXPORT_META} (not a notellm2 export directory)")
    with open(meta_path) as fh:
        try:
            meta = json.load(fh)
        except json.JSONDecodeError as e:
            raise ExportError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path}: format {meta.get('format')}; this code reads format {FORMAT}")
    try:
        cfg = encoder_config({"model": meta["model"], "loss": meta["loss"]})
    except (ConfigError, KeyError) as e:
        raise ExportError(f"{meta_path}: {e}") from None
    cfg.model.vision.path = meta.get("vision", {}).get("path") or cfg.model.vision.path
    return cfg


def _load_parts(export_dir: str, cfg: EncoderConfig, device, dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from notellm2.modeling.backbone import load_tokenizer, quiet_transformers, resolve_attn_implementation
    from notellm2.modeling.encoder import build_note_model
    from notellm2.modeling.vision import build_vision_tower

    for part in (WEIGHTS, "llm", "tokenizer"):
        if not os.path.exists(os.path.join(export_dir, part)):
            raise ExportError(f"{export_dir}: no {part} (an incomplete export; write it again with `notellm2 export`)")
    config = AutoConfig.from_pretrained(os.path.join(export_dir, "llm"))
    with quiet_transformers():
        llm = AutoModel.from_config(config, attn_implementation=resolve_attn_implementation(
            cfg.model.llm.attn_implementation, dtype or torch.float32))  # flash-attn only for a bf16/fp16 load
    tokenizer = load_tokenizer(os.path.join(export_dir, "tokenizer"))
    tower = build_vision_tower(cfg.model.vision, variant=cfg.model.variant, dtype=dtype)
    model = build_note_model(cfg.model, cfg.loss, tower, llm=llm, tokenizer=tokenizer)
    state = load_file(os.path.join(export_dir, WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    if missing or unexpected:
        raise ExportError(f"{export_dir}/{WEIGHTS}: does not match the model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    model.to(device=device, dtype=dtype or torch.float32).eval()
    if tower is not None:
        tower.to(device)
    prompter = model.make_prompter(tokenizer, cfg.model.prompt_language, cfg.model.max_text_tokens)
    return model, tower, prompter


NoteImage = Union[str, os.PathLike, Image.Image, None]


class NoteEncoder:
    """An exported note encoder (NoteModel + frozen vision tower + prompter) on one device."""

    def __init__(self, note_model, vision_tower, prompter, config: EncoderConfig, device="cpu",
                 dtype: Optional[torch.dtype] = None, export_dir: Optional[str] = None):
        self.note_model, self.vision_tower, self.prompter = note_model, vision_tower, prompter
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.export_dir = export_dir

    @classmethod
    def from_pretrained(cls, export_dir: str, device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = None) -> "NoteEncoder":
        """Load an export directory (written by `notellm2 export`) onto `device` in `dtype` (default fp32)."""
        cfg = read_export_config(export_dir)
        with without_hf_zero3():
            model, tower, prompter = _load_parts(export_dir, cfg, device, dtype)
        return cls(model, tower, prompter, cfg, device=device, dtype=dtype, export_dir=export_dir)

    @property
    def variant(self) -> str:
        return self.config.model.variant

    @property
    def image_size(self) -> int:
        return self.vision_tower.image_size if self.vision_tower is not None else self.config.model.vision.image_size

    @property
    def embed_dim(self) -> int:
        return self.config.model.embed_dim

    # ------------------------------------------------------------------ encoding

    def _image(self, note: dict, where: str):
        """The note's image as the loader prepares it (RGB, image_size square), or None."""
        from notellm2.data_shards.reader.collate import prepare_image
        from notellm2.data_shards.images import BadImage, open_image

        image = note.get("image")
        if image is None or self.vision_tower is None:
            return None
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.save(buf, format="PNG")  # lossless: open_image then sees what a file would give
            data, source = buf.getvalue(), "the PIL image"
        elif isinstance(image, (str, os.PathLike)):
            try:
                with open(image, "rb") as fh:
                    data = fh.read()
            except OSError as e:
                raise NoteInputError(f"{where}: image {os.fspath(image)}: {e.strerror or e}") from None
            source = os.fspath(image)
        else:
            raise NoteInputError(f"{where}: image must be a file path, a PIL image or None; got {type(image).__name__}")
        try:
            return prepare_image(open_image(data, MAX_IMAGE_PIXELS), self.image_size)
        except BadImage as e:
            raise NoteInputError(f"{where}: image {source}: {e}") from None

    def _items(self, notes: Sequence[dict], start: int, mode: str):
        from notellm2.data_shards.reader.collate import NoteItem
        from notellm2.modeling.prompts import PromptError

        items = []
        for i, note in enumerate(notes):
            if not isinstance(note, dict):
                raise NoteInputError(f"note {start + i}: expected a dict with title, topics, content, image; "
                                     f"got {type(note).__name__}")
            nid = str(note.get("note_id", start + i))
            where = f"note {start + i} ({nid})" if "note_id" in note else f"note {start + i}"
            pixels = self._image(note, where)
            if mode == "image" and pixels is None:
                raise NoteInputError(f"{where}: has no image; the image probe (mode 'image') needs one")
            topics = note.get("topics") or []
            text = {"note_id": nid, "title": note.get("title") or "", "content": note.get("content") or "",
                    "topics": [topics] if isinstance(topics, str) else list(topics), "has_image": pixels is not None}
            try:
                encoding = self.prompter.encode(text, mode)
            except PromptError as e:
                raise NoteInputError(f"{where}: {e}") from None
            items.append(NoteItem(nid, encoding, pixels))
        return items

    @torch.no_grad()
    def _encode_batch(self, items, mode: str) -> np.ndarray:
        from notellm2.data_shards.batch import to_device
        from notellm2.data_shards.reader.collate import collate_notes
        from notellm2.modeling.vision import encode_images

        # the notes loader's path: uint8 pixels, CLIP-normalised on the device by to_device, one tower call
        batch = to_device(collate_notes(items, self.prompter.collate, self.image_size), self.device)
        tokens = pooled = None
        if bool(batch["has_image"].any()):
            tokens, pooled = encode_images(self.vision_tower, batch)
        emb = self.note_model.encode(batch, tokens, pooled, mode=mode).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return emb.cpu().numpy()

    def encode(self, notes: Sequence[dict], batch_size: int = 32, mode: str = "both") -> np.ndarray:
        """[len(notes), embed_dim] float32, L2-normalised, one row per note in order."""
        if mode not in PROBE_MODES:
            raise NoteInputError(f"mode {mode!r}: allowed {', '.join(PROBE_MODES)}")
        why = probe_unavailable(self.variant, mode)
        if why:
            raise NoteInputError(f"mode {mode!r}: {why}")
        if batch_size <= 0:
            raise NoteInputError(f"batch_size: got {batch_size}; allowed: an integer > 0")
        self.note_model.eval()
        out = [self._encode_batch(self._items(notes[s:s + batch_size], s, mode), mode)
               for s in range(0, len(notes), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # ------------------------------------------------------------------ reference notes

    def reference_modes(self) -> tuple[str, ...]:
        return tuple(m for m in PROBE_MODES if probe_unavailable(self.variant, m) is None)

    def write_reference(self, out_dir: str, notes: list[dict]) -> dict:
        """Embed `notes` (images as paths relative to `out_dir`) in every probe the variant has and
        store them as the export's reference vectors. Returns {mode: vectors}."""
        vectors = {}
        for mode in self.reference_modes():
            chosen = [n for n in notes if mode != "image" or n.get("image")]
            vectors[mode] = self.encode(_resolve_images(chosen, out_dir), batch_size=len(chosen) or 1, mode=mode)
        with open(os.path.join(out_dir, REFERENCE_NOTES), "w") as fh:
            json.dump({"notes": notes, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                       "modes": {m: [n["note_id"] for n in notes if m != "image" or n.get("image")]
                                 for m in vectors}}, fh, indent=1, ensure_ascii=False)
        np.savez(os.path.join(out_dir, REFERENCE_EMBEDDINGS), **vectors)
        return vectors

    def reference_gap(self) -> dict:
        """{mode: max abs difference} between the stored reference vectors and this encoder's now."""
        if self.export_dir is None:
            raise ExportError("reference_gap: this encoder was not loaded from an export directory")
        path = os.path.join(self.export_dir, REFERENCE_NOTES)
        if not os.path.isfile(path):
            raise ExportError(f"{self.export_dir}: no {REFERENCE_NOTES} (exported before reference vectors existed)")
        with open(path) as fh:
            ref = json.load(fh)
        stored = np.load(os.path.join(self.export_dir, REFERENCE_EMBEDDINGS))
        by_id = {n["note_id"]: n for n in ref["notes"]}
        gaps = {}
        for mode, ids in ref["modes"].items():
            notes = _resolve_images([by_id[i] for i in ids], self.export_dir)
            now = self.encode(notes, batch_size=len(notes) or 1, mode=mode)
            gaps[mode] = float(np.abs(now - stored[mode]).max()) if len(notes) else 0.0
        return gaps


def _resolve_images(notes: list[dict], root: str) -> list[dict]:
    return [dict(n, image=os.path.join(root, n["image"])) if n.get("image") else n for n in notes]


def reference_notes(out_dir: str) -> list[dict]:
    """A few fixed notes (two images drawn here, written into `out_dir`): what an export embeds at
    export time and `reference_gap` compares against."""
    os.makedirs(os.path.join(out_dir, "reference"), exist_ok=True)
    y, x = np.mgrid[0:64, 0:96]
    drawings = {
        "reference/stripes.png": np.stack([(x * 8) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1),
        "reference/disc.png": np.where(((x - 48) ** 2 + (y - 32) ** 2 < 400)[..., None], [200, 40, 40], [250, 250, 240]),
    }
    for rel, pixels in drawings.items():
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(os.path.join(out_dir, rel))
    return [
        {"note_id": "ref-0", "title": "Striped summer tote", "topics": ["bags", "summer"],
         "content": "Canvas tote with bright stripes, fits a laptop.", "image": "reference/stripes.png"},
        {"note_id": "ref-1", "title": "红色圆点", "topics": ["设计"], "content": "A red disc on white: <IMG> is text here.",
         "image": "reference/disc.png"},
        {"note_id": "ref-2", "title": "Tomato pasta in 15 minutes", "topics": ["cooking"],
         "content": "Garlic, olive oil, tomatoes, basil. No image.", "image": None},
    ]
