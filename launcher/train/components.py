"""What a run is built from: the note model, the frozen vision tower, the prompter and the loaders.

The loop gets them from a *components factory* `fn(cfg, rank, world_size, ds_config) -> Components`;
the default one (`default_components`) builds the real NoteModel, vision tower, prompter and
PairLoader. Tests pass their own factory through `train(cfg, factory=...)` or `--components module:fn`.
Also here: the training batches as one stream over epochs (`BatchStream`). A batch goes onto the
training device with `notellm2.data_shards.batch.to_device`
and through the frozen tower with `notellm2.modeling.vision.encode_images` (which returns the features of a
batch from a vision cache, data.vision_cache, without running the tower).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from notellm2.launcher.config import ConfigError, RunConfig
from notellm2.modeling.vision import encode_images


@dataclass
class Components:
    """What the loop trains. `make_loader(epoch)` returns an iterable of batch dicts with
    `state_dict()` / `load_state_dict()`; `make_val_loader()` (optional) returns one pass of
    validation batches (the same number on every rank) for the validation loss every
    `eval.every_steps` steps."""

    note_model: torch.nn.Module
    vision_tower: Optional[torch.nn.Module]
    prompter: Any
    make_loader: Callable[[int], Any]
    make_val_loader: Optional[Callable[[], Any]] = None
    extra: dict = field(default_factory=dict)

    def freeze_vision_tower(self, device: torch.device) -> None:
        """The tower stays replicated on `device`, in eval mode, outside the optimizer. With a vision cache
        (`extra["vision_cache"]`: every batch carries the tower's features) it is never run, so it stays
        on the host: no device memory for its weights (3.4 GiB for ViT-bigG in bf16)."""
        if self.vision_tower is not None:
            self.vision_tower.to("cpu" if self.extra.get("vision_cache") is not None else device).eval()
            for p in self.vision_tower.parameters():
                p.requires_grad_(False)

    def image_features(self, batch: dict, cast=None):
        """`notellm2.modeling.vision.encode_images` with this run's tower (None, None without one)."""
        return encode_images(self.vision_tower, batch, cast)


BAD_SAMPLES_DIR = "bad_samples"  # in train.output_dir: <loader>-rank<R>.jsonl, one JSON line per bad sample


def bad_sample_log(cfg: RunConfig, loader: str, rank: int) -> str:
    """This rank's bad-sample log of `loader` ("train", "val") in the run folder (BadSampleLog)."""
    import os

    return os.path.join(cfg.train.output_dir, BAD_SAMPLES_DIR, f"{loader}-rank{rank:05d}.jsonl")


def default_components(cfg: RunConfig, rank: int, world_size: int, ds_config: dict) -> Components:
    """The real pieces: NoteModel + frozen vision tower + prompter (modeling) and PairLoader (data_shards).

    The vision tower is built first, with no DeepSpeed context, so that it stays whole and replicated;
    the LLM is then loaded inside a live HfDeepSpeedConfig so that ZeRO-3 partitions it while loading
    (a large model never sits whole on one rank)."""
    from transformers.integrations import HfDeepSpeedConfig

    from notellm2.data_shards.reader import PairLoader
    from notellm2.launcher.train.partitioning import embedding_grower
    from notellm2.launcher.train.vision_cache import check_run_cache
    from notellm2.modeling.backbone import load_llm
    from notellm2.modeling.encoder import build_note_model
    from notellm2.modeling.lora import apply_lora
    from notellm2.modeling.vision import build_vision_tower

    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: empty; point it at pairs-train-*.tar shards (notellm2 data write-shards)")
    tower = build_vision_tower(cfg.model.vision, variant=cfg.model.variant)
    # data.vision_cache: refused now, before the LLM loads, when it is not this tower's or misses a shard
    vision_cache = check_run_cache(cfg, tower)
    note_stats = _note_stats(cfg)  # loss.logq_correction / mask_known_positives: refused now when absent
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    # bf16 runs load in bf16 (what ZeRO casts to anyway) so that flash-attn is allowed; under ZeRO-3 the
    # placeholder rows are added without making the embedding whole on every rank (launcher/train/partitioning.py).
    llm, tokenizer = load_llm(cfg.model.llm, dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
                              grow_embeddings=embedding_grower(ds_config))
    llm = apply_lora(llm, cfg.model.llm.lora, tokenizer)  # model.llm.lora: adapters, the rest of the LLM frozen
    note_model = build_note_model(cfg.model, cfg.loss, tower, llm=llm, tokenizer=tokenizer)
    prompter = note_model.make_prompter(tokenizer, cfg.model.prompt_language, cfg.model.max_text_tokens)

    def make_loader(epoch: int):
        return PairLoader(cfg.data.train_shards, None, data_cfg=cfg.data, encode_fn=prompter.encode,
                          collate_text_fn=prompter.collate, rank=rank, world_size=world_size,
                          pairs_per_rank=cfg.data.pairs_per_rank, image_size=cfg.model.vision.image_size,
                          epoch=epoch, note_stats=note_stats, bad_sample_log=bad_sample_log(cfg, "train", rank))

    make_val_loader = None
    if cfg.data.val_shards:
        val_cfg = dataclasses.replace(cfg.data, random_flip=False, resampled=False)

        def make_val_loader():
            return PairLoader(cfg.data.val_shards, None, data_cfg=val_cfg, encode_fn=prompter.encode,
                              collate_text_fn=prompter.collate, rank=rank, world_size=world_size,
                              pairs_per_rank=cfg.data.pairs_per_rank, image_size=cfg.model.vision.image_size, epoch=0,
                              note_stats=note_stats,  # the training pairs' statistics: nothing of val leaks in
                              bad_sample_log=bad_sample_log(cfg, "val", rank))

    return Components(note_model, tower, prompter, make_loader, make_val_loader=make_val_loader,
                      extra={"hf_ds_config": hf_ds, "vision_cache": vision_cache})


def check_inputs(cfg: RunConfig, world_size: int) -> None:
    """The default components' inputs, checked before a process group starts or a model loads (the
    trainer calls `factory.preflight`): the shard sets (present, of the right kind, and holding at
    least one batch per rank in the first epoch) and the LLM's folder (before the vision tower loads).
    Each failure is one line naming the config key (a UserError)."""
    from notellm2.data_shards.reader.pair_loader import ShardSetError, check_batch_fits
    from notellm2.data_shards.reader.shard_index import ShardKindError, check_shard_kind, expand_shards
    from notellm2.modeling.backbone import check_backbone_dirs

    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: empty; point it at pairs-train-*.tar shards (notellm2 data write-shards)")
    sets = [("data.train_shards", cfg.data.train_shards, "pairs"), ("data.val_shards", cfg.data.val_shards, "pairs")]
    if cfg.eval.every_steps and cfg.eval.notes_shards:
        sets.append(("eval.notes_shards", cfg.eval.notes_shards, "notes"))
    for key, shards, kind in sets:
        if not shards:
            continue
        try:
            check_shard_kind(expand_shards(shards), kind, key, "training" if key != "eval.notes_shards" else
                             "the retrieval evaluation")
        except ShardKindError:
            raise
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{key}: {e}") from None
    try:
        check_batch_fits(cfg.data.train_shards, cfg.data, world_size, cfg.data.pairs_per_rank)
    except ShardSetError as e:
        raise ConfigError(f"data.train_shards and data.pairs_per_rank: {e}") from None
    check_backbone_dirs(cfg.model.llm)


default_components.preflight = check_inputs


def _note_stats(cfg: RunConfig):
    """The training shards' note statistics when the loss asks for them (data_shards/writing/note_stats.py)."""
    from notellm2.data_shards.writing.note_stats import NoteStatsError, load_for_run
    from notellm2.data_shards.reader.shard_index import expand_shards

    keys = [k for k, on in (("loss.logq_correction", cfg.loss.logq_correction),
                            ("loss.mask_known_positives", cfg.loss.mask_known_positives)) if on]
    if not keys:
        return None
    try:
        return load_for_run(expand_shards(cfg.data.train_shards), cfg.loss.logq_correction,
                            cfg.loss.mask_known_positives)
    except (NoteStatsError, FileNotFoundError) as e:
        raise ConfigError(f"{' and '.join(keys)}: {e}") from None


def load_factory(spec: str) -> Callable:
    from notellm2.codenames import import_code

    return import_code(spec, "--components", ConfigError)


class BatchStream:
    """The training batches as one stream: `make_loader(epoch)`, moved on to the next epoch when a
    loader runs out. A reader that moves over epochs by itself (PairLoader.endless) is used as one
    endless stream. `state_dict()` is the reader's state with the epoch (what a checkpoint keeps)."""

    def __init__(self, make_loader: Callable[[int], Any], epoch: int = 0, reader_state: Any = None):
        self.make_loader, self.epoch = make_loader, epoch
        self.loader = make_loader(epoch)
        if reader_state is not None:
            self.loader.load_state_dict(reader_state)
        self._it = iter(self.loader.endless()) if hasattr(self.loader, "endless") else iter(self.loader)

    def next(self) -> dict:
        # The loader's own draws from the torch generator (a DataLoader takes a base seed when it starts
        # its workers: at the first batch of a process, so at step 1 of a fresh run but at the first step
        # after a resume) stay out of the model's random stream: a resumed run then draws the same dropout
        # masks as the unbroken one (tests/launcher/train/test_chunked_resume.py).
        with torch.random.fork_rng(devices=[]):
            return self._next()

    def _next(self) -> dict:
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self.loader = self.make_loader(self.epoch)
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise RuntimeError(f"the data loader yields no batch (epoch {self.epoch}); check data.train_shards") from None

    def state_dict(self):
        state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else {}
        if isinstance(state, dict):
            state = dict(state)
            state.setdefault("epoch", self.epoch)
        return state
