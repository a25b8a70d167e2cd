"""Consolidate a sharded ZeRO checkpoint into a directory that loads without DeepSpeed (format 2).

    out/
      model.safetensors        fp32 weights of the trainable NoteModel (LLM, connector, gate, head, temperature)
      llm/config.json          the LLM architecture as trained (kept layers, vocabulary with placeholders)
      tokenizer/               the tokenizer with the placeholder tokens
      tower/                   the frozen Hugging Face tower's config and weights, copied (`--tower copy`)
      notellm2_export.json     model + loss config, prompt settings, the tower's location (relative to the
                               export) and its files' SHA-256, trust information, the SHA-256 of every other
                               file, the fingerprint, adapters (empty), source checkpoint, and its own SHA-256
      reference_notes.json     a few fixed notes (images under reference/) and the device/dtype they were
      reference_embeddings.npz embedded on at export time, one array per probe mode

A Hugging Face tower is copied into the export (or, with `--tower relative`, named by its path relative
to the export); a plugin tower is named by its factory and built by the serving encoder. Files follow
the umask (0644 under the usual 022). The export is read in one place:

    from notellm2.modeling.pretrained import NoteEncoder
    encoder = NoteEncoder.from_pretrained("out/")   # .note_model, .vision_tower, .prompter, .encode(notes)

Before the directory is moved into place it is loaded back through `NoteEncoder` (the weights must
match the model) and the reference notes are embedded with it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

import torch

from notellm2.codenames import canonical, is_builtin_plugin
from notellm2.launcher.train import checkpoint as ckpt
from notellm2.launcher.config import RunConfig, config_from_dict
from notellm2.modeling.lora import merge_lora_state
from notellm2.modeling.pretrained import (EXPORT_META, FORMAT, TOWER_DIR, WEIGHTS, EncoderConfig, ExportError, NoteEncoder,
                                          check_code_trust, export_fingerprint, reference_notes)
from notellm2.files import atomic_write_json, commit_dir, follow_umask, hash_files, seal_json, tree_files

TOWER_MODES = ("copy", "relative")


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
    # The input embedding's parameter name, asked of the architecture itself (Llama: embed_tokens, BERT:
    # embeddings.word_embeddings), on the meta device so nothing is allocated.
    from transformers import AutoModel

    from notellm2.compat import without_hf_zero3

    # Without the guard, from_config inside a live ZeRO-3 training process (export right after
    # train, as tests/e2e/test_real_training.py does on rank 0) runs under deepspeed.zero.Init and
    # broadcasts from one rank only: a hang, then a gloo error.
    with without_hf_zero3(), torch.device("meta"):
        skeleton = AutoModel.from_config(config)
    weight = skeleton.get_input_embeddings().weight
    name = next((n for n, p in skeleton.named_parameters() if p is weight), None)
    if name is not None and f"llm.{name}" in state:
        config.vocab_size = int(state[f"llm.{name}"].shape[0])
    config.use_cache = False
    return config


def export(run_dir: str, out_dir: str, step: Optional[int] = None, overwrite: bool = False, log=print,
           trust_code: bool = False, tower_path: Optional[str] = None, tower: str = "copy") -> str:
    """The checkpoint of `step` (default: the latest complete one) of `run_dir` as an export in `out_dir`.
    `tower_path` overrides the run's model.vision.path (a run folder copied from another machine);
    `trust_code` lets a plugin factory from outside notellm2 named by the run's config be imported."""
    path = _pick_checkpoint(run_dir, step)
    manifest = ckpt.read_manifest(path)
    if "config" not in manifest:
        raise ExportError(f"{path}: the manifest holds no resolved config")
    cfg = config_from_dict(manifest["config"])
    if tower_path:
        cfg.model.vision.path = tower_path
    check_code_trust(EncoderConfig(model=cfg.model, loss=cfg.loss), trust_code, f"{path}/{ckpt.MANIFEST}")
    _check_out(out_dir, overwrite)
    ckpt.check_files(path, manifest)  # before DeepSpeed unpickles any of it
    state = merge_lora_state(consolidate(path), cfg.model.llm.lora)  # LoRA: adapters merged, a plain LLM
    if any(k.startswith("vision") for k in state):
        raise ExportError(f"{path}: holds vision tower weights; the frozen tower must stay outside the engine")
    source = {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.abspath(path),
              "step": manifest["step"], "config_hash": manifest.get("config_hash"),
              "samples_seen": manifest.get("samples_seen")}
    write_export(state, cfg, out_dir, source, overwrite=overwrite, trust_code=trust_code, tower=tower)
    log(f"exported step {manifest['step']} of {run_dir} ({sum(v.numel() for v in state.values()):,} parameters) "
        f"to {out_dir}")
    return out_dir


def _check_out(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir}: exists and is not empty (use --overwrite)")


