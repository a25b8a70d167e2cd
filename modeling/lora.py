"""LoRA adapters on the LLM (`model.llm.lora`): what is trained, the placeholder rows, keyed dropout, merging.

    llm, tokenizer = load_llm(cfg.model.llm)
    llm = apply_lora(llm, cfg.model.llm.lora, tokenizer)          # before deepspeed.initialize
    ...
    state = merge_lora_state(consolidated_fp32_state, cfg.model.llm.lora)   # a plain LLM again (export)

What is trained. `apply_lora` injects peft's LoRA layers (`peft.inject_adapter_in_model`: the LLM keeps its
own class, so `get_input_embeddings`, `config` and the forward are unchanged) into the linear modules
`target_modules` names, or the architecture's default (`DEFAULT_TARGETS`: the Llama family's attention
and MLP projections; BERT's query, key, value and dense layers), always only inside the layer stack (a
module whose name has a layer index: BERT's pooler is not adapted). peft freezes every other weight of
the LLM; `trainable_modules` turns LLM modules back to full training (e.g. "norm", the final norm). The
modules around the LLM (connector, gate, head, temperature) are not the LLM's and stay fully trained;
the frozen vision tower never enters the model.

The placeholder rows. `notellm2.modeling.backbone.load_llm` adds `<IMG>` and `<IMG_EMB>` to the tokenizer
and gives them embedding rows set to the mean of the original rows: rows the checkpoint had spare, or
rows appended by growing the matrix (under ZeRO-3 `notellm2.launcher.train.partitioning` grows it still
partitioned). In a full fine-tune they train with the rest of the embedding. Under LoRA the embedding
is frozen, so `PlaceholderRows` takes its place: the frozen matrix (`base`) plus a small trainable
parameter `rows` ([number of placeholders, width], initialised from those rows) whose values are used
wherever an input id is a placeholder id (`ids`, a buffer). With "embed_tokens" (BERT:
"word_embeddings") in `trainable_modules` the whole embedding trains instead and nothing is wrapped.

Keyed dropout. peft draws LoRA's dropout from the torch generator, which chunked representation caching
cannot replay chunk by chunk (notellm2.launcher.train.chunked). So each adapter's dropout becomes a
`KeyedDropout` (notellm2.modeling.connector): its mask is a hash of a seed, the site, the note's id and
the element's index. `set_dropout_keys(llm, note_ids)` (NoteModel calls it before the LLM's forward) draws
the seed once per forward from the torch generator and hands every site the batch's note ids, so a note
gets the same masks alone, in a chunk or in the whole batch. The seed and keys are left in place after
the forward: activation checkpointing recomputes the forward inside the backward and must draw the
same masks. Without dropout nothing is drawn (the generator's stream is that of a run without LoRA).

Merging (`merge_lora_state`): W = W_base + (alpha / rank) * B A for every adapted module, the placeholder
rows written into the embedding matrix, under the plain module names: the result is the state of the
LLM without adapters, which the serving encoder loads unchanged (see docs/training.md for why the
export merges rather than storing the adapters beside the LLM).
"""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from notellm2.modeling.backbone import PLACEHOLDER_TOKENS, _zero3_gathered
from notellm2.modeling.config import LoraConfig
from notellm2.modeling.connector import DropoutKeys, KeyedDropout

ADAPTER = "default"  # peft's adapter name: the state keys read `<module>.lora_A.default.weight`

_LLAMA_FAMILY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_BERT_FAMILY = ("query", "key", "value", "dense")
# config.model_type -> the last name parts of the linear modules adapted by default
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    **{t: _LLAMA_FAMILY for t in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma", "gemma2",
                                  "olmo", "olmo2", "smollm3", "granite")},
    **{t: _BERT_FAMILY for t in ("bert", "roberta", "xlm-roberta", "camembert")},
}
_LAYER_INDEX = re.compile(r"(^|\.)\d+(\.|$)")  # a module inside the layer stack: `layers.3.`, `encoder.layer.0.`
_DROPOUT_SOURCE = "notellm2_lora_dropout"       # the LLM's attribute holding its adapters' DropoutKeys


class LoraError(ValueError):
    """A `model.llm.lora` setting that does not fit the LLM (names the key)."""


def _config_error(message: str) -> Exception:
    from notellm2.schema import ConfigError

    return ConfigError(message)


