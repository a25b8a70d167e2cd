"""The LLM backbone: a local Hugging Face causal-LM directory loaded as its base model (no LM head),
its tokenizer, and the two placeholder tokens of the note prompts.

Loading always goes through ``AutoModel.from_pretrained(path, config=...)`` so that the launcher's
DeepSpeed ZeRO-3 ``HfDeepSpeedConfig`` partitions weights while they load; a truncated backbone
(``llm.num_layers: k``) sets ``config.num_hidden_layers = k`` before loading, so the layers past k
are never materialised.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from typing import Callable, Optional

import torch

from notellm2.errors import UserError
from notellm2.modeling.config import LLMConfig

log = logging.getLogger(__name__)

# Placeholder strings. They are added as special tokens; prompts insert them by id only, and user
# text is encoded with special-token parsing disabled, so typing them in a note does nothing special.
IMG_TOKEN = "<IMG>"          # one image slot position (repeated num_image_tokens times)
IMG_EMB_TOKEN = "<IMG_EMB>"  # mICL visual marker: the representation is the hidden state just before it
PLACEHOLDER_TOKENS = (IMG_TOKEN, IMG_EMB_TOKEN)


class BackboneError(UserError, ValueError):
    """A backbone directory, tokenizer or setting that cannot be used (one line naming the key)."""


# grow_embeddings(model, rows): make the model's input embedding `rows` long, keeping the existing rows
# unchanged (the values of the new rows do not matter: the placeholder rows are set afterwards). The
# launcher passes one that keeps a ZeRO-3 matrix partitioned (launcher/train/partitioning.py); without one,
# transformers' resize_token_embeddings is used, which under ZeRO-3 hands back a whole, replicated matrix.
EmbeddingGrower = Callable[[torch.nn.Module, int], None]


def _flash_attn_imports() -> bool:
    """True when the flash_attn package imports (a broken build raises all sorts of errors on import)."""
    if importlib.util.find_spec("flash_attn") is None:
        return False
    try:
        import flash_attn  # noqa: F401
    except Exception:
        return False
    return True


def flash_attention_available() -> bool:
    """True when flash-attn imports and a CUDA device is present (the dtype is checked separately)."""
    return torch.cuda.is_available() and _flash_attn_imports()


HALF_PRECISION = (torch.bfloat16, torch.float16)


def select_attn_implementation(requested: str, dtype: torch.dtype, flash_attn_imports: bool, cuda: bool) -> str:
    """The pure selection rule behind `resolve_attn_implementation` (the probes are arguments).

    flash-attn kernels take only bf16/fp16 tensors, so flash_attention_2 needs all three: the package
    imports, a CUDA device, and a half-precision load dtype (`train.precision: bf16` in training).
    auto -> flash_attention_2 when all three hold, else sdpa. An explicit flash_attention_2 that
    misses one of them is a BackboneError naming the key and the reason.
    """
    if requested not in ("auto", "sdpa", "eager", "flash_attention_2"):
        raise BackboneError(f"model.llm.attn_implementation: got {requested!r}; allowed: auto, sdpa, eager, flash_attention_2")
    half = dtype in HALF_PRECISION
    if requested == "auto":
        return "flash_attention_2" if (flash_attn_imports and cuda and half) else "sdpa"
    if requested == "flash_attention_2":
        if not cuda:
            why = "no CUDA device is present"
        elif not flash_attn_imports:
            why = "the flash_attn package does not import"
        elif not half:
            raise BackboneError(
                f"model.llm.attn_implementation: 'flash_attention_2' needs a half-precision dtype (bf16 or fp16), "
                f"but the LLM would load in {str(dtype).replace('torch.', '')}; set train.precision: bf16 "
                "(or pass a bf16/fp16 load dtype), or use 'auto' / 'sdpa'")
        else:
            return requested
        raise BackboneError(
            f"model.llm.attn_implementation: 'flash_attention_2' was requested but {why}; "
            "use 'auto' (falls back to sdpa) or 'sdpa', or install flash-attn on a CUDA machine")
    return requested


def resolve_attn_implementation(requested: str, dtype: Optional[torch.dtype] = None) -> str:
    """Map `llm.attn_implementation` to what transformers gets, for an LLM loaded in `dtype`
    (None: float32, as load_llm defaults). See select_attn_implementation for the rule."""
    cuda = torch.cuda.is_available()
    return select_attn_implementation(requested, dtype or torch.float32,
                                      flash_attn_imports=cuda and _flash_attn_imports(), cuda=cuda)


def _zero3_gathered(params, modify: bool = False):
    """Context that materialises ZeRO-3 partitioned `params` (for reading, or with `modify` for an
    in-place edit that rank 0 broadcasts on exit: without a modifier rank DeepSpeed drops edits).

    modeling/ never imports deepspeed: when transformers reports ZeRO-3 active, deepspeed has already
    been imported by the launcher and is taken from sys.modules.
    """
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
        active = is_deepspeed_zero3_enabled()
    except Exception:
        active = False
    ds = sys.modules.get("deepspeed")
    if active and ds is not None:
        return ds.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
    return contextlib.nullcontext()


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (a base model loaded from a causal-LM dir lists lm_head as
    unexpected; a vision model from a full CLIP dir lists every text weight)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextlib.contextmanager
def loading_model_files(key: str, path: str, error: type):
    """A library's error on the files of the user's model folder (a truncated or empty safetensors, a
    config.json that is not JSON, weights of other shapes) becomes `error` (a UserError) naming the
    key and the folder; anything else keeps its traceback."""
    from safetensors import SafetensorError

    try:
        yield
    except UserError:
        raise
    except (OSError, ValueError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{key}: {path!r}: cannot load the model's files ({type(e).__name__}: {first})") from None
    except RuntimeError as e:  # load_state_dict's "size mismatch for ...": weights of another shape
        if "size mismatch" not in str(e):
            raise
        first = next((x.strip() for x in str(e).splitlines() if "size mismatch" in x), str(e))
        raise error(f"{key}: {path!r}: its weights do not fit the model's config ({first})") from None


def _check_dir(path: str, key: str) -> None:
    if not path:
        raise BackboneError(f"{key}: empty; allowed: a local Hugging Face model directory")
    if not os.path.isdir(path):
        raise BackboneError(f"{key}: {path!r} is not a directory")
    if key.endswith(".path") and not os.path.exists(os.path.join(path, "config.json")):
        raise BackboneError(f"{key}: {path!r} has no config.json (not a Hugging Face model directory)")


def check_backbone_dirs(cfg: LLMConfig) -> None:
    """model.llm.path (and tokenizer_path) are Hugging Face model folders: checked by what is on disk,
    nothing loaded, so a run can refuse a wrong path before it loads anything else."""
    _check_dir(cfg.path, "model.llm.path")
    if cfg.tokenizer_path:
        _check_dir(cfg.tokenizer_path, "model.llm.tokenizer_path")


def load_tokenizer(path: str):
    """The tokenizer of a model dir with the placeholder tokens added and a pad token set."""
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens([AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
                    for t in PLACEHOLDER_TOKENS], special_tokens=True)
    if tok.pad_token_id is None:
        # The pad id only fills masked positions; representations are read by position and mask.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if tok.pad_token_id is None:
        raise BackboneError(f"tokenizer at {path!r}: has neither a pad, eos nor unk token to pad with")
    return tok


def load_llm(cfg: LLMConfig, dtype: Optional[torch.dtype] = None, grow_embeddings: Optional[EmbeddingGrower] = None):
    """Load the base model (no LM head) and tokenizer from local dirs; returns (base_model, tokenizer).

    `dtype` defaults to float32 whatever the checkpoint stores; it also decides whether flash-attn may
    be used (bf16/fp16 only).
    The placeholder tokens get embedding rows initialised to the mean of the original vocabulary's rows;
    when the matrix has no spare rows for them it is grown by `grow_embeddings` (see EmbeddingGrower).
    """
    from transformers import AutoConfig, AutoModel

    check_backbone_dirs(cfg)
    tok_path = cfg.tokenizer_path or cfg.path

    with loading_model_files("model.llm.path", cfg.path, BackboneError):
        config = AutoConfig.from_pretrained(cfg.path)
    if not hasattr(config, "num_hidden_layers") or not hasattr(config, "hidden_size"):
        raise BackboneError(f"model.llm.path: {cfg.path!r} holds a {type(config).__name__}, not a decoder LLM config")
    if cfg.num_layers is not None:
        total = config.num_hidden_layers
        if cfg.num_layers > total:
            raise BackboneError(f"model.llm.num_layers: got {cfg.num_layers}; the model at {cfg.path!r} has only {total} layers")
        config.num_hidden_layers = cfg.num_layers
        # Per-layer lists (Qwen2's layer_types: full vs sliding attention) must match the new depth.
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, (list, tuple)) and len(layer_types) > cfg.num_layers:
            config.layer_types = list(layer_types[: cfg.num_layers])
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype)
    # dtype None means float32, not transformers' "auto" (the checkpoint's bf16/fp16): precision is
    # the launcher's choice (the DeepSpeed engine casts to bf16 when asked).
    kwargs = {"config": config, "attn_implementation": attn, "dtype": dtype or torch.float32}
    with quiet_transformers(), loading_model_files("model.llm.path", cfg.path, BackboneError):
        # the report would list lm_head as unexpected; missing weights are checked below
        model, info = AutoModel.from_pretrained(cfg.path, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise BackboneError(f"model.llm.path: {cfg.path!r} lacks {len(missing)} weights of {type(model).__name__} "
                            f"(e.g. {', '.join(missing[:5])}); they would be random: is this the right model directory?")
    model.config.use_cache = False

    with loading_model_files("model.llm.tokenizer_path" if cfg.tokenizer_path else "model.llm.path", tok_path,
                             BackboneError):
        tokenizer = load_tokenizer(tok_path)
    _add_placeholder_rows(model, tokenizer, grow_embeddings)

    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer


def _full_rows(weight: torch.Tensor) -> int:
    """Rows of a (possibly ZeRO-3 partitioned) matrix, read from its metadata: nothing is gathered."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _add_placeholder_rows(model, tokenizer, grow_embeddings: Optional[EmbeddingGrower] = None) -> None:
    """Make room for the placeholder ids and set their rows to the mean of the original rows."""
    new_ids = tokenizer.convert_tokens_to_ids(list(PLACEHOLDER_TOKENS))
    emb = model.get_input_embeddings()
    rows = _full_rows(emb.weight)
    needed = max(new_ids) + 1
    if needed > rows:
        if grow_embeddings is None:
            # mean_resizing=False: we set the rows ourselves, to exactly the mean. Under ZeRO-3,
            # transformers 5.23 hands back the resized matrix as a plain (replicated) tensor, whole on
            # every rank until deepspeed.initialize partitions it: the launcher passes a grower instead.
            model.resize_token_embeddings(needed, mean_resizing=False)
        else:
            grow_embeddings(model, needed)
        emb = model.get_input_embeddings()
        grown = _full_rows(emb.weight)
        if grown < needed:
            raise BackboneError(f"model.llm.path: the input embedding has {grown} rows after growing it; "
                                f"the placeholder tokens need {needed}")
    # The original vocabulary: every id below the first placeholder id, bounded by the old matrix.
    n_old = min(min(new_ids), rows)
    with _zero3_gathered([emb.weight], modify=True), torch.no_grad():
        mean = emb.weight[:n_old].float().mean(dim=0)
        for i in new_ids:
            emb.weight[i] = mean.to(emb.weight.dtype)
