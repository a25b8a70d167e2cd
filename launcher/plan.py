"""Per-GPU memory plan of a run config on N nodes x G GPUs (`notellm2 plan`).

Nothing is loaded: parameter counts come from the model configs alone. The LLM and the vision
tower are instantiated from their `config.json` on the meta device (so a directory holding only a
`config.json`, like `configs/arch/*`, is enough); the connector, late-fusion gate and head are the
real `modeling` modules, also built on the meta device.

Model states (the part DeepSpeed's estimator covers) follow DeepSpeed's own accounting
(`estimate_zero3_model_states_mem_needs` / `estimate_zero2_model_states_mem_needs`), with P the
trainable parameters (LLM + connector + gate + head + temperature), Ng the number of GPUs, L the
largest single module's parameters (ZeRO-3 gathers whole modules):

    bf16, bytes per GPU       parameters   gradients        optimizer (fp32 master + Adam m, v)
    ZeRO-3                    2P/Ng        4P/Ng (fp32)     12P/Ng         + gathered-module buffer 4L
    ZeRO-3 offload optimizer  2P/Ng        (CPU)            (CPU)          + 4L
    ZeRO-3 offload all        (CPU)        (CPU)            (CPU)          + 4L
    ZeRO-2                    2P           6P/Ng (bf16+fp32) 12P/Ng
    ZeRO-2 offload optimizer  2P           (CPU)            (CPU)
    fp32 runs: parameters 4, gradients 4, optimizer 8 (Adam m, v; no master copy) bytes per parameter.

The frozen vision tower is outside the ZeRO engine: every GPU holds all of it in the run precision.

LoRA (`model.llm.lora`): P is then the adapters (rank * (in + out) per adapted linear module, found on the
meta LLM as notellm2.modeling.lora finds them), the placeholder rows, any `trainable_modules` and the new
modules; the frozen LLM weights F add only to the parameters row (2F/Ng under ZeRO-3, 2F replicated under
ZeRO-2, in bf16), with no gradient or optimizer state. The adapters' activations add, per token, rank
elements per adapted module, and with dropout twice its input (the dropped input and the mask); one
layer's share with gradient checkpointing. DeepSpeed's estimator (every parameter trained) is not quoted.

Activations (documented in docs/plan.md), per micro batch of n = 2 * data.pairs_per_rank notes of
s tokens each (T = n*s tokens), a = bytes per activation element (2 bf16, 4 fp32), per decoder
layer of width h, key/value width h_kv, MLP width f, q heads H:

    saved per token per layer (bytes): a*(2h + 2h_kv + 4f) + 4H + 2*(4h + 2a*h + 4)
        q h, k and v 2h_kv, attention output h; SwiGLU: gate, up, act(gate), act(gate)*up = 4f;
        the attention's log-sum-exp (fp32, one per head); each of the two RMSNorms keeps its input
        in fp32 (the norm upcasts), the normalised value and its output in the run precision and
        the fp32 reciprocal RMS
    eager attention adds the softmax probabilities: n * H * s^2 elements (fp32 softmax: 4 bytes, plus the
        bf16 copy: 2) per layer; sdpa / flash attention keep O(s) statistics only
    without gradient checkpointing: layers * T * per_token (+ the final norm's share)
    with gradient checkpointing:    layers * T * h * a (each layer's input) + one layer recomputed in backward
    (tests/launcher/plan/ measures what autograd saves on a small Qwen2 and checks the formula against it)

Connector (Q-Former: Q queries of width d, V vision tokens of width d_v, H_q heads, per image per layer):
    Q*(16d + H_q*Q) self-attention + FFN, plus, in cross-attention layers, V*d_v + 2*V*d + Q*(5d + H_q*V),
    then the output MLP Q*(d + 2*h); MLP connector: V*(d_v + 2h) per image.
Vision tower forward (no grad): `output_hidden_states` keeps every layer's output until the forward
returns: images * V' * d_v * (layers + 1) elements (V' tokens incl. CLS), plus one layer's working set.
Contrastive loss: n rows x (n * world) columns of fp32 logits, three copies (logits, softmax, grad).
Chunked representation caching (`train.chunk_pairs: c`, launcher/train/chunked.py): the LLM, connector and
vision-tower terms above are those of one chunk, n = 2c notes, whatever data.pairs_per_rank is; the
loss stays over the whole batch; added: the tower's outputs of the whole batch, kept from pass 1 for
pass 2 (images * V * d_v + pooled, run precision).

Vision cache (`data.vision_cache`): the tower never runs and stays on the CPU, so its weights and its
forward leave the GPU; the batch's cached features take their place (images * (V + 1) * d_v, run
precision; with chunks they are the kept tower outputs too).

Not counted: allocator fragmentation, the CUDA context (~0.5-1 GiB), communication buckets and the
working memory of the layer being differentiated; keep 10-20% headroom.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

from notellm2 import compat, find_shipped, shipped_root
from notellm2.launcher.config import RunConfig
from notellm2.errors import UserError
from notellm2.modeling.names import variant_spec

GiB = 1024 ** 3


class PlanError(UserError, ValueError):
    """A config the planner cannot size (names the key or file)."""


# ----------------------------------------------------------------------------- parameter counts

def count_params(module) -> tuple[int, int]:
    """(total, largest single module's own parameters); shared parameters counted once.

    The same quantities DeepSpeed's `model_to_params` computes, but by parameter identity, so it
    also works on the meta device (where every data_ptr is 0).
    """
    seen: dict[int, int] = {}
    for p in module.parameters():
        seen[id(p)] = p.numel()
    largest = 0
    for m in module.modules():
        largest = max(largest, sum(p.numel() for p in m.parameters(recurse=False)))
    return sum(seen.values()), largest


def _arch_config(path: str, key: str):
    from transformers import AutoConfig

    if not path:
        raise PlanError(f"{key}: empty; allowed: a directory with a Hugging Face config.json (weights not needed)")
    resolved = find_shipped(path)
    if not os.path.isfile(os.path.join(resolved, "config.json")):
        raise PlanError(f"{key}: {path!r} has no config.json (the planner needs the architecture, not the weights)")
    try:
        return AutoConfig.from_pretrained(resolved)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise PlanError(f"{key}: cannot read {os.path.join(resolved, 'config.json')}: {e}") from None


def _on_meta(build):
    import torch

    with torch.device("meta"):
        return build()


@dataclass
class LLMArch:
    model_type: str
    params: int
    largest_module: int
    hidden: int
    layers: int
    heads: int
    kv_dim: int
    ffn: int
    lora: Optional["LoraArch"] = None  # model.llm.lora enabled: what the LLM trains


@dataclass
class LoraArch:
    """The LLM's trainable parameters under model.llm.lora (notellm2.modeling.lora on the meta model)."""
    rank: int
    modules: int           # adapted linear modules
    adapter_params: int    # rank * (in + out) summed over them
    placeholder_params: int  # the trainable placeholder rows (0 when the whole embedding trains)
    full_params: int       # model.llm.lora.trainable_modules, trained in full
    adapter_inputs: int    # in_features summed over the adapted modules (dropout's saved activations)

    @property
    def trainable(self) -> int:
        return self.adapter_params + self.placeholder_params + self.full_params


@dataclass
class VisionArch:
    model_type: str
    params: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    tokens_all: int      # tokens the ViT runs on (patches + CLS when it has one)
    tokens_out: int      # tokens handed to the connector
    pooled_dim: int


def llm_arch(cfg: RunConfig) -> LLMArch:
    """The LLM base model (no LM head, as notellm2.modeling.backbone.load_llm loads it) on the meta device."""
    from transformers import AutoModel

    config = _arch_config(cfg.model.llm.path, "model.llm.path")
    if not hasattr(config, "num_hidden_layers") or not hasattr(config, "hidden_size"):
        raise PlanError(f"model.llm.path: {cfg.model.llm.path!r} holds a {type(config).__name__}, not a decoder LLM config")
    if cfg.model.llm.num_layers is not None:
        if cfg.model.llm.num_layers > config.num_hidden_layers:
            raise PlanError(f"model.llm.num_layers: got {cfg.model.llm.num_layers}; the model has only {config.num_hidden_layers} layers")
        config.num_hidden_layers = cfg.model.llm.num_layers
        if isinstance(getattr(config, "layer_types", None), (list, tuple)):
            config.layer_types = list(config.layer_types[: cfg.model.llm.num_layers])
    rows = _embedding_rows(cfg)
    if rows is not None and rows > int(getattr(config, "vocab_size", 0) or 0):
        config.vocab_size = rows  # the placeholder rows training adds when the checkpoint has no spare ones
    model = _on_meta(lambda: AutoModel.from_config(config))
    total, largest = count_params(model)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return LLMArch(config.model_type, total, largest, int(config.hidden_size), int(config.num_hidden_layers), heads,
                   kv_heads * head_dim, int(getattr(config, "intermediate_size", 4 * config.hidden_size)),
                   lora=lora_arch(cfg, model))


def _embedding_rows(cfg: RunConfig) -> Optional[int]:
    """The input embedding's rows once training has added the placeholder tokens
    (notellm2.modeling.backbone.load_llm): the largest placeholder id + 1, read from the LLM's tokenizer;
    None without tokenizer files (the config's vocab_size is then taken as it is)."""
    tok = _tokenizer(find_shipped(cfg.model.llm.tokenizer_path or cfg.model.llm.path))
    if tok is None:
        return None
    from notellm2.modeling.backbone import PLACEHOLDER_TOKENS

    return max(tok.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS))) + 1