def _model_type(llm: nn.Module) -> str:
    cfg = llm.config.get_text_config() if hasattr(llm.config, "get_text_config") else llm.config
    return str(getattr(cfg, "model_type", ""))


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def target_names(llm: nn.Module, cfg: LoraConfig) -> list[str]:
    """Full names of the LLM's linear modules that get adapters (works on the meta device too)."""
    wanted = tuple(cfg.target_modules) or DEFAULT_TARGETS.get(_model_type(llm), ())
    if not wanted:
        raise _config_error(f"model.llm.lora.target_modules: empty and there is no default for model_type "
                            f"{_model_type(llm)!r} (defaults exist for {', '.join(sorted(DEFAULT_TARGETS))}); "
                            "name the linear modules, e.g. [q_proj, v_proj]")
    names = [n for n, m in llm.named_modules()
             if isinstance(m, nn.Linear) and _LAYER_INDEX.search(n) and _matches(n, wanted)]
    found = {w for w in wanted if any(_matches(n, (w,)) for n in names)}
    if not names or found != set(wanted):
        missing = sorted(set(wanted) - found)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in llm.named_modules() if isinstance(m, nn.Linear)})
        raise _config_error(f"model.llm.lora.target_modules: {missing} name no linear module inside the layers of "
                            f"this {_model_type(llm)!r} model; its linear modules end in: {', '.join(linear)}")
    return names


def adapter_shapes(llm: nn.Module, cfg: LoraConfig) -> list[tuple[str, int, int]]:
    """(module name, in_features, out_features) of every adapted module: an adapter holds rank * (in + out)
    parameters (`notellm2 plan` counts them on the meta device)."""
    modules = dict(llm.named_modules())
    return [(n, modules[n].in_features, modules[n].out_features) for n in target_names(llm, cfg)]


