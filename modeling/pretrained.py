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

Format 2 (docs/training.md, "Export"): `notellm2_export.json` lists the SHA-256 of every other file
of the export (checked here before anything is parsed; it catches damage, not an attacker, who can
rewrite the list) and its own; the frozen tower's location relative to the export (a Hugging Face
tower is copied into `tower/`), overridable with `tower_path=`; the trust information; a `fingerprint`
(one hash over the weights, the tokenizer, the tower, the prompt and image settings: two exports with
the same fingerprint give the same vectors); and `adapters` (empty today; a loader that does not know
an entry refuses it). Format 1 exports still load. A plugin factory outside
`notellm2.modeling.plugins` is imported only with `trust_code=True` (`--trust-code` on the CLI): a
factory is code, and an export may come from anywhere.
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

from notellm2.codenames import is_builtin_plugin
from notellm2.compat import without_hf_zero3
from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.errors import UserError
from notellm2.files import file_problem, read_json_object, sealed_problem, tree_files
from notellm2.modeling.config import LossConfig, ModelConfig, check_model_and_loss
from notellm2.modeling.names import PROBE_MODES, probe_unavailable, variant_spec
from notellm2.schema import ConfigError, build_dataclass

EXPORT_META = "notellm2_export.json"
WEIGHTS = "model.safetensors"
REFERENCE_NOTES = "reference_notes.json"
REFERENCE_EMBEDDINGS = "reference_embeddings.npz"
TOWER_DIR = "tower"  # a Hugging Face tower copied into the export (format 2)
FORMAT = 2
READABLE_FORMATS = (1, 2)


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


def read_export_meta(export_dir: str) -> dict:
    """An export's `notellm2_export.json`, checked: a readable format, and (format 2) its own SHA-256."""
    meta_path = os.path.join(export_dir, EXPORT_META)
    if not os.path.isfile(meta_path):
        raise ExportError(f"{export_dir}: no {EXPORT_META} (not a notellm2 export directory)")
    meta = read_json_object(meta_path, ExportError, meta_path)
    fmt = meta.get("format")
    if fmt not in READABLE_FORMATS:
        raise ExportError(f"{meta_path}: format {fmt!r}; this notellm2 reads formats "
                          f"{', '.join(map(str, READABLE_FORMATS))} (export the run again with this version)")
    if fmt == 2:
        why = sealed_problem(meta)
        if why:
            raise ExportError(f"{meta_path}: {why}")
        if meta.get("adapters"):
            raise ExportError(f"{meta_path}: holds adapters ({', '.join(sorted(meta['adapters']))}), which this "
                              "notellm2 cannot load; use a version that knows them")
    return meta


def read_export_config(export_dir: str, tower_path: Optional[str] = None) -> EncoderConfig:
    """The run config (model and loss) an export dir was written with; reads only its JSON. The tower's
    location (model.vision.path) is `tower_path` when given, else the export's own, made absolute."""
    meta = read_export_meta(export_dir)
    meta_path = os.path.join(export_dir, EXPORT_META)
    try:
        cfg = encoder_config({"model": meta["model"], "loss": meta["loss"]})
    except (ConfigError, KeyError, TypeError) as e:
        raise ExportError(f"{meta_path}: {e}") from None
    vision = meta.get("vision") if isinstance(meta.get("vision"), dict) else {}
    stored = vision.get("path") or cfg.model.vision.path
    if tower_path:
        cfg.model.vision.path = os.path.abspath(tower_path)
    elif stored and meta["format"] >= 2:  # relative to the export, wherever it was moved
        cfg.model.vision.path = os.path.normpath(os.path.join(os.path.abspath(export_dir), stored))
    else:
        cfg.model.vision.path = stored
    return cfg


def check_export_files(export_dir: str, meta: dict) -> None:
    """Format 2: every file of the export has the SHA-256 the JSON lists (no more, no fewer files),
    checked before any of them is parsed."""
    if meta.get("format", 1) < 2:
        return
    expected = meta.get("files")
    if not isinstance(expected, dict):
        raise ExportError(f"{os.path.join(export_dir, EXPORT_META)}: no 'files' list of SHA-256 hashes")
    names = tree_files(export_dir, exclude=(EXPORT_META,))
    for name in sorted(set(names) | set(expected)):
        why = file_problem(export_dir, name, expected)
        if why:
            raise ExportError(why)


