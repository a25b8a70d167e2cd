"""The frozen vision tower: Hugging Face CLIP / SigLIP vision models, or a plugin encoder.

A tower holds no trainable parameter, stays in eval mode and runs under no_grad. It is NOT a
submodule of the trainable NoteModel: the launcher keeps it replicated outside the DeepSpeed engine
and outside checkpoints, runs it on the batch's pixel values and passes its outputs to the model.

    tower = build_vision_tower(cfg.model.vision)
    tokens, pooled = encode_images(tower, batch, dtype)   # [N, T, D], [N, Dp]: training, validation, embedding
    tokens, pooled = tower(pixel_values)                  # CLIP-normalised float, or the reader's uint8
    tower.token_dim, tower.pooled_dim, tower.num_tokens, tower.image_size
    tower_key(tower)                                      # sha256 of its settings and weights (the vision cache's key)

Widths are read from the model's config (HF) or probed with one blank image (plugins).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from typing import Callable, Optional

import torch
from torch import nn

from notellm2.errors import UserError
from notellm2.data_shards.batch import normalize_pixels
from notellm2.modeling.backbone import loading_model_files, quiet_transformers
from notellm2.modeling.config import VisionConfig

log = logging.getLogger(__name__)


class VisionError(UserError, ValueError):
    """A vision tower setting or directory that cannot be used."""


class VisionTower(nn.Module):
    """Base class: a frozen encoder with forward(pixel_values) -> (tokens [N,T,D], pooled [N,Dp])."""

    token_dim: int
    pooled_dim: int
    num_tokens: int
    image_size: int

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):  # noqa: D401 - the tower is always in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values: CLIP-normalised float [N, 3, S, S] (a batch after `to_device()`), or the reader's
        uint8 pixels, normalised here first with the batch contract's `normalize_pixels`, every row
        taken as an image (a batch's `to_device()` also zeroes the rows without one; the model ignores
        those rows' features either way)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise VisionError(f"vision tower: pixel_values must be [N, 3, H, W], got {tuple(pixel_values.shape)}")
        if pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise VisionError(f"vision tower: images are {tuple(pixel_values.shape[-2:])} but the tower takes "
                              f"{self.image_size}x{self.image_size} (model.vision.image_size)")
        if pixel_values.dtype == torch.uint8:
            every = torch.ones(pixel_values.shape[0], dtype=torch.bool, device=pixel_values.device)
            pixel_values = normalize_pixels(pixel_values, every)
        return self.encode(pixel_values.to(self.dtype))


def _tower_dtype(tower: nn.Module) -> torch.dtype:
    for p in itertools.chain(tower.parameters(), tower.buffers()):
        if p.dtype.is_floating_point:
            return p.dtype
    return torch.float32


def tower_key(tower: nn.Module) -> str:
    """sha256 over what fixes the tower's outputs: its settings (model.vision without the path, which
    only says where the weights are), its classes, and the bytes of every parameter and buffer. The key
    of a vision cache (data_shards/vision_cache.py). Computed once per tower and dtype (the tower is
    frozen); hashing ViT-bigG's 3.7 GB of bf16 weights takes a few seconds."""
    dtype = _tower_dtype(tower)
    memo = getattr(tower, "_tower_key_memo", None)
    if memo is not None and memo[0] == dtype:
        return memo[1]
    cfg = getattr(tower, "vision_config", None)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "path"} if cfg is not None else {}
    settings["classes"] = [type(tower).__name__, type(getattr(tower, "model", tower)).__name__]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    tensors = sorted(itertools.chain(tower.named_parameters(), tower.named_buffers()), key=lambda kv: kv[0])
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    key = h.hexdigest()
    tower._tower_key_memo = (dtype, key)
    return key


def check_cached_features(tower: nn.Module, batch: dict) -> None:
    """A batch's cached features come from this very tower (the cache's key is the live tower's)."""
    key, live = batch.get("vision_cache_key"), tower_key(tower)
    if key != live:
        raise VisionError(f"data.vision_cache: {batch.get('vision_cache')!r} holds features of a tower with key "
                          f"{str(key)[:16]}, but the live tower (model.vision) has key {live[:16]}: other settings or "
                          "weights; write the cache again with `notellm2 data cache-vision` for this tower")