def tower_files(tower_dir: str) -> list[str]:
    """What a Hugging Face tower loads from its folder: config.json and the weights (safetensors, with their
    index; else the PyTorch .bin files, which transformers opens with weights_only=True)."""
    if not os.path.isfile(os.path.join(tower_dir, "config.json")):
        raise ExportError(f"model.vision.path: {tower_dir!r} has no config.json (not a Hugging Face model directory)")
    names = sorted(os.listdir(tower_dir))
    weights = [n for n in names if n.endswith(".safetensors") or n.endswith(".safetensors.index.json")]
    weights = weights or [n for n in names if n.startswith("pytorch_model") and (n.endswith(".bin") or n.endswith(".bin.index.json"))]
    return ["config.json"] + weights


def _tower_entry(cfg: RunConfig, tmp: str, out_dir: str, mode: str) -> dict:
    """The export's "vision" entry; a Hugging Face tower is copied into `tmp`/tower or named by its path
    relative to `out_dir` (tmp is its sibling, so the same relative path works from both)."""
    from notellm2.modeling.names import variant_spec

    vision = cfg.model.vision
    if mode not in TOWER_MODES:
        raise ExportError(f"--tower {mode}: allowed {', '.join(TOWER_MODES)}")
    entry = {"kind": vision.kind, "path": "", "files": {}, "factory": vision.factory,
             "factory_canonical": "", "image_size": vision.image_size,
             "source_path": os.path.abspath(vision.path) if vision.path else ""}
    if vision.kind == "plugin":
        module, _, fn = vision.factory.partition(":")
        entry["factory_canonical"] = f"{canonical(module)}:{fn}"
    if not vision.path or not variant_spec(cfg.model.variant).uses_images:
        return entry
    src = os.path.abspath(vision.path)
    if vision.kind == "hf":
        names = tower_files(src)
        entry["files"] = hash_files(src, names)
        if mode == "copy":
            os.makedirs(os.path.join(tmp, TOWER_DIR))
            for name in names:
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, TOWER_DIR, name))
            entry["path"] = TOWER_DIR
            return entry
    entry["path"] = os.path.relpath(src, os.path.abspath(out_dir))
    return entry


def _write_meta(folder: str, meta: dict) -> None:
    """The export's JSON, with the SHA-256 of every other file in `folder` and its own."""
    meta["files"] = hash_files(folder, tree_files(folder, exclude=(EXPORT_META,)))
    meta["fingerprint"] = export_fingerprint(meta)
    atomic_write_json(os.path.join(folder, EXPORT_META), seal_json(meta))


def write_export(state: dict, cfg: RunConfig, out_dir: str, source: dict, overwrite: bool = False,
                 trust_code: bool = False, tower: str = "copy") -> str:
    """Write the NoteModel weights `state` (a full fp32 state dict) of a run configured by `cfg` as an
    export directory, atomically: built in a sibling temp dir, loaded back through `NoteEncoder`, the
    reference notes embedded, then moved into place. `tower`: "copy" a Hugging Face tower into the
    export, or name it by its "relative" path."""
    from safetensors.torch import save_file

    from notellm2.modeling.backbone import load_tokenizer
    from notellm2.modeling.vision import tower_key

    _check_out(out_dir, overwrite)
    check_code_trust(EncoderConfig(model=cfg.model, loss=cfg.loss), trust_code, f"export to {out_dir}")
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "step": str(source.get("step"))})
    _llm_config(cfg.model, state).save_pretrained(os.path.join(tmp, "llm"))
    tok = load_tokenizer(cfg.model.llm.tokenizer_path or cfg.model.llm.path)
    tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    model_cfg = dataclasses.asdict(cfg.model)
    vision = _tower_entry(cfg, tmp, out_dir, tower)
    model_cfg["vision"]["path"] = vision["path"]
    builtin = cfg.model.vision.kind != "plugin" or is_builtin_plugin(cfg.model.vision.factory)
    meta = {
        "format": FORMAT,
        "model": model_cfg,
        "loss": dataclasses.asdict(cfg.loss),
        "prompt": {"variant": cfg.model.variant, "language": cfg.model.prompt_language,
                   "max_text_tokens": cfg.model.max_text_tokens},
        "vision": vision,
        "trust": {"code": [cfg.model.vision.factory] if cfg.model.vision.kind == "plugin" else [],
                  "needs_trust_code": not builtin,
                  "note": "a plugin factory outside notellm2.modeling.plugins loads only with --trust-code"},
        "adapters": {},
        "source": source,
        "num_parameters": int(sum(v.numel() for v in state.values())),
    }
    _write_meta(tmp, meta)
    # The export's own check: it loads through the serving encoder (weights match the model, the files
    # their hashes), and the vectors of a few fixed notes are stored for later loads to compare against.
    encoder = NoteEncoder.from_pretrained(tmp, trust_code=trust_code)
    meta["vision"]["tower_key"] = tower_key(encoder.vision_tower) if encoder.vision_tower is not None else None
    encoder.write_reference(tmp, reference_notes(tmp))
    del encoder
    _write_meta(tmp, meta)
    follow_umask(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    commit_dir(tmp, out_dir)
    return out_dir