@functools.lru_cache(maxsize=4)
def _tokenizer(tok_dir: str):
    """The tokenizer training uses (placeholders added), loaded once per plan; None without tokenizer files."""
    if not any(os.path.exists(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
        return None
    from notellm2.modeling.backbone import load_tokenizer, quiet_transformers

    with quiet_transformers():
        return load_tokenizer(tok_dir)


def lora_arch(cfg: RunConfig, model) -> Optional[LoraArch]:
    """The adapters' shapes on the meta LLM, found as notellm2.modeling.lora.apply_lora finds them."""
    from notellm2.modeling.backbone import PLACEHOLDER_TOKENS
    from notellm2.modeling.lora import adapter_shapes, fully_trained

    lcfg = cfg.model.llm.lora
    if not lcfg.enabled:
        return None
    shapes = adapter_shapes(model, lcfg)
    full = set(fully_trained(model, lcfg))
    params = dict(model.named_parameters())
    emb = model.get_input_embeddings().weight
    whole_embedding = any(params[n] is emb for n in full)
    return LoraArch(lcfg.rank, len(shapes), sum(lcfg.rank * (i + o) for _, i, o in shapes),
                    0 if whole_embedding else len(PLACEHOLDER_TOKENS) * int(emb.shape[1]),
                    sum(params[n].numel() for n in full), sum(i for _, i, _ in shapes))


def vision_arch(cfg: RunConfig) -> VisionArch:
    import transformers

    from notellm2.modeling.vision import _HF_FAMILIES

    if cfg.model.vision.kind != "hf":
        raise PlanError("model.vision.kind: 'plugin' towers cannot be sized from a config; allowed for planning: 'hf'")
    top = _arch_config(cfg.model.vision.path, "model.vision.path")
    family = _HF_FAMILIES.get(top.model_type)
    if family is None:
        raise PlanError(f"model.vision.path: a {top.model_type!r} model; allowed: {', '.join(sorted(_HF_FAMILIES))}")
    cls_name, has_cls = family
    vcfg = getattr(top, "vision_config", top)
    model = _on_meta(lambda: getattr(transformers, cls_name)(vcfg))
    total, _ = count_params(model)
    patches = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
    tokens_all = patches + (1 if has_cls else 0)
    tokens_out = patches + (1 if has_cls and cfg.model.vision.tokens == "cls_patches" else 0)
    return VisionArch(top.model_type, total, int(vcfg.hidden_size), int(vcfg.num_hidden_layers),
                      int(vcfg.num_attention_heads), int(vcfg.intermediate_size), tokens_all, tokens_out,
                      int(vcfg.hidden_size))


@dataclass
class NewModules:
    connector_params: int = 0
    connector_largest: int = 0
    image_tokens: int = 0       # tokens the connector puts into each prompt
    other_params: int = 0       # late-fusion gate + head + temperature
    other_largest: int = 0


def new_modules(cfg: RunConfig, llm: LLMArch, vision: Optional[VisionArch]) -> NewModules:
    """The trainable modules around the LLM, built from `modeling` on the meta device."""
    from notellm2.modeling.connector import build_connector
    from notellm2.modeling.fusion import EmbeddingHead, LateFusionGate

    spec = variant_spec(cfg.model.variant)
    out = NewModules()
    if spec.image_in_prompt:
        conn = _on_meta(lambda: build_connector(cfg.model.connector, vision.hidden, llm.hidden, vision.tokens_out))
        out.connector_params, out.connector_largest = count_params(conn)
        out.image_tokens = int(conn.num_output_tokens)
    head_total, head_largest = count_params(_on_meta(lambda: EmbeddingHead(llm.hidden, cfg.model.embed_dim, bias=cfg.model.head.bias)))
    out.other_params, out.other_largest = head_total + 1, head_largest  # + the (1,)-shaped temperature
    if spec.late_fusion:
        gate_total, gate_largest = count_params(_on_meta(lambda: LateFusionGate(llm.hidden, vision.pooled_dim, bias=cfg.model.fusion.bias)))
        out.other_params += gate_total
        out.other_largest = max(out.other_largest, gate_largest)
    return out


# ----------------------------------------------------------------------------- ZeRO setup

@dataclass
class ZeroSetup:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    path: str

    @property
    def label(self) -> str:
        off = []
        if self.offload_optimizer:
            off.append("optimizer")
        if self.offload_param:
            off.append("parameters")
        return f"ZeRO-{self.stage}" + (f", {' + '.join(off)} offloaded to CPU" if off else "")


def zero_setup(cfg: RunConfig) -> ZeroSetup:
    path = cfg.train.ds_config
    resolved = find_shipped(path)
    if not os.path.isfile(resolved):
        raise PlanError(f"train.ds_config: {path!r} does not exist (looked in the working directory and {shipped_root()})")
    try:
        with open(resolved) as fh:
            ds = json.load(fh)
    except json.JSONDecodeError as e:
        raise PlanError(f"train.ds_config: {resolved} is not valid JSON: {e}") from None
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (2, 3):
        raise PlanError(f"{resolved}: zero_optimization.stage is {stage}; the planner sizes ZeRO stages 2 and 3")

    def _offloaded(key: str) -> bool:
        return str((zero.get(key) or {}).get("device", "none")).lower() in ("cpu", "nvme")

    setup = ZeroSetup(stage, _offloaded("offload_optimizer"), _offloaded("offload_param"), resolved)
    if setup.offload_param and stage != 3:
        raise PlanError(f"{resolved}: zero_optimization.offload_param needs stage 3")
    return setup


# ----------------------------------------------------------------------------- the plan

@dataclass
class Row:
    key: str
    label: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    config_name: str
    nodes: int
    gpus_per_node: int
    zero: ZeroSetup
    precision: str
    llm: LLMArch
    vision: Optional[VisionArch]
    new: NewModules
    notes_per_micro_batch: int
    images_per_micro_batch: int
    seq_len: int
    seq_parts: dict
    gradient_checkpointing: bool
    attn_implementation: str
    chunk_pairs: int = 0  # train.chunk_pairs: activations are those of 2 * chunk_pairs notes
    rows: list[Row] = field(default_factory=list)
    llm_activations_other: float = 0.0  # the LLM activations with the other checkpointing choice
    cpu_bytes_per_node: float = 0.0
    deepspeed_model_states: Optional[float] = None

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def llm_trainable(self) -> int:
        return self.llm.lora.trainable if self.llm.lora else self.llm.params

    @property
    def frozen_llm_params(self) -> int:
        """LLM parameters held (partitioned under ZeRO-3) but not trained: the base weights under LoRA."""
        return self.llm.params - self.llm.lora.full_params if self.llm.lora else 0

    @property
    def trainable_params(self) -> int:
        return self.llm_trainable + self.new.connector_params + self.new.other_params

    @property
    def largest_module(self) -> int:
        return max(self.llm.largest_module, self.new.connector_largest, self.new.other_largest)

    def total(self) -> float:
        return sum(r.bytes for r in self.rows)

    def model_states(self) -> float:
        return sum(r.bytes for r in self.rows if r.key in ("parameters", "gradients", "optimizer", "gathered"))

    def row(self, key: str) -> Row:
        for r in self.rows:
            if r.key == key:
                return r
        raise KeyError(key)

    def to_dict(self) -> dict:
        return {
            "config": self.config_name, "nodes": self.nodes, "gpus_per_node": self.gpus_per_node, "gpus": self.gpus,
            "zero": self.zero.label, "zero_stage": self.zero.stage, "precision": self.precision,
            "params": {"llm": self.llm.params, "connector": self.new.connector_params, "gate_head": self.new.other_params,
                       "trainable": self.trainable_params, "largest_module": self.largest_module,
                       "vision_frozen": self.vision.params if self.vision else 0,
                       "llm_frozen": self.frozen_llm_params,
                       "lora": dataclasses.asdict(self.llm.lora) if self.llm.lora else None},
            "micro_batch": {"notes": self.notes_per_micro_batch, "images": self.images_per_micro_batch,
                            "seq_len": self.seq_len, "seq_parts": self.seq_parts, "chunk_pairs": self.chunk_pairs},
            "gradient_checkpointing": self.gradient_checkpointing,
            "bytes_per_gpu": {r.key: r.bytes for r in self.rows},
            "total_bytes_per_gpu": self.total(),
            "model_states_bytes_per_gpu": self.model_states(),
            "llm_activations_other_checkpointing": self.llm_activations_other,
            "cpu_bytes_per_node": self.cpu_bytes_per_node,
            "deepspeed_model_states_bytes_per_gpu": self.deepspeed_model_states,
        }


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def _template_tokens(cfg: RunConfig, prompt: str) -> tuple[int, str]:
    """Tokens of the prompt's fixed text: exact when the LLM directory has a tokenizer, else ~3 chars/token."""
    from notellm2.modeling.prompts import _TEMPLATES, EMB, FIELDS, IMG

    pieces = [p for p in _TEMPLATES[cfg.model.prompt_language][prompt] if p not in FIELDS and p not in (IMG, EMB)]
    markers = sum(1 for p in _TEMPLATES[cfg.model.prompt_language][prompt] if p == EMB)
    tok_dir = find_shipped(cfg.model.llm.tokenizer_path or cfg.model.llm.path)
    try:
        tok = _tokenizer(tok_dir)
        if tok is None:
            raise FileNotFoundError(tok_dir)
        n = sum(len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces)
        return n + markers + 1, "template tokenized"  # + BOS/EOS-like special token
    except Exception:  # noqa: BLE001 - no tokenizer files: estimate
        chars = sum(len(p) for p in pieces)
        return math.ceil(chars / 3) + markers + 1, "template estimated at ~3 characters per token, no tokenizer in model.llm.path"


def llm_activation_bytes(llm: LLMArch, notes: int, seq_len: int, act_bytes: int, checkpointing: bool, attn: str) -> float:
    """Saved activations of the LLM trunk for one micro batch (formula in the module docstring)."""
    tokens = notes * seq_len
    norm = llm.hidden * (4 + 2 * act_bytes) + 4  # RMSNorm: fp32 input, normalised value, output, fp32 rsqrt
    per_token = act_bytes * (2 * llm.hidden + 2 * llm.kv_dim + 4 * llm.ffn) + 4 * llm.heads + 2 * norm
    per_layer = tokens * per_token
    if attn == "eager":
        per_layer += notes * llm.heads * seq_len ** 2 * (act_bytes + 4 if act_bytes == 2 else 4)
    final_norm = tokens * norm
    if checkpointing:
        return llm.layers * tokens * llm.hidden * act_bytes + per_layer + final_norm
    return llm.layers * per_layer + final_norm


def lora_activation_bytes(lora: LoraArch, tokens: int, act_bytes: int, dropout: bool, checkpointing: bool,
                          layers: int) -> float:
    """What the adapters add to the saved activations: each adapter's rank-wide middle (A x) per token, and
    with dropout its dropped input and the mask (the input itself is saved by the base layer's neighbours
    already). With gradient checkpointing only one layer's share is alive at once."""
    per_token = lora.modules * lora.rank * act_bytes + (2 * lora.adapter_inputs * act_bytes if dropout else 0)
    return tokens * per_token / (layers if checkpointing else 1)


def connector_activation_bytes(cfg: RunConfig, llm: LLMArch, vision: VisionArch, images: int, act_bytes: int) -> float:
    c = cfg.model.connector
    if c.kind == "mlp":
        return images * vision.tokens_out * (vision.hidden + 2 * llm.hidden) * act_bytes
    q, d, heads, v, dv = c.num_query_tokens, c.hidden_size, c.num_heads, vision.tokens_out, vision.hidden
    per_image = 0
    for layer in range(c.num_layers):
        per_image += q * (16 * d + heads * q)
        if layer % c.cross_attention_frequency == 0:
            per_image += v * dv + 2 * v * d + q * (5 * d + heads * v)
    per_image += q * (d + 2 * llm.hidden)
    return images * per_image * act_bytes


def vision_forward_bytes(vision: VisionArch, images: int, act_bytes: int) -> float:
    hidden_states = images * vision.tokens_all * vision.hidden * (vision.layers + 1)
    one_layer = images * (vision.tokens_all * (4 * vision.hidden + vision.ffn) + vision.heads * vision.tokens_all ** 2)
    return (hidden_states + one_layer) * act_bytes


def make_plan(cfg: RunConfig, nodes: int = 1, gpus_per_node: int = 8, seq_len: Optional[int] = None,
              config_name: str = "") -> MemoryPlan:
    if nodes < 1 or gpus_per_node < 1:
        raise PlanError(f"--nodes and --gpus-per-node: got {nodes} x {gpus_per_node}; allowed: integers >= 1")
    spec = variant_spec(cfg.model.variant)
    zero = zero_setup(cfg)
    llm = llm_arch(cfg)
    vision = vision_arch(cfg) if spec.uses_images else None
    new = new_modules(cfg, llm, vision)

    notes = 2 * cfg.data.pairs_per_rank
    images = notes if vision is not None else 0
    template, how = _template_tokens(cfg, spec.prompt)
    parts = {"text": cfg.model.max_text_tokens, "image": new.image_tokens, "template": template, "template_count": how}
    s = seq_len if seq_len is not None else cfg.model.max_text_tokens + new.image_tokens + template
    if s < 1:
        raise PlanError(f"--seq-len: got {s}; allowed: an integer >= 1")
    attn = cfg.model.llm.attn_implementation
    attn = "sdpa" if attn in ("auto", "flash_attention_2") else attn
    plan = MemoryPlan(config_name or cfg.name, nodes, gpus_per_node, zero, cfg.train.precision, llm, vision, new, notes,
                      images, s,
                parts, cfg.model.llm.gradient_checkpointing, attn, cfg.train.chunk_pairs)
    # The notes whose activations are alive at once: the batch, or one chunk (chunked caching).
    act_notes = 2 * cfg.train.chunk_pairs if cfg.train.chunk_pairs else notes
    act_images = act_notes if vision is not None else 0
    per = f", per chunk of {cfg.train.chunk_pairs} pairs" if cfg.train.chunk_pairs else ""

    ng, p_train, big = plan.gpus, plan.trainable_params, plan.largest_module
    p_held = p_train + plan.frozen_llm_params  # LoRA: the frozen LLM weights are held too, in the run precision
    frozen = f" incl. {_fmt_params(plan.frozen_llm_params)} frozen LLM weights" if plan.llm.lora else ""
    bf16 = cfg.train.precision == "bf16"
    wb = 2 if bf16 else 4  # bytes of a working-precision parameter or activation element
    param_b, grad_b, opt_b = (2, (4 if zero.stage == 3 else 6), 12) if bf16 else (4, 4, 8)
    rows = plan.rows
    if zero.stage == 3:
        rows.append(Row("parameters", f"parameters ({'bf16' if bf16 else 'fp32'}, 1/{ng} partition{frozen})",
                        0 if zero.offload_param else param_b * p_held / ng, "on CPU" if zero.offload_param else ""))
        gathered = 4 * big
    else:
        rows.append(Row("parameters", f"parameters ({'bf16' if bf16 else 'fp32'}, replicated{frozen})", param_b * p_held))
        gathered = 0
    on_cpu = zero.offload_optimizer
    rows.append(Row("gradients", f"gradients (1/{ng} partition)", 0 if on_cpu else grad_b * p_train / ng, "on CPU" if on_cpu else ""))
    rows.append(Row("optimizer", "optimizer states (" + ("fp32 master + Adam m, v" if bf16 else "Adam m, v") + f", 1/{ng})",
                    0 if on_cpu else opt_b * p_train / ng, "on CPU" if on_cpu else ""))
    if zero.stage == 3:
        rows.append(Row("gathered", f"ZeRO-3 gathered-module buffer (4 B x {big / 1e6:.0f}M largest module)", gathered))
    cached = bool(cfg.data.vision_cache)  # the tower does not run: its features come with the batch
    if vision is not None and cached:
        rows.append(Row("vision_weights", "frozen vision tower: not run (data.vision_cache), kept on the CPU", 0,
                        "on CPU"))
    elif vision is not None:
        rows.append(Row("vision_weights", f"frozen vision tower ({'bf16' if bf16 else 'fp32'}, replicated)", wb * vision.params))
    llm_on = llm_activation_bytes(llm, act_notes, s, wb, plan.gradient_checkpointing, attn)
    plan.llm_activations_other = llm_activation_bytes(llm, act_notes, s, wb, not plan.gradient_checkpointing, attn)
    rows.append(Row("llm_activations", f"LLM activations (gradient checkpointing {'on' if plan.gradient_checkpointing else 'off'}, {attn}{per})", llm_on))
    if plan.llm.lora:
        rows.append(Row("lora_activations", f"LoRA adapters' activations (rank {plan.llm.lora.rank}"
                        f"{', dropout' if cfg.model.llm.lora.dropout else ''}{per})",
                        lora_activation_bytes(plan.llm.lora, act_notes * s, wb, cfg.model.llm.lora.dropout > 0,
                                              plan.gradient_checkpointing, llm.layers)))
    if vision is not None and spec.image_in_prompt:
        rows.append(Row("connector_activations", f"connector activations ({cfg.model.connector.kind}{per})",
                        connector_activation_bytes(cfg, llm, vision, act_images, wb)))
    if vision is not None and cached:
        rows.append(Row("cached_features", "the batch's cached tower features (data.vision_cache; no tower forward)",
                        images * (vision.tokens_out + 1) * vision.hidden * wb))
    elif vision is not None:
        rows.append(Row("vision_forward", f"vision forward, no grad (all hidden states + one layer{per})",
                        vision_forward_bytes(vision, act_images, wb)))
        if cfg.train.chunk_pairs:
            rows.append(Row("tower_cache", "frozen tower outputs of the batch, kept for pass 2 (chunked caching)",
                            images * (vision.tokens_out + 1) * vision.hidden * wb))
    reps = 2 if spec.micl else 1
    rows.append(Row("loss", "contrastive loss logits (fp32)", 3 * 4 * reps * notes * notes * ng))

    # CPU memory per node for offloaded states (no buffer factor).
    cpu_per_gpu = 0.0
    if zero.offload_optimizer:
        cpu_per_gpu += (grad_b + opt_b) * p_train / ng
    if zero.offload_param:
        cpu_per_gpu += param_b * p_held / ng
    plan.cpu_bytes_per_node = cpu_per_gpu * gpus_per_node
    if bf16 and not plan.llm.lora:  # DeepSpeed's estimator assumes every parameter is trained
        plan.deepspeed_model_states = deepspeed_model_states(plan)
    return plan


def deepspeed_model_states(plan: MemoryPlan) -> Optional[float]:
    """DeepSpeed's own per-GPU model-states estimate for the same setup (None if deepspeed is absent)."""
    try:
        if plan.zero.stage == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                plan.trainable_params, plan.largest_module, num_gpus_per_node=plan.gpus_per_node, num_nodes=plan.nodes,
                cpu_offload=plan.zero.offload_optimizer, cpu_offload_params=plan.zero.offload_param, zero_init=True)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(plan.trainable_params, num_gpus_per_node=plan.gpus_per_node,
                                                           num_nodes=plan.nodes, cpu_offload=plan.zero.offload_optimizer)
        return float(gpu)
    except ImportError:
        return None


def model_state_bytes(engine) -> dict:
    """Bytes of model state this rank actually holds in a live engine (to set beside the plan's
    figures): its parameter partitions, fp32 master partitions, gradient partitions and optimizer
    states (ZeRO-3 and ZeRO-1/2)."""
    import torch

    def nbytes(t):
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    params = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)
        params += nbytes(held) if held is not None else nbytes(p.data)
    held = compat.optimizer_state_tensors(engine)
    master, grads, states = (sum(nbytes(t) for t in held[k]) for k in ("master", "grads", "optimizer"))
    total = params + master + grads + states
    return {"params": params, "master": master, "grads": grads, "optimizer": states, "total": total}