def encode_images(tower: Optional[nn.Module], batch: dict, dtype: Optional[torch.dtype] = None):
    """(image_tokens, image_pooled) of the frozen `tower` for `batch["pixel_values"]`, under no_grad,
    cast to `dtype` when given (bf16 training: what the engine's modules take); (None, None) without a
    tower or without pixels. The one tower call of training, validation and embedding; the batch is on
    the tower's device already (notellm2.data_shards.batch.to_device).

    A batch from a vision cache (data.vision_cache) carries the features instead of pixels: they are
    returned (in the tower's dtype, or `dtype`) without running the tower, once the cache's key is
    checked to be this tower's (`tower_key`)."""
    if tower is None:
        return None, None
    if "image_tokens" in batch:
        check_cached_features(tower, batch)
        cast = dtype or _tower_dtype(tower)
        return batch["image_tokens"].to(cast), batch["image_pooled"].to(cast)
    if "pixel_values" not in batch:
        return None, None
    with torch.no_grad():
        image_tokens, image_pooled = tower(batch["pixel_values"])
    if dtype is not None:
        image_tokens, image_pooled = image_tokens.to(dtype), image_pooled.to(dtype)
    return image_tokens, image_pooled


def replicated_loading():
    """Load without ZeRO-3 partitioning even while the launcher's HfDeepSpeedConfig is alive:
    transformers partitions every from_pretrained under an active ZeRO-3 HfDeepSpeedConfig, and the
    tower lives outside the engine, so partitioned weights would never be gathered for its forward."""
    from notellm2.compat import without_hf_zero3

    return without_hf_zero3()


# ----------------------------------------------------------------------------- Hugging Face towers

_HF_FAMILIES = {
    # config.model_type -> (vision model class name, has a CLS token)
    "clip": ("CLIPVisionModel", True),
    "clip_vision_model": ("CLIPVisionModel", True),
    "siglip": ("SiglipVisionModel", False),
    "siglip_vision_model": ("SiglipVisionModel", False),
}


