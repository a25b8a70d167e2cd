"""Configuration dataclasses owned by the modeling package.

These are plain data: the launcher composes them into the run schema, the serving encoder reads the
model and loss sections of an export; both validate through `notellm2.schema.build_dataclass`, and
`check_model_and_loss` holds the checks across fields of these sections. Field metadata keys
understood by the validator:

- ``check``: a callable ``value -> bool``; ``allowed``: a text saying what passes the check.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from notellm2.modeling.names import VARIANTS  # the one registry of variant names


def positive(allowed: str = "an integer > 0"):
    return {"check": lambda v: v > 0, "allowed": allowed}


def non_negative(allowed: str = "a number >= 0"):
    return {"check": lambda v: v >= 0, "allowed": allowed}


@dataclass
class LoraConfig:
    """LoRA adapters on the LLM instead of a full fine-tune (notellm2.modeling.lora; the `lora` extra: peft)."""
    enabled: bool = False
    rank: int = field(default=8, metadata=positive())
    # The adapters' output is scaled by alpha / rank.
    alpha: float = field(default=16.0, metadata=positive("a number > 0"))
    # Dropout on each adapter's input, keyed per note like the Q-Former's (chunked caching replays it).
    dropout: float = field(default=0.0, metadata={"check": lambda v: 0 <= v < 1, "allowed": "a number in [0, 1)"})
    # Linear modules of the LLM's layers that get adapters, by the last part of their name; empty: the
    # architecture's default (Llama family: q/k/v/o_proj, gate/up/down_proj; BERT: query, key, value, dense).
    target_modules: list[str] = field(default_factory=list)
    # LLM modules trained in full beside the adapters, by the end of their name ("norm": the final norm;
    # "embed_tokens": the whole input embedding). The placeholder tokens' embedding rows are always trained.
    trainable_modules: list[str] = field(default_factory=list)


@dataclass
class LLMConfig:
    # Local Hugging Face causal-LM directory (Llama, Qwen2, ... anything AutoModel loads).
    path: str = ""
    # Tokenizer directory; empty means the same as `path`.
    tokenizer_path: str = ""
    # Keep only the first k pretrained decoder layers (small-budget runs); null keeps all.
    num_layers: Optional[int] = field(default=None, metadata=positive("null or an integer > 0"))
    # auto: flash_attention_2 when flash-attn imports and CUDA is present, sdpa otherwise.
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    gradient_checkpointing: bool = False
    # LoRA adapters (off: the whole LLM is trained).
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class VisionConfig:
    # hf: a local CLIP or SigLIP directory (vision part is used); plugin: `factory`.
    kind: Literal["hf", "plugin"] = "hf"
    path: str = ""
    # "module:function" returning a module whose forward(pixel_values) -> (tokens [B,T,D], pooled [B,D]).
    factory: str = ""
    # Index into the tower's hidden states used for image tokens (-1 last, -2 penultimate).
    hidden_layer: int = -2
    tokens: Literal["cls_patches", "patches"] = "patches"
    image_size: int = field(default=224, metadata=positive())
    # The pooled feature that late fusion reads. pooled: the tower's pooler output (CLIP: the CLS token
    # after the final LayerNorm); pre_layernorm: the last layer's CLS token before that LayerNorm
    # (hf CLIP towers only).
    cls_source: Literal["pooled", "pre_layernorm"] = "pooled"


@dataclass
class ConnectorConfig:
    kind: Literal["qformer", "mlp"] = "qformer"
    num_query_tokens: int = field(default=16, metadata=positive())
    num_layers: int = field(default=2, metadata=positive())
    hidden_size: int = field(default=768, metadata=positive())
    num_heads: int = field(default=12, metadata=positive())
    # Q-Former layer i (0-based) cross-attends to the image tokens when i % cross_attention_frequency == 0.
    cross_attention_frequency: int = field(default=1, metadata=positive())
    # Width of the Q-Former's feed-forward layers; null: 4 * hidden_size.
    ffn_size: Optional[int] = field(default=None, metadata=positive("null or an integer > 0"))
    # Q-Former hidden and attention-probability dropout (0 keeps every rank's forward deterministic).
    dropout: float = field(default=0.0, metadata={"check": lambda v: 0 <= v < 1, "allowed": "a number in [0, 1)"})
    # A trainable LayerNorm on the frozen tower's tokens before the connector (BLIP-2's ln_vision). Towers
    # whose features are not normalised (EfficientNet's ReLU6 maps) otherwise feed the cross-attention
    # inputs dominated by their mean.
    input_norm: bool = False


INITS = ("default", "xavier_normal", "normal")


def _init_std():
    return {"check": lambda v: v > 0, "allowed": "a number > 0"}


@dataclass
class FusionConfig:
    """The late-fusion gate's linear maps (W_v and the gate W_z)."""
    # Bias of the gate W_z [h; v] + b (W_v never has one).
    bias: bool = True
    # default: PyTorch's nn.Linear init; xavier_normal; normal: N(0, init_std).
    init: Literal[INITS] = "default"  # type: ignore[valid-type]
    init_std: float = field(default=0.02, metadata=_init_std())
    # A trainable LayerNorm on the pooled tower feature before W_v (see model.connector.input_norm).
    input_norm: bool = False


