"""Consolidate a sharded ZeRO checkpoint into a directory that loads without DeepSpeed.

    out/
      model.safetensors        fp32 weights of the trainable NoteModel (LLM, connector, gate, head, temperature)
      llm/config.json          the LLM architecture as trained (kept layers, vocabulary with placeholders)
      tokenizer/               the tokenizer with the placeholder tokens
      notellm2_export.json     model + loss config, prompt template info, vision tower reference,
                               source checkpoint, step, config hash
      reference_notes.json     a few fixed notes (images under reference/) and the device/dtype they were
      reference_embeddings.npz embedded on at export time, one array per probe mode

The frozen vision tower's weights are not copied: the export names its directory (`hf`) or
factory (`plugin`) and the serving encoder builds it from there. The export is read in one place:

    from notellm2.modeling.pretrained import NoteEncoder
    encoder = NoteEncoder.from_pretrained("out/")   # .note_model, .vision_tower, .prompter, .encode(notes)

Before the directory is moved into place it is loaded back through `NoteEncoder` (the weights must
match the model) and the reference notes are embedded with it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Optional

import torch

from notellm2.launcher.train import checkpoint as ckpt
from notellm2.launcher.config import RunConfig, config_from_dict
from notellm2.modeling.lora import merge_lora_state
from notellm2.modeling.pretrained import EXPORT_META, FORMAT, WEIGHTS, ExportError, NoteEncoder, reference_notes
from notellm2.files import commit_dir


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


def export(run_dir: str, out_dir: str, step: Optional[int] = None, overwrite: bool = False, log=print) -> str:
    """The checkpoint of `step` (default: the latest complete one) of `run_dir` as an export in `out_dir`."""
    path = _pick_checkpoint(run_dir, step)
    manifest = ckpt.read_manifest(path)
    if "config" not in manifest:
        raise ExportError(f"{path}: the manifest holds no resolved config")
    cfg = config_from_dict(manifest["config"])
    _check_out(out_dir, overwrite)
    state = merge_lora_state(consolidate(path), cfg.model.llm.lora)  # LoRA: adapters merged, a plain LLM
    if any(k.startswith("vision") for k in state):
        raise ExportError(f"{path}: holds vision tower weights; the frozen tower must stay outside the engine")
    source = {"run_dir": os.path.abspath(run_dir), "checkpoint": os.path.abspath(path),
              "step": manifest["step"], "config_hash": manifest.get("config_hash"),
              "samples_seen": manifest.get("samples_seen")}
    write_export(state, cfg, out_dir, source, overwrite=overwrite)
    log(f"exported step {manifest['step']} of {run_dir} ({sum(v.numel() for v in state.values()):,} parameters) "
        f"to {out_dir}")
    return out_dir


def _check_out(out_dir: str, overwrite: bool) -> None:
    if os.path.exists(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ExportError(f"--out {out_dir}: exists and is not empty (use --overwrite)")


def write_export(state: dict, cfg: RunConfig, out_dir: str, source: dict, overwrite: bool = False) -> str:
    """Write the NoteModel weights `state` (a full fp32 state dict) of a run configured by `cfg` as an
    export directory, atomically: built in a sibling temp dir, loaded back through `NoteEncoder`, the
    reference notes embedded, then moved into place."""
    from safetensors.torch import save_file

    from notellm2.modeling.backbone import load_tokenizer

    _check_out(out_dir, overwrite)
    tmp = out_dir.rstrip("/") + ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()}
    save_file(state, os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "step": str(source.get("step"))})
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
                   "note": "frozen tower: weights are not copied; NoteEncoder builds it from path/factory"},
        "source": source,
        "num_parameters": int(sum(v.numel() for v in state.values())),
    }
    with open(os.path.join(tmp, EXPORT_META), "w") as fh:
        json.dump(meta, fh, indent=1)
    # The export's own check: it loads through the serving encoder (weights match the model), and
    # the vectors of a few fixed notes are stored for later loads to compare against.
    encoder = NoteEncoder.from_pretrained(tmp)
    encoder.write_reference(tmp, reference_notes(tmp))
    del encoder
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    commit_dir(tmp, out_dir)
    return out_dir