def fully_trained(llm: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the LLM parameters `trainable_modules` keeps in full training."""
    if not cfg.trainable_modules:
        return []
    modules = [n for n, _ in llm.named_modules() if n and _matches(n, cfg.trainable_modules)]
    missing = [t for t in cfg.trainable_modules if not any(_matches(n, (t,)) for n in modules)]
    if missing:
        raise _config_error(f"model.llm.lora.trainable_modules: {missing} name no module of this "
                            f"{_model_type(llm)!r} model")
    return [n for n, _ in llm.named_parameters() if any(n.startswith(m + ".") for m in modules)]


class PlaceholderRows(nn.Module):
    """The input embedding with trainable placeholder rows and the rest frozen (module docstring).

    `rows` is always in the graph (a product with the one-hot of the placeholder ids), so its gradient is
    zero, not missing, for a batch without placeholders: every rank then reduces the same parameters."""

    def __init__(self, base: nn.Embedding, ids: list[int]):
        super().__init__()
        self.base = base
        self.register_buffer("ids", torch.tensor(sorted(ids), dtype=torch.long))
        with _zero3_gathered([base.weight]), torch.no_grad():  # ZeRO-3: read the partitioned matrix's rows
            rows = base.weight[self.ids.to(base.weight.device)].detach().clone()
        self.rows = nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = input_ids.unsqueeze(-1) == self.ids.to(input_ids.device)  # [..., k]
        picked = hit.to(self.rows.dtype) @ self.rows                  # the row of each placeholder id
        return torch.where(hit.any(dim=-1, keepdim=True), picked.to(out.dtype), out)


def apply_lora(llm: nn.Module, cfg: LoraConfig, tokenizer) -> nn.Module:
    """Inject LoRA adapters into `llm` in place (module docstring) and return it; `cfg.enabled` false
    returns it untouched. Under ZeRO-3 call it after loading (partitioned) and before deepspeed.initialize:
    the adapters and the placeholder rows are new, whole parameters that initialize partitions."""
    if not cfg.enabled:
        return llm
    from notellm2.errors import require

    peft = require("peft", "lora", "model.llm.lora (LoRA adapters)")
    targets = target_names(llm, cfg)
    full = fully_trained(llm, cfg)
    both = sorted({t for t in cfg.trainable_modules if any(_matches(n, (t,)) or n.startswith(t + ".") for n in targets)})
    if both:
        raise _config_error(f"model.llm.lora.trainable_modules: {both} also get adapters (target_modules); "
                            "a module is either adapted or trained in full")
    peft_cfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               bias="none")
    peft.inject_adapter_in_model(peft_cfg, llm, adapter_name=ADAPTER)  # freezes every other LLM weight
    if cfg.dropout > 0:
        source, sites = DropoutKeys(), []
        for module in llm.modules():
            drops = getattr(module, "lora_dropout", None)
            if isinstance(drops, nn.ModuleDict) and ADAPTER in drops:
                drops[ADAPTER] = KeyedDropout(cfg.dropout, source, len(sites))
                sites.append(drops[ADAPTER])
        setattr(llm, _DROPOUT_SOURCE, (source, sites))
    params = dict(llm.named_parameters())
    for name in full:  # names unchanged by the injection: these modules are not adapted
        params[name].requires_grad_(True)
    emb = llm.get_input_embeddings()
    if not emb.weight.requires_grad:
        ids = tokenizer.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS))
        llm.set_input_embeddings(PlaceholderRows(emb, ids))
    return llm


def set_dropout_keys(llm: nn.Module, row_keys: Optional[torch.Tensor]) -> None:
    """Before one LLM forward: draw the seed (one draw) of its adapters' keyed dropout and give them the
    batch's row keys; nothing when the LLM has none or they are in eval mode (module docstring). Their own
    mode is read, not the LLM's: a pretrained model loads in eval mode and the training loop does not
    switch it, while the adapters are built in training mode."""
    source, sites = getattr(llm, _DROPOUT_SOURCE, (None, ()))
    if source is None or not any(d.training for d in sites):
        return
    source.seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
    source.keys = row_keys


SHAPE_KEYS = ("enabled", "rank", "target_modules", "trainable_modules")  # what decides the trained parameters


def resume_mismatch(saved_config: Optional[dict], cfg: LoraConfig) -> Optional[str]:
    """Why a checkpoint whose resolved run config is `saved_config` cannot resume a run with LoRA settings
    `cfg` (one sentence), or None. The adapters are parameters of the checkpoint: a run with adapters
    from a checkpoint without them would train fresh ones, and the reverse has no full LLM to load."""
    saved = ((saved_config or {}).get("model", {}).get("llm", {}) or {}).get("lora") or {}
    theirs = {k: saved.get(k, getattr(LoraConfig(), k)) for k in SHAPE_KEYS}
    ours = {k: getattr(cfg, k) for k in SHAPE_KEYS}
    if theirs["enabled"] != ours["enabled"]:
        if ours["enabled"]:
            return ("holds no LoRA adapters (it was trained with model.llm.lora.enabled: false) but this run trains "
                    "them: its adapters would start fresh; resume with model.llm.lora.enabled: false or use another "
                    "train.output_dir")
        return ("holds LoRA adapters (model.llm.lora.enabled: true) but this run trains the full LLM; resume with "
                "the checkpoint's model.llm.lora, or export it (notellm2 export merges the adapters)")
    if not ours["enabled"]:
        return None
    differ = [k for k in SHAPE_KEYS if theirs[k] != ours[k]]
    if differ:
        return "; ".join(f"model.llm.lora.{k} is {theirs[k]!r} there and {ours[k]!r} here" for k in differ) + \
            ": the adapters differ in shape, so they cannot be loaded"
    return None


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LLM parameters of a LoRA model that are not the pretrained ones: adapters and
    placeholder rows (names as in `module.named_parameters()`; ZeRO-3 partitions are not gathered here)."""
    return {n: p for n, p in module.named_parameters() if ".lora_" in n or n.endswith(".rows")}


def merge_lora_state(state: dict, cfg: LoraConfig) -> dict:
    """The full state dict `state` (consolidated fp32, NoteModel names: `llm.` + module path) with every
    adapter merged into its base weight and the placeholder rows written into the embedding, under the
    names of the LLM without adapters. `cfg.enabled` false returns `state` unchanged."""
    lora_keys = [k for k in state if f".lora_A.{ADAPTER}." in k or f".lora_B.{ADAPTER}." in k]
    if not cfg.enabled:
        if lora_keys:
            raise LoraError(f"the state holds LoRA adapters ({lora_keys[0]}, ...) but model.llm.lora.enabled is false")
        return state
    out = dict(state)
    scaling = cfg.alpha / cfg.rank
    merged = 0
    for key in [k for k in state if k.endswith(f".lora_A.{ADAPTER}.weight")]:
        module = key[: -len(f".lora_A.{ADAPTER}.weight")]
        a = out.pop(key)
        b = out.pop(f"{module}.lora_B.{ADAPTER}.weight")
        base = out.pop(f"{module}.base_layer.weight")
        delta = (b.double() @ a.double()) * scaling
        out[f"{module}.weight"] = (base.double() + delta).to(base.dtype)
        if f"{module}.base_layer.bias" in out:
            out[f"{module}.bias"] = out.pop(f"{module}.base_layer.bias")
        merged += 1
    if merged == 0:
        raise LoraError("model.llm.lora.enabled is true but the state holds no adapter (no *.lora_A.default.weight)")
    for key in [k for k in out if k.endswith(".base.weight") and k[: -len(".base.weight")] + ".rows" in out]:
        prefix = key[: -len(".base.weight")]
        weight = out.pop(key).clone()
        ids = out.pop(f"{prefix}.ids").round().long()  # consolidation hands buffers back as floats
        weight[ids] = out.pop(f"{prefix}.rows").to(weight.dtype)
        out[f"{prefix}.weight"] = weight
    left = [k for k in out if ".lora_" in k or k.endswith(".base_layer.weight")]
    if left:
        raise LoraError(f"merge_lora_state: keys left unmerged: {left[:3]}")
    return out