def _fmt_params(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{int(n)}"


def format_plan(plan: MemoryPlan, gpu_memory_gib: Optional[float] = None) -> str:
    L = []
    L.append(f"notellm2 plan: {plan.config_name} on {plan.nodes} node(s) x {plan.gpus_per_node} GPU(s) = {plan.gpus} ranks; "
             f"{plan.zero.label} ({os.path.relpath(plan.zero.path, shipped_root()) if plan.zero.path.startswith(shipped_root()) else plan.zero.path}); "
             f"{plan.precision}")
    L.append("")
    L.append("| module | parameters | training |")
    L.append("|---|---:|---|")
    lora = plan.llm.lora
    how = (f"frozen, ZeRO-{plan.zero.stage}" + (f" ({_fmt_params(lora.full_params)} of it trained in full)" if lora.full_params else "")
           if lora else f"full fine-tune, ZeRO-{plan.zero.stage}")
    L.append(f"| LLM ({plan.llm.model_type}, {plan.llm.layers} layers, width {plan.llm.hidden}) | {_fmt_params(plan.llm.params)} | {how} |")
    if lora:
        L.append(f"| LoRA adapters (rank {lora.rank} on {lora.modules} linear modules) + placeholder rows | "
                 f"{_fmt_params(lora.adapter_params + lora.placeholder_params)} | trained, ZeRO-{plan.zero.stage} |")
    if plan.new.connector_params:
        L.append(f"| connector ({plan.new.image_tokens} image tokens per note) | {_fmt_params(plan.new.connector_params)} | trained, ZeRO-{plan.zero.stage} |")
    L.append(f"| late-fusion gate, head, temperature | {_fmt_params(plan.new.other_params)} | trained, ZeRO-{plan.zero.stage} |")
    if plan.vision is not None:
        L.append(f"| vision tower ({plan.vision.model_type}, {plan.vision.layers} layers, width {plan.vision.hidden}) | {_fmt_params(plan.vision.params)} | frozen, replicated |")
    L.append(f"| trainable total (largest module {_fmt_params(plan.largest_module)}) | {_fmt_params(plan.trainable_params)} | |")
    L.append("")
    sp = plan.seq_parts
    L.append(f"micro batch per GPU: {plan.notes_per_micro_batch // 2} pairs = {plan.notes_per_micro_batch} notes x {plan.seq_len} tokens "
             f"(text {sp['text']} + image {sp['image']} + template {sp['template']}; {sp['template_count']}); "
             f"{plan.images_per_micro_batch} images")
    if plan.chunk_pairs:
        L.append(f"chunked representation caching (train.chunk_pairs): activations of {plan.chunk_pairs} pairs at a time, "
                 f"{plan.notes_per_micro_batch // (2 * plan.chunk_pairs)} chunks per micro batch, one extra forward each")
    L.append("")
    L.append("| per-GPU memory | GiB | |")
    L.append("|---|---:|---|")
    for r in plan.rows:
        L.append(f"| {r.label} | {r.bytes / GiB:.2f} | {r.note} |")
    L.append(f"| **total** | **{plan.total() / GiB:.2f}** | |")
    L.append("")
    other = "off" if plan.gradient_checkpointing else "on"
    L.append(f"LLM activations with gradient checkpointing {other}: {plan.llm_activations_other / GiB:.2f} GiB "
             f"(total would be {(plan.total() - plan.row('llm_activations').bytes + plan.llm_activations_other) / GiB:.2f} GiB)")
    if plan.deepspeed_model_states is not None:
        ours = plan.model_states()
        L.append(f"model states: {ours / GiB:.2f} GiB here vs DeepSpeed's estimator {plan.deepspeed_model_states / GiB:.2f} GiB "
                 f"(ratio {ours / plan.deepspeed_model_states:.3f})")
    if plan.cpu_bytes_per_node:
        L.append(f"CPU memory per node for offloaded states: {plan.cpu_bytes_per_node / GiB:.1f} GiB (before pinned-buffer overhead)")
    if gpu_memory_gib:
        head = gpu_memory_gib - plan.total() / GiB
        L.append(f"GPU memory {gpu_memory_gib:.0f} GiB: {'fits' if head >= 0 else 'DOES NOT FIT'}, headroom {head:.1f} GiB "
                 f"({100 * head / gpu_memory_gib:.0f}%; keep 10-20% for fragmentation, CUDA context and buffers)")
    return "\n".join(L)