@dataclass
class HeadConfig:
    """The linear output head before L2 normalisation."""
    # false: no linear map, the representation itself is L2-normalised (model.embed_dim must then equal
    # the backbone's width). A pretrained sentence encoder (text_two_tower) starts from its own space.
    projection: bool = True
    bias: bool = True
    init: Literal[INITS] = "default"  # type: ignore[valid-type]
    init_std: float = field(default=0.02, metadata=_init_std())


@dataclass
class ModelConfig:
    variant: Literal[VARIANTS] = "notellm2"  # type: ignore[valid-type]
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    prompt_language: Literal["en", "zh"] = "en"
    # Token budget for the note's text fields (title, topics, content) inside one prompt.
    max_text_tokens: int = field(default=96, metadata=positive())
    # Output representation width after the linear head.
    embed_dim: int = field(default=64, metadata=positive())


@dataclass
class LossConfig:
    init_scale: float = field(default=20.0, metadata=positive("a number > 0"))
    max_scale: float = field(default=100.0, metadata=positive("a number > 0"))
    learnable_temperature: bool = True
    # mICL: L = (w_mm * L_mm + w_vis * L_vis) / (w_mm + w_vis)
    micl_weight_mm: float = field(default=9.0, metadata=non_negative())
    micl_weight_vis: float = field(default=1.0, metadata=non_negative())
    # The paper's extra 1/world_size scaling of the gathered loss.
    scale_by_world_size: bool = False
    # Subtract log q_j (column j's note's share of the training-pair appearances) from every logit: the
    # sampled-softmax correction for popular notes drawn more often as in-batch negatives (batches carry
    # `sample_logq`, data_shards/writing/note_stats.py).
    logq_correction: bool = False
    # A column holding one of the anchor's known related notes (training pairs), other than its own
    # partner, is not a negative (batches carry `known_pos`).
    mask_known_positives: bool = False


def check_model_and_loss(model: "ModelConfig", loss: "LossConfig") -> None:
    """Checks across keys of the model and loss sections (ConfigError names the key)."""
    from notellm2.modeling.names import variant_spec
    from notellm2.schema import ConfigError

    if loss.init_scale > loss.max_scale:
        raise ConfigError(f"loss.init_scale: got {loss.init_scale}; allowed: <= loss.max_scale ({loss.max_scale})")
    if variant_spec(model.variant).micl and loss.micl_weight_mm + loss.micl_weight_vis <= 0:
        raise ConfigError("loss.micl_weight_mm: weights sum to 0; allowed: micl_weight_mm + micl_weight_vis > 0")
    if model.vision.kind == "plugin" and ":" not in model.vision.factory:
        raise ConfigError(f"model.vision.factory: got {model.vision.factory!r}; allowed: 'module:function' when "
                          "model.vision.kind is 'plugin'")
    if model.vision.kind == "plugin" and model.vision.cls_source != "pooled":
        raise ConfigError(f"model.vision.cls_source: got {model.vision.cls_source!r}; allowed: 'pooled' when "
                          "model.vision.kind is 'plugin' (a plugin returns its own pooled feature)")
