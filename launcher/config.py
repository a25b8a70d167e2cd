"""The run schema: one dataclass tree, filled from YAML files and `a.b=c` overrides.

`modeling` and `data_shards` own the dataclasses of their sections; this module composes them
and validates everything before any work starts. Every error names the dotted key, the value
and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from notellm2 import find_shipped
from notellm2.data_shards.config import DataConfig
from notellm2.modeling.config import LossConfig, ModelConfig, check_model_and_loss
from notellm2.schema import ConfigError, build_dataclass
from notellm2.files import atomic_write


def _pos(allowed="an integer > 0"):
    return {"check": lambda v: v > 0, "allowed": allowed}


def _nonneg(allowed="a number >= 0"):
    return {"check": lambda v: v >= 0, "allowed": allowed}


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    # DeepSpeed JSON (relative paths are looked up from the working directory, then the repo).
    ds_config: str = "ds_configs/zero3_bf16.json"
    max_steps: int = field(default=100, metadata=_pos())
    grad_accum_steps: int = field(default=1, metadata=_pos())
    lr_llm: float = field(default=3e-5, metadata=_pos("a number > 0"))
    # Learning rate of the new modules: connector, fusion gate, head, temperature.
    lr_new: float = field(default=1e-4, metadata=_pos("a number > 0"))
    weight_decay: float = field(default=0.0, metadata=_nonneg())
    warmup_steps: int = field(default=0, metadata=_nonneg("an integer >= 0"))
    # Warm-up as a fraction of train.max_steps; when set, train.warmup_steps becomes round(ratio * max_steps).
    warmup_ratio: Optional[float] = field(default=None, metadata={"check": lambda v: 0 <= v <= 1,
                                                                  "allowed": "null or a number in [0, 1]"})
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = field(default=0.0, metadata={"check": lambda v: 0 <= v <= 1, "allowed": "a number in [0, 1]"})
    grad_clip: float = field(default=1.0, metadata=_nonneg())
    precision: Literal["fp32", "bf16"] = "bf16"
    seed: int = 0
    # Chunked representation caching (GradCache, launcher/train/chunked.py): 0 off; c > 0 runs each rank's
    # data.pairs_per_rank pairs in chunks of c pairs: a forward of every chunk without gradient keeps
    # the representations, the gathered loss gives their gradients, then every chunk runs again with
    # gradient and back-propagates them. Same loss and gradient as without chunks (dropout included),
    # activation memory of c pairs instead of pairs_per_rank, about one extra forward per step.
    # Must divide data.pairs_per_rank (every rank runs the same number of chunks: ZeRO-3 gathers).
    chunk_pairs: int = field(default=0, metadata=_nonneg("an integer >= 0 (0: off)"))
    # A dead or stuck rank ends the job after this many seconds without a finished collective.
    collective_timeout_s: int = field(default=600, metadata=_pos())


@dataclass
class EvalConfig:
    # Recall@K cut-offs of the I2I protocol.
    k_values: list[int] = field(default_factory=lambda: [10, 100, 1000])
    batch_size: int = field(default=32, metadata=_pos())
    # Evaluate every N training steps (0: only when `notellm2 eval` is run).
    every_steps: int = field(default=0, metadata=_nonneg("an integer >= 0"))
    # Retrieval during training (every eval.every_steps): the first `max_notes` notes of these notes
    # shards (shard order) are embedded on all ranks, each a part, and the val pairs of `pairs` (a
    # pairs folder or pairs.parquet) whose two notes are both among them are ranked (all-pairs protocol
    # on the slice). Empty: no retrieval evaluation, only the validation loss.
    notes_shards: str = ""
    pairs: str = ""
    max_notes: int = field(default=500, metadata=_pos())
    # Probes evaluated: eval/recall@K (both) and eval/<probe>_recall@K for the others; a probe the
    # variant does not have (text variants: image) is skipped.
    probes: list[str] = field(default_factory=lambda: ["both", "image"])
    # The frozen tower's outputs for the evaluation batches (val pairs and the retrieval slice) are
    # computed at the first evaluation and reused by the later ones (notellm2.launcher.train.validation.TowerMemo),
    # up to this many MiB per rank on the CPU; 0 runs the tower at every evaluation.
    tower_memo_mb: float = field(default=2048.0, metadata=_nonneg())


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    log_every_steps: int = field(default=1, metadata=_pos())


@dataclass
class CheckpointConfig:
    every_steps: int = field(default=100, metadata=_pos())
    keep_last: int = field(default=2, metadata=_pos())
    # "auto": continue from the latest complete checkpoint if any; "none"; or a checkpoint path.
    resume: str = "auto"
    # Resume even when the checkpoint's config hash differs from this run's.
    allow_config_mismatch: bool = False
    # Also keep the best checkpoint by this logged metric (e.g. "eval/recall@100", higher is better;
    # a name containing "loss", e.g. "eval/val_loss", lower is better), beside the last keep_last.
    # A step where the metric improves is checkpointed even between checkpoint.every_steps.
    keep_best: str = ""


@dataclass
class RunConfig:
    name: str = "notellm2"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ----------------------------------------------------------------------------- validation

def _cross_checks(cfg: RunConfig) -> None:
    check_model_and_loss(cfg.model, cfg.loss)
    chunk, pairs = cfg.train.chunk_pairs, cfg.data.pairs_per_rank
    if chunk and pairs % chunk:
        divisors = [d for d in range(1, pairs + 1) if pairs % d == 0]
        raise ConfigError(f"train.chunk_pairs: got {chunk}; allowed: 0 (off) or a divisor of data.pairs_per_rank "
                          f"({pairs}): {', '.join(map(str, divisors))}")
    if cfg.train.warmup_ratio is not None:
        derived = round(cfg.train.warmup_ratio * cfg.train.max_steps)
        # A resolved config (config.resolved.yaml) holds both, equal: that one loads again.
        if cfg.train.warmup_steps not in (0, derived):
            raise ConfigError(f"train.warmup_ratio: got {cfg.train.warmup_ratio} with train.warmup_steps "
                              f"{cfg.train.warmup_steps}; allowed: one of the two (or warmup_steps: {derived}, "
                              f"= round(warmup_ratio * train.max_steps))")
        cfg.train.warmup_steps = derived
    if (cfg.eval.notes_shards == "") != (cfg.eval.pairs == ""):
        raise ConfigError("eval.notes_shards and eval.pairs: set both (retrieval evaluation during training) or neither")
    from notellm2.modeling.names import PROBE_MODES

    bad = [p for p in cfg.eval.probes if p not in PROBE_MODES]
    if bad:
        raise ConfigError(f"eval.probes: got {bad}; allowed: {', '.join(PROBE_MODES)}")
    if cfg.checkpoint.keep_best and not cfg.eval.every_steps:
        raise ConfigError(f"checkpoint.keep_best: {cfg.checkpoint.keep_best!r} needs eval.every_steps > 0 (the metric is "
                          "computed at each evaluation)")
    if any(k <= 0 for k in cfg.eval.k_values):
        raise ConfigError(f"eval.k_values: got {cfg.eval.k_values}; allowed: integers > 0")


# ----------------------------------------------------------------------------- loading

def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as a YAML scalar (so 3 -> int, true -> bool, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def _set_dotted(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {'.'.join(parts)}")
        node = nxt
    node[parts[-1]] = value


def config_from_dict(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config: top level must be a mapping, got {type(data).__name__}")
    cfg = build_dataclass(RunConfig, data)
    _cross_checks(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a YAML file (optional), apply dotted overrides, validate, return the RunConfig."""
    data: dict = {}
    if path:
        path = find_shipped(path)  # configs/*.yaml ship with the package too
        if not os.path.exists(path):
            raise ConfigError(f"config file {path}: does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:  # a folder, an unreadable file, bytes that are not UTF-8
            raise ConfigError(f"config file {path}: cannot be read as YAML text ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    for ov in overrides or []:
        parts, value = parse_override(ov)
        _set_dotted(data, parts, value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


HASH_OMITTED_AT_DEFAULT = {"loss.logq_correction": False, "loss.mask_known_positives": False}


def _get_dotted(d: dict, key: str):
    for p in key.split("."):
        d = d[p]
    return d


def config_hash(cfg: RunConfig, ignore: tuple[str, ...] = ("train.output_dir", "train.max_steps", "train.chunk_pairs",
                                                           "checkpoint", "logging", "eval")) -> str:
    """Hash of the settings that change what a checkpoint means (paths and run length excluded; so is
    train.chunk_pairs: chunked caching computes the same step, so a run may turn it on or off when it resumes)."""
    d = config_to_dict(cfg)
    chunk, pairs = cfg.train.chunk_pairs, cfg.data.pairs_per_rank
    if chunk and pairs % chunk:
        divisors = [d for d in range(1, pairs + 1) if pairs % d == 0]
        raise ConfigError(f"train.chunk_pairs: got {chunk}; allowed: 0 (off) or a divisor of data.pairs_per_rank "
                          f"({pairs}): {', '.join(map(str, divisors))}")
    if cfg.train.warmup_ratio is not None:
        # Derived from warmup_ratio (hashed) and max_steps (deliberately not): extending a run keeps its hash.
        ignore = (*ignore, "train.warmup_steps")
    # keys added after runs were already hashed: at their default they stay out, so an older run keeps its hash
    ignore = (*ignore, *(k for k, default in HASH_OMITTED_AT_DEFAULT.items() if _get_dotted(d, k) == default))
    if not cfg.model.llm.lora.enabled:  # added later too; its other keys mean nothing while it is off
        ignore = (*ignore, "model.llm.lora")
    for key in ignore:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node[p]
        node.pop(parts[-1], None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def save_resolved(cfg: RunConfig, run_dir: str) -> str:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.resolved.yaml")
    with atomic_write(path) as fh:
        yaml.safe_dump(config_to_dict(cfg), fh, sort_keys=False)
    return path