def check_tower_files(export_dir: str, meta: dict, tower_dir: str) -> None:
    """A tower folder outside the export (`tower_path`, or kept by a relative path) holds the files (SHA-256)
    the export was written with."""
    if not os.path.isdir(tower_dir):
        raise ExportError(f"{export_dir}: the frozen tower is not at {tower_dir}; give its folder with --tower-path "
                          "(NoteEncoder.from_pretrained(..., tower_path=...))")
    expected = (meta.get("vision") or {}).get("files") if meta.get("format", 1) >= 2 else None
    for name in sorted(expected or {}):
        why = file_problem(tower_dir, name, expected)
        if why:
            raise ExportError(f"{why}: not the tower this export was trained with")


def check_code_trust(cfg: EncoderConfig, trust_code: bool, where: str) -> None:
    """A plugin factory outside notellm2.modeling.plugins is code named by a data file: refused unless
    the caller trusts its source."""
    vision = cfg.model.vision
    if vision.kind != "plugin" or not variant_spec(cfg.model.variant).uses_images:
        return
    if not trust_code and not is_builtin_plugin(vision.factory):
        raise ExportError(f"{where}: model.vision.factory {vision.factory!r} is code from outside notellm2; it is "
                          "imported and run only if you trust where this came from: pass --trust-code "
                          "(NoteEncoder.from_pretrained(..., trust_code=True))")


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
                 dtype: Optional[torch.dtype] = None, export_dir: Optional[str] = None,
                 fingerprint: Optional[str] = None):
        self.note_model, self.vision_tower, self.prompter = note_model, vision_tower, prompter
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.export_dir = export_dir
        self.fingerprint = fingerprint  # the export's (format 2); None for format 1

    @classmethod
    def from_pretrained(cls, export_dir: str, device: Union[str, torch.device] = "cpu",
                        dtype: Optional[torch.dtype] = None, trust_code: bool = False,
                        tower_path: Optional[str] = None) -> "NoteEncoder":
        """Load an export directory (written by `notellm2 export`) onto `device` in `dtype` (default fp32).

        `tower_path`: where the frozen tower is (default: the export's own location for it; a tower
        given here must hold the files the export was written with). `trust_code`: import the plugin
        factory the export names even when it is not one of notellm2's (only for exports you trust)."""
        meta = read_export_meta(export_dir)
        cfg = read_export_config(export_dir, tower_path)
        check_code_trust(cfg, trust_code, export_dir)
        check_export_files(export_dir, meta)
        tower_dir, own = os.path.abspath(cfg.model.vision.path or export_dir), os.path.abspath(export_dir)
        if (cfg.model.vision.kind == "hf" and variant_spec(cfg.model.variant).uses_images
                and os.path.commonpath([own, tower_dir]) != own):  # inside the export: hashed above
            check_tower_files(export_dir, meta, tower_dir)
        with without_hf_zero3():
            model, tower, prompter = _load_parts(export_dir, cfg, device, dtype)
        return cls(model, tower, prompter, cfg, device=device, dtype=dtype, export_dir=export_dir,
                   fingerprint=meta.get("fingerprint"))

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


def export_fingerprint(meta: dict) -> str:
    """One hash over what fixes an export's vectors, from its JSON alone: the SHA-256 of the weights, the
    LLM config and the tokenizer files, the frozen tower (its files' SHA-256 for a Hugging Face tower;
    the factory and settings for a plugin; for both, `tower_key` of its loaded weights), the prompt and
    image settings, and the adapters. Vectors of two exports can be mixed only when it is the same."""
    import hashlib

    files = meta.get("files") or {}
    vision = meta.get("vision") or {}
    model_vision = (meta.get("model") or {}).get("vision") or {}
    tower = {"kind": vision.get("kind"), "files": vision.get("files") or {}, "tower_key": vision.get("tower_key")}
    if vision.get("kind") == "plugin":
        tower["factory"] = vision.get("factory_canonical")
    parts = {
        "weights": files.get(WEIGHTS),
        "llm": {k: v for k, v in files.items() if k.startswith("llm/")},
        "tokenizer": {k: v for k, v in files.items() if k.startswith("tokenizer/")},
        "tower": tower,
        "prompt": meta.get("prompt"),
        "image": {k: model_vision.get(k) for k in ("image_size", "tokens", "hidden_layer", "cls_source")},
        "model": _without_locations(meta.get("model") or {}),
        "adapters": meta.get("adapters") or {},
    }
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def _without_locations(model: dict) -> dict:
    """The model section less what says where things are or how attention is computed (no effect on
    the vectors beyond rounding)."""
    out = json.loads(json.dumps(model))
    for section, keys in (("llm", ("path", "tokenizer_path", "attn_implementation", "gradient_checkpointing")),
                          ("vision", ("path",))):
        for key in keys:
            (out.get(section) or {}).pop(key, None)
    return out
