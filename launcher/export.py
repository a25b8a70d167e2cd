"""Consolidate a sharded ZeRO checkpoint into a directory that loads without DeepSpeed.

    out/
      model.safetensors      fp32 weights of the trainable NoteModel (LLM, connector, gate, head, temperature)
      llm/config.json        the LLM architecture as trained (kept layers, vocabulary with placeholders)
      tokenizer/             the tokenizer with the placeholder tokens
      notellm2_export.json   model + loss config, prompt template info, vision tower reference,
                             source checkpoint, step, config hash

The frozen vision tower's weights are not copied: the export names its directory (`hf`) or
factory (`plugin`) and `load_exported` builds it from there.

    note_model, vision_tower, prompter = load_exported("out/")
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from typing import Optional

import torch

from launcher import checkpoint as ckpt
from launcher.config import ConfigError, config_from_dict

EXPORT_META = "notellm2_export.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


class ExportError(RuntimeError):
    pass


def _pick_checkpoint(run_dir: str, step: Optional[int]) -> str:
    root = ckpt.checkpoint_root(run_dir)
    if step is None:
        path = ckpt.latest_complete(root)
        if path is None:
            raise ExportError(f"{run_dir}: no complete checkpoint under {root}")
        return path
    path = os.path.join(root, ckpt.step_name(step))
    if not os.path.isfile(os.path.join(path, ckpt.MANIFEST)):
        have = [s for s, _ in ckpt.list_complete(root)]
        raise ExportError(f"{run_dir}: no complete checkpoint for step {step}; available steps: {have or 'none'}")
    return path


def consolidate(path: str) -> dict:
    """Full fp32 state dict of a (ZeRO-2/3) checkpoint directory, without DeepSpeed's engine."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = os.path.dirname(path), os.path.basename(path)
    state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    return {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}


def _llm_config(model_cfg, state: dict):
    """The LLM config as trained: kept layers and the vocabulary size of the trained embedding."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_cfg.llm.path)
    if model_cfg.llm.num_layers is not None:
        config.num_hidden_layers = model_cfg.llm.num_layers
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) > model_cfg.llm.num_layers:
            config.layer_types = list(layer_types[: model_cfg.llm.num_layers])
    emb = [k for k in state if k.startswith("llm.") and k.endswith("embed_tokens.weight")]
    if emb:
        config.vocab_size = int(state[emb[0]].shape[0])
    config.use_cache = False
    return config


def export(run_dir: str, out_dir: str, step: Optional[int] = None, overwrite: bool = False, log=print) -> str:
    from safetensors.torch import save_file

    from modeling.backbone import load_tokenizer

    path = _pick_checkpoint(run_dir, step)
    manifest = ckpt.read_manifest(path)
    if "config" not in manifest:
        raise ExportError(f"{path}: the manifest holds no resolved config")
    cfg = config_from_dict(manifest["config"])
    if os.path.exists(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise ExportError(f"--out {out_dir}: exists and is not empty (use --overwrite)")
        shutil.rmtree(out_dir)
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    state = consolidate(path)
    if any(k.startswith("vision") for k in state):
        raise ExportError(f"{path}: holds vision tower weights; the frozen tower must stay outside the engine")
    save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "step": str(manifest["step"])})
    _llm_config(cfg.model, state).save_pretrained(os.path.join(tmp, "llm"))
    tok = load_tokenizer(cfg.model.llm.tokenizer_path or cfg.model.llm.path)
    tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    model_cfg = dataclasses.asdict(cfg.model)
    vision = model_cfg["vision"]
    meta = {
        "format": FORMAT,
        "model": model_cfg,
        "loss": dataclasses.asdict(cfg.loss),
        "prompt": {"variant": cfg.model.variant, "language": cfg.model.prompt_language,
                   "max_text_tokens": cfg.model.max_text_tokens},
        "vision": {"kind": vision["kind"], "path": os.path.abspath(vision["path"]) if vision["path"] else "",
                   "factory": vision["factory"], "image_size": vision["image_size"],
                   "note": "frozen tower: weights are not copied; load_exported builds it from path/factory"},
        "source": {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.abspath(path),
                   "step": manifest["step"], "config_hash": manifest.get("config_hash"),
                   "samples_seen": manifest.get("samples_seen")},
        "num_parameters": int(sum(v.numel() for v in state.values())),
    }
    with open(os.path.join(tmp, EXPORT_META), "w") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(tmp, out_dir)
    log(f"exported step {manifest['step']} of {run_dir} ({meta['num_parameters']:,} parameters) to {out_dir}")
    return out_dir


@contextlib.contextmanager
def _no_zero3_context():
    """Build plain modules even in a process where a training HfDeepSpeedConfig is still alive."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def load_exported(export_dir: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """(note_model, vision_tower or None, prompter) rebuilt from an export dir; no DeepSpeed involved."""
    with _no_zero3_context():
        return _load_exported(export_dir, device, dtype)


def read_export_config(export_dir: str):
    """The run config (model and loss) an export dir was written with; reads only its JSON."""
    meta_path = os.path.join(export_dir, EXPORT_META)
    if not os.path.isfile(meta_path):
        raise ExportError(f"{export_dir}: no {EXPORT_META} (not a notellm2 export directory)")
    with open(meta_path) as fh:
        meta = json.load(fh)
    if meta.get("format") != FORMAT:
        raise ExportError(f"{meta_path}: format {meta.get('format')}; this code reads format {FORMAT}")
    try:
        cfg = config_from_dict({"model": meta["model"], "loss": meta["loss"]})
    except ConfigError as e:
        raise ExportError(f"{meta_path}: {e}") from None
    cfg.model.vision.path = meta["vision"]["path"] or cfg.model.vision.path
    return cfg


def _load_exported(export_dir: str, device, dtype):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel

    from modeling.backbone import load_tokenizer, quiet_transformers, resolve_attn_implementation
    from modeling.encoder import build_note_model
    from modeling.vision import build_vision_tower

    cfg = read_export_config(export_dir)
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