class HFVisionTower(VisionTower):
    """CLIP or SigLIP vision transformer (ViT-B/16 ... ViT-bigG) from a local directory of a full
    model or a vision-only model."""

    def __init__(self, cfg: VisionConfig, dtype: Optional[torch.dtype] = None):
        super().__init__()
        import transformers
        from transformers import AutoConfig

        if not cfg.path:
            raise VisionError("model.vision.path: empty; allowed: a local CLIP or SigLIP model directory")
        if not os.path.exists(os.path.join(cfg.path, "config.json")):
            raise VisionError(f"model.vision.path: {cfg.path!r} has no config.json (not a Hugging Face model directory)")
        with loading_model_files("model.vision.path", cfg.path, VisionError):
            top = AutoConfig.from_pretrained(cfg.path)
        family = _HF_FAMILIES.get(top.model_type)
        if family is None:
            raise VisionError(f"model.vision.path: {cfg.path!r} is a {top.model_type!r} model; allowed: "
                              f"{', '.join(sorted(_HF_FAMILIES))} (or use model.vision.kind: plugin)")
        cls_name, has_cls = family
        if cfg.tokens == "cls_patches" and not has_cls:
            raise VisionError(f"model.vision.tokens: 'cls_patches' but the {top.model_type} model at {cfg.path!r} has no "
                              "CLS token; allowed here: 'patches'")
        if cfg.cls_source == "pre_layernorm" and not has_cls:
            raise VisionError(f"model.vision.cls_source: 'pre_layernorm' but the {top.model_type} model at {cfg.path!r} has "
                              "no CLS token; allowed here: 'pooled'")
        self.cls_source = cfg.cls_source
        self.vision_config = cfg
        vcfg = getattr(top, "vision_config", top)
        self.kind = top.model_type
        self.has_cls = has_cls
        self.drop_cls = has_cls and cfg.tokens == "patches"
        self.image_size = int(vcfg.image_size)
        if cfg.image_size != self.image_size:
            raise VisionError(f"model.vision.image_size: got {cfg.image_size} but the model at {cfg.path!r} takes "
                              f"{self.image_size}px images; set model.vision.image_size: {self.image_size}")
        n_layers = int(vcfg.num_hidden_layers)
        # hidden_states holds the embeddings output then one entry per layer: n_layers + 1 entries.
        if not -(n_layers + 1) <= cfg.hidden_layer <= n_layers:
            raise VisionError(f"model.vision.hidden_layer: got {cfg.hidden_layer}; the model has {n_layers} layers "
                              f"(allowed: {-(n_layers + 1)}..{n_layers})")
        self.hidden_layer = cfg.hidden_layer
        kwargs = {"dtype": dtype or torch.float32}  # not the checkpoint's fp16: CPU convolutions need fp32
        with quiet_transformers(), replicated_loading(), loading_model_files("model.vision.path", cfg.path, VisionError):
            self.model, info = getattr(transformers, cls_name).from_pretrained(cfg.path, output_loading_info=True, **kwargs)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise VisionError(f"model.vision.path: {cfg.path!r} lacks {len(missing)} weights of {cls_name} "
                              f"(e.g. {', '.join(missing[:5])}); they would be random: is this the right model directory?")
        self.token_dim = int(vcfg.hidden_size)
        self.pooled_dim = int(vcfg.hidden_size)
        patches = (self.image_size // int(vcfg.patch_size)) ** 2
        self.num_tokens = patches + (1 if has_cls and not self.drop_cls else 0)
        self._freeze()

    def encode(self, pixel_values):
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        tokens = out.hidden_states[self.hidden_layer]
        if self.drop_cls:
            tokens = tokens[:, 1:]
        if self.cls_source == "pre_layernorm":
            # CLIP's pooler output is post_layernorm(last_hidden_state[:, 0]); this is the CLS before it.
            return tokens, out.last_hidden_state[:, 0]
        pooled = out.pooler_output
        if pooled is None:  # SigLIP built without its attention-pooling head
            pooled = out.last_hidden_state.mean(dim=1)
        return tokens, pooled


# ----------------------------------------------------------------------------- plugin towers

def resolve_factory(spec: str) -> Callable:
    """Look up "package.module:function" (never eval; old spellings resolve: notellm2.codenames)."""
    from notellm2.codenames import import_code

    return import_code(spec, "model.vision.factory", VisionError)


class PluginVisionTower(VisionTower):
    """Wraps any module whose forward(pixel_values) returns (tokens [B,T,D], pooled [B,D])."""

    def __init__(self, cfg: VisionConfig, dtype: Optional[torch.dtype] = None):
        super().__init__()
        if cfg.cls_source != "pooled":
            raise VisionError(f"model.vision.cls_source: got {cfg.cls_source!r} with model.vision.kind 'plugin'; allowed: "
                              "'pooled' (a plugin returns its own pooled feature)")
        fn = resolve_factory(cfg.factory)
        try:
            with replicated_loading():
                encoder = fn(cfg)
        except Exception as e:
            raise VisionError(f"model.vision.factory: {cfg.factory!r} raised {type(e).__name__}: {e}") from e
        if not isinstance(encoder, nn.Module):
            raise VisionError(f"model.vision.factory: {cfg.factory!r} returned {type(encoder).__name__}, not a torch nn.Module")
        self.model = encoder
        self.vision_config = cfg
        if dtype is not None:
            self.model.to(dtype)
        self.image_size = cfg.image_size
        self._freeze()
        probe = torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=self.dtype)
        with torch.no_grad():
            out = self.model(probe)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and out[0].dim() == 3 and out[1].dim() == 2):
            raise VisionError(f"model.vision.factory: {cfg.factory!r}'s module must return (tokens [B,T,D], pooled [B,D]); "
                              f"got {_describe(out)}")
        self.num_tokens, self.token_dim = int(out[0].shape[1]), int(out[0].shape[2])
        self.pooled_dim = int(out[1].shape[1])

    def encode(self, pixel_values):
        tokens, pooled = self.model(pixel_values)
        return tokens, pooled


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return type(out).__name__


# Registry of vision kinds (looked up by `model.vision.kind`).
VISION_KINDS: dict[str, type[VisionTower]] = {"hf": HFVisionTower, "plugin": PluginVisionTower}


def build_vision_tower(cfg: VisionConfig, variant: Optional[str] = None,
                       dtype: Optional[torch.dtype] = None) -> Optional[VisionTower]:
    """The frozen tower for `cfg`, or None when `variant` uses no image (text_only, text_two_tower)."""
    from notellm2.modeling.names import variant_spec

    if variant is not None and not variant_spec(variant).uses_images:
        return None
    cls = VISION_KINDS.get(cfg.kind)
    if cls is None:
        raise VisionError(f"model.vision.kind: got {cfg.kind!r}; allowed: {', '.join(VISION_KINDS)}")
    return cls(cfg, dtype=dtype)
