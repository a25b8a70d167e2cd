"""The training loop (`notellm2 train`): DeepSpeed ZeRO engine around the note model, our own loop.

    rank/world from torchrun or Slurm -> process group (gloo on CPU, nccl on GPU) + watchdog
    DeepSpeed JSON + YAML batch sizes -> HfDeepSpeedConfig alive -> build model (LLM partitioned)
    client AdamW (param groups) + LR schedule -> deepspeed.initialize
    resume (same world size: exact; other world size: universal checkpoint)
    loop: batch -> frozen vision tower (no_grad, replicated) -> engine forward/backward/step
          -> metrics (rank 0) -> checkpoint every N steps and at the end

The pieces the loop drives are built by a *components factory* `fn(cfg, rank, world_size, ds_config)
-> Components`; the default one (`default_components`) builds the real NoteModel, vision tower,
prompter and PairLoader. Tests pass their own factory through `train(cfg, factory=...)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import warnings
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from data_shards.collate import normalize_pixels
from launcher import checkpoint as ckpt
from launcher.config import ConfigError, RunConfig, config_hash, config_to_dict, save_resolved
from launcher.distributed import (Topology, Watchdog, all_gather_object, all_reduce, barrier, detect_topology,
                                  enable_crash_traces, init_distributed)
from launcher.metrics import MetricsWriter, memory_mb
from launcher.optim import build_optimizer, build_scheduler, clamp_temperature, param_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Keys of a DeepSpeed JSON that the launcher fills from the YAML; a JSON that sets them is refused.
LAUNCHER_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")
# Test hooks: "RANK:STEP" -> that rank sleeps forever / dies at the start of that step.
HANG_HOOK_ENV = "NOTELLM2_TEST_HANG_AT"
DIE_HOOK_ENV = "NOTELLM2_TEST_DIE_AT"


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


# ----------------------------------------------------------------------------- DeepSpeed config

def resolve_path(path: str) -> str:
    if os.path.isabs(path) or os.path.exists(path):
        return path
    alt = os.path.join(REPO, path)
    return alt if os.path.exists(alt) else path


def build_ds_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """Read the DeepSpeed JSON named by train.ds_config and fill what comes from the YAML."""
    path = resolve_path(cfg.train.ds_config)
    if not os.path.isfile(path):
        raise ConfigError(f"train.ds_config: {cfg.train.ds_config} does not exist (looked in the working directory and {REPO})")
    with open(path) as fh:
        try:
            ds = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from None
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    for key in LAUNCHER_KEYS:
        if key in ds:
            raise ConfigError(f"train.ds_config: {path} sets {key!r}; batch sizes, clipping, precision and the "
                              "optimizer come from the YAML (data.pairs_per_rank, train.grad_accum_steps, "
                              "train.grad_clip, train.precision, train.lr_*): remove it from the JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.pairs_per_rank
    ds["gradient_accumulation_steps"] = cfg.train.grad_accum_steps
    ds["train_batch_size"] = cfg.data.pairs_per_rank * cfg.train.grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.train.grad_clip
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    ds.setdefault("zero_allow_untested_optimizer", True)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


# ----------------------------------------------------------------------------- components

def default_components(cfg: RunConfig, rank: int, world_size: int, ds_config: dict) -> Components:
    """The real pieces: NoteModel + frozen vision tower + prompter (modeling) and PairLoader (data_shards).

    The vision tower is built first, with no DeepSpeed context, so that it stays whole and replicated;
    the LLM is then loaded inside a live HfDeepSpeedConfig so that ZeRO-3 partitions it while loading
    (a large model never sits whole on one rank)."""
    from transformers.integrations import HfDeepSpeedConfig

    from data_shards.reader import PairLoader
    from launcher.partitioning import embedding_grower
    from modeling.backbone import load_llm
    from modeling.encoder import build_note_model
    from modeling.vision import build_vision_tower

    if not cfg.data.train_shards:
        raise ConfigError("data.train_shards: empty; point it at pairs-train-*.tar shards (notellm2 data write-shards)")
    tower = build_vision_tower(cfg.model.vision, variant=cfg.model.variant)
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"].get("stage") == 3 else None
    # bf16 runs load in bf16 (what ZeRO casts to anyway) so that flash-attn is allowed; under ZeRO-3 the
    # placeholder rows are added without making the embedding whole on every rank (launcher/partitioning.py).
    llm, tokenizer = load_llm(cfg.model.llm, dtype=torch.bfloat16 if cfg.train.precision == "bf16" else None,
                              grow_embeddings=embedding_grower(ds_config))
    note_model = build_note_model(cfg.model, cfg.loss, tower, llm=llm, tokenizer=tokenizer)
    prompter = note_model.make_prompter(tokenizer, cfg.model.prompt_language, cfg.model.max_text_tokens)

    def make_loader(epoch: int):
        return PairLoader(cfg.data.train_shards, None, data_cfg=cfg.data, encode_fn=prompter.encode,
                          collate_text_fn=prompter.collate, rank=rank, world_size=world_size,
                          pairs_per_rank=cfg.data.pairs_per_rank, image_size=cfg.model.vision.image_size,
                          epoch=epoch, normalize=False)

    make_val_loader = None
    if cfg.data.val_shards:
        val_cfg = dataclasses.replace(cfg.data, random_flip=False, resampled=False)

        def make_val_loader():
            return PairLoader(cfg.data.val_shards, None, data_cfg=val_cfg, encode_fn=prompter.encode,
                              collate_text_fn=prompter.collate, rank=rank, world_size=world_size,
                              pairs_per_rank=cfg.data.pairs_per_rank, image_size=cfg.model.vision.image_size, epoch=0,
                              normalize=False)

    return Components(note_model, tower, prompter, make_loader, make_val_loader=make_val_loader,
                      extra={"hf_ds_config": hf_ds})


def load_factory(spec: str) -> Callable:
    if ":" not in spec:
        raise ConfigError(f"components factory {spec!r}: expected 'module:function'")
    mod, fn = spec.split(":", 1)
    return getattr(importlib.import_module(mod), fn)


# ----------------------------------------------------------------------------- helpers

def _hook_hit(env_name: str, rank: int, step: int) -> bool:
    spec = os.environ.get(env_name, "")
    if not spec:
        return False
    r, _, s = spec.partition(":")
    return int(r) == rank and int(s) == step


def copy_can_be_async(src_device: torch.device, src_pinned: bool, target: torch.device) -> bool:
    """Whether `tensor.to(target, non_blocking=True)` is safe and useful: only a pinned host tensor
    going to a CUDA device. From pageable memory CUDA stages the copy synchronously anyway, and a
    non-blocking copy *to* the host can be read before it has landed."""
    return torch.device(target).type == "cuda" and torch.device(src_device).type == "cpu" and bool(src_pinned)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # is_pinned() only matters (and is only asked) when the copy goes to CUDA.
    async_ok = torch.device(device).type == "cuda" and copy_can_be_async(t.device, t.is_pinned(), device)
    return t.to(device, non_blocking=async_ok)


def cast_unpartitioned_to_bf16(model: torch.nn.Module) -> None:
    """The LLM comes partitioned in bf16 (HfDeepSpeedConfig); the new modules are built in fp32. ZeRO
    wants one dtype: cast what is not partitioned yet (DeepSpeed keeps fp32 master copies). The LLM's
    own float32 buffers (e.g. RoPE frequencies) keep the dtype transformers chose."""
    for p in model.parameters():
        if not hasattr(p, "ds_id") and p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
    for name, b in model.named_buffers():
        if b.dtype == torch.float32 and not name.startswith("llm."):
            b.data = b.data.to(torch.bfloat16)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors to `device` (non-blocking only from pinned memory to CUDA, see `copy_can_be_async`);
    uint8 `pixel_values` (the loaders' normalize=False) are CLIP-normalised there, after the copy: a
    quarter of the bytes to move and no normalising on the loader's CPU."""
    out = {k: (_to(v, device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    pix = out.get("pixel_values")
    if torch.is_tensor(pix) and pix.dtype == torch.uint8:
        out["pixel_values"] = normalize_pixels(pix, out["image_present"])
    return out


def count_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if torch.is_tensor(mask) else 0


def model_state_bytes(engine) -> dict:
    """Bytes of model state this rank actually holds: its parameter partitions, fp32 master
    partitions, gradient partitions and optimizer states (ZeRO-3 and ZeRO-1/2)."""
    def nbytes(t):
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    params = 0
    for p in engine.module.parameters():
        held = getattr(p, "ds_tensor", None)
        params += nbytes(held) if held is not None else nbytes(p.data)
    opt = engine.optimizer
    master = 0
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for t in getattr(opt, name, None) or []:
            master += nbytes(t)
    grads = 0
    for name in ("grad_partitions_flat_buffer",):
        grads += nbytes(getattr(opt, name, None))
    if grads == 0:
        for group in getattr(opt, "averaged_gradients", {}) or {}:
            value = opt.averaged_gradients[group]
            grads += sum(nbytes(t) for t in (value if isinstance(value, list) else [value]))
    inner = getattr(opt, "optimizer", opt)
    states = 0
    for st in inner.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                states += nbytes(v)
    total = params + master + grads + states
    return {"params": params, "master": master, "grads": grads, "optimizer": states, "total": total}


def validation_loss(engine, comps: Components, device, cast, tick: Callable[[], None]) -> dict:
    """Mean loss (and mICL parts) over one pass of the validation pairs, averaged over ranks.
    In-batch negatives come from the validation batch, as in training."""
    engine.module.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, loss_mm, loss_vis, batches
    try:
        with torch.no_grad():
            for batch in comps.make_val_loader():
                tick()
                batch = move_batch(batch, device)
                image_tokens = image_pooled = None
                if comps.vision_tower is not None and "pixel_values" in batch:
                    image_tokens, image_pooled = comps.vision_tower(batch["pixel_values"])
                    if cast is not None:
                        image_tokens, image_pooled = image_tokens.to(cast), image_pooled.to(cast)
                out = engine(batch, image_tokens=image_tokens, image_pooled=image_pooled)
                for i, key in enumerate(("loss", "loss_mm", "loss_vis")):
                    if out.get(key) is not None:
                        sums[i] += float(out[key].float())
                sums[3] += 1
    finally:
        engine.module.train()
    all_reduce(sums)
    if sums[3] == 0:
        return {}
    result = {"val_loss": (sums[0] / sums[3]).item()}
    if sums[1] != 0:
        result["val_loss_mm"] = (sums[1] / sums[3]).item()
        result["val_loss_vis"] = (sums[2] / sums[3]).item()
    return result


PEER_ERROR_MARKERS = ("connection closed by peer", "connection reset by peer", "read error", "timed out",
                      "broken pipe", "nccl", "socket", "distbackenderror")


def is_peer_error(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung (not this rank's own fault)."""
    text = f"{type(e).__name__}: {e}".lower()
    return isinstance(e, RuntimeError) and any(m in text for m in PEER_ERROR_MARKERS)


def flatten_counters(stats: dict) -> dict:
    """Loader stats {"dropped": {"bad_image": 2}, "batches": 8} -> {"dropped/bad_image": 2,
    "dropped_total": 2, "batches": 8}: numbers only, nested groups also summed."""
    out = {}
    for key, value in (stats or {}).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[key] = value
        elif isinstance(value, dict):
            nums = {k: v for k, v in value.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for k, v in nums.items():
                out[f"{key}/{k}"] = v
            out[f"{key}_total"] = sum(nums.values())
    return out


class _Timer:
    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def pop(self) -> dict:
        out, self.totals = self.totals, {}
        return out


# ----------------------------------------------------------------------------- the loop

def train(cfg: RunConfig, factory: Optional[Callable] = None, topo: Optional[Topology] = None,
          on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run training to cfg.train.max_steps. Returns a summary dict (rank-local)."""
    enable_crash_traces()  # first: a native crash anywhere below prints every thread's stack to this rank's log
    topo = topo or detect_topology()
    # torch 2.13 deprecation notices from inside DeepSpeed, once per collective call: keep the console readable.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed", category=FutureWarning)
    rank, world = topo.rank, topo.world_size
    timeout = cfg.train.collective_timeout_s
    # The watchdog speaks first; the gloo timeout is the second line of defence.
    init_distributed(topo, timeout_s=int(timeout * 1.5) + 10)
    watchdog = Watchdog(rank, world, timeout).start()
    log = (lambda *a: print(f"[rank 0]", *a, flush=True)) if rank == 0 else (lambda *a: None)
    step = 0
    try:
        summary = _train(cfg, factory or default_components, topo, watchdog, log, on_step)
        step = summary["step"]
        watchdog.progress(step, "done")
        watchdog.stop()
        barrier()
        return summary
    except Preempted:
        watchdog.stop()
        raise
    except BaseException as e:
        peer_error = world > 1 and is_peer_error(e)
        where = f"at step {watchdog.step} ({watchdog.phase})"
        msg = (f"rank {rank}: a collective failed {where}, most likely because of another rank: {e}" if peer_error
               else f"rank {rank} failed {where}: {type(e).__name__}: {e}")
        if not peer_error:
            # Our own failure: say so in the store first, so that the other ranks' messages name us.
            watchdog.mark_failed(f"{type(e).__name__}: {e}")
        print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)
        if world > 1 and not isinstance(e, (ConfigError, ckpt.CheckpointError)):
            time.sleep(1.0)  # let a failing peer publish its mark
            try:
                print(f"[rank {rank}] {watchdog.diagnose(exclude=(rank,))}", file=sys.stderr, flush=True)
            except Exception:
                pass
        raise


def _train(cfg: RunConfig, factory: Callable, topo: Topology, watchdog: Watchdog, log, on_step) -> dict:
    import deepspeed

    rank, world = topo.rank, topo.world_size
    run_dir = cfg.train.output_dir
    root = ckpt.checkpoint_root(run_dir)
    chash = config_hash(cfg)
    device = torch.device("cuda", topo.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    if rank == 0:
        save_resolved(cfg, run_dir)
        for path in ckpt.remove_partial(root):
            log(f"removed the leftovers of an interrupted save: {path}")
    plan = ckpt.plan_resume(cfg.checkpoint.resume, root, world, chash, cfg.checkpoint.allow_config_mismatch)
    if plan is not None and plan.universal:
        if rank == 0:
            ckpt.convert_to_universal(plan, world, log=log)
        watchdog.progress(0, "universal-conversion")
        barrier()

    ds_config = build_ds_config(cfg, world, load_universal=bool(plan and plan.universal))
    torch.manual_seed(cfg.train.seed)
    comps = factory(cfg, rank, world, ds_config)
    model = comps.note_model
    if comps.vision_tower is not None:
        comps.vision_tower.to(device).eval()
        for p in comps.vision_tower.parameters():
            p.requires_grad_(False)

    if cfg.train.precision == "bf16":
        cast_unpartitioned_to_bf16(model)
    groups = param_groups(model, cfg.train.lr_llm, cfg.train.lr_new, cfg.train.weight_decay)
    group_names = [g["name"] for g in groups]
    optimizer = build_optimizer(groups, ds_config)
    sched_fn = lambda opt: build_scheduler(opt, cfg.train.lr_schedule, cfg.train.warmup_steps,  # noqa: E731
                                           cfg.train.max_steps, cfg.train.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched_fn,
                                                   config=ds_config, dist_init_required=False)
    watchdog.progress(0, "initialised")

    start_step, samples_seen, epoch, reader_state = 0, 0, 0, None
    if plan is not None:
        restored = ckpt.load(engine, plan, rank)
        start_step = plan.step
        samples_seen = int(plan.manifest.get("samples_seen", 0))
        reader_state = restored["reader"]
        states = restored["reader_states"] or []
        epoch_src = reader_state if reader_state is not None else (states[0] if states else None)
        epoch = int(epoch_src.get("epoch", 0)) if isinstance(epoch_src, dict) else 0
        if plan.universal:
            log(f"resumed step {start_step} from {plan.path} through a universal checkpoint "
                f"(world size {plan.manifest['world_size']} -> {world}); the data reader restarts epoch {epoch}'s shards")
        else:
            log(f"resumed step {start_step} from {plan.path} (exact: model, optimizer, scheduler, RNG, data reader)")
    else:
        torch.manual_seed(cfg.train.seed + 1000 + rank)

    loader = comps.make_loader(epoch)
    if reader_state is not None:
        loader.load_state_dict(reader_state)
    elif plan is not None and plan.universal and plan.manifest.get("reader_states"):
        # Every old rank's state: the reader restarts the epoch with the shards no old rank had started.
        loader.load_state_dict(plan.manifest["reader_states"])
    # A reader that moves over epochs by itself (PairLoader.endless) is used as one endless stream.
    it = iter(loader.endless()) if hasattr(loader, "endless") else iter(loader)

    if cfg.eval.every_steps and comps.make_val_loader is not None:
        try:  # fail now, not at the first evaluation
            comps.make_val_loader()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"data.val_shards: cannot evaluate every {cfg.eval.every_steps} steps: {e}") from None
    preempt = _install_preemption()
    metrics = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                            max_steps=cfg.train.max_steps, start_step=start_step)
    timer = _Timer()
    cast = torch.bfloat16 if cfg.train.precision == "bf16" else None
    last_saved = start_step if plan is not None else -1
    step = start_step
    accum = cfg.train.grad_accum_steps
    log(f"training steps {start_step + 1}..{cfg.train.max_steps} on {world} rank(s), "
        f"{cfg.data.pairs_per_rank} pairs/rank x {accum} accumulation; run dir {run_dir}")

    def next_batch():
        nonlocal it, loader, epoch
        try:
            return next(it)
        except StopIteration:
            epoch += 1
            loader = comps.make_loader(epoch)
            it = iter(loader)
            try:
                return next(it)
            except StopIteration:
                raise RuntimeError(f"the data loader yields no batch (epoch {epoch}); check data.train_shards") from None

    try:
        while step < cfg.train.max_steps:
            step += 1
            if _hook_hit(HANG_HOOK_ENV, rank, step):
                print(f"[test hook] rank {rank} hangs at step {step}", flush=True)
                while True:
                    time.sleep(3600)
            if _hook_hit(DIE_HOOK_ENV, rank, step):
                print(f"[test hook] rank {rank} kills itself (SIGKILL) at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            watchdog.progress(step, "data", arm=True)
            t_step = time.perf_counter()
            parts = {"loss": 0.0, "loss_mm": 0.0, "loss_vis": 0.0}
            seen_parts, extras, tokens, notes = set(), {}, 0, 0
            for _ in range(accum):
                with timer("data_wait"):
                    batch = next_batch()
                batch = move_batch(batch, device)
                tokens += count_tokens(batch)
                notes += int(batch["note_ids"].shape[0]) if "note_ids" in batch else 0
                watchdog.progress(step, "forward")
                with timer("forward"):
                    image_tokens = image_pooled = None
                    if comps.vision_tower is not None and "pixel_values" in batch:
                        with torch.no_grad():
                            image_tokens, image_pooled = comps.vision_tower(batch["pixel_values"])
                        if cast is not None:
                            image_tokens, image_pooled = image_tokens.to(cast), image_pooled.to(cast)
                    out = engine(batch, image_tokens=image_tokens, image_pooled=image_pooled)
                watchdog.progress(step, "backward")
                with timer("backward"):
                    engine.backward(out["loss"])
                watchdog.progress(step, "optimizer")
                with timer("optimizer"):
                    engine.step()
                    clamp_temperature(engine, cfg.loss.max_scale)  # log_scale <= log(max_scale), master and model
                for key in ("loss", "loss_mm", "loss_vis"):
                    if out.get(key) is not None:
                        parts[key] += float(out[key].detach().float()) / accum
                        seen_parts.add(key)
                for key in ("logit_scale", "gate_mean", "gate_std"):
                    if out.get(key) is not None:
                        extras[key] = float(torch.as_tensor(out[key]).detach().float().mean())
            step_time = time.perf_counter() - t_step
            timings = timer.pop()
            watchdog.progress(step, "metrics")

            # One all-reduce for the figures that differ per rank.
            stop_asked = float(preempt.requested) if preempt is not None else 0.0
            local = torch.tensor([parts["loss"], parts["loss_mm"], parts["loss_vis"], float(tokens), float(notes),
                                  timings.get("data_wait", 0.0), step_time, stop_asked], dtype=torch.float64)
            all_reduce(local)
            loss, loss_mm, loss_vis = (local[0] / world).item(), (local[1] / world).item(), (local[2] / world).item()
            mem = all_gather_object(memory_mb())
            counters = {}
            if hasattr(loader, "stats"):
                st = loader.stats() or {}
                all_st = all_gather_object(flatten_counters(st))
                for s in all_st:
                    for k, v in (s or {}).items():
                        counters[k] = counters.get(k, 0) + v
            samples_seen += cfg.data.pairs_per_rank * accum * world

            grad_norm = engine.get_global_grad_norm()
            scalars = {"loss/total": loss}
            if "loss_mm" in seen_parts:
                scalars["loss/mm"] = loss_mm
            if "loss_vis" in seen_parts:
                scalars["loss/vis"] = loss_vis
            lrs = scheduler.get_last_lr() if scheduler is not None else [g["lr"] for g in engine.optimizer.param_groups]
            for name, lr in zip(group_names, lrs):
                scalars[f"lr/{name}"] = lr
            for part in ("llm", "new"):
                found = [lr for name, lr in zip(group_names, lrs) if name.startswith(part)]
                if found:
                    scalars[f"lr/{part}"] = found[0]
            if "logit_scale" in extras:
                scalars["model/logit_scale"] = extras["logit_scale"]
            if "gate_mean" in extras:
                scalars["model/gate_mean"] = extras["gate_mean"]
            if "gate_std" in extras:
                scalars["model/gate_std"] = extras["gate_std"]
            if grad_norm is not None:
                scalars["optim/grad_norm"] = float(grad_norm)
            max_time = local[6].item() / world
            scalars["perf/step_time_s"] = step_time
            scalars["perf/samples_per_s"] = local[4].item() / max(step_time, 1e-9)
            scalars["perf/tokens_per_s"] = local[3].item() / max(step_time, 1e-9)
            scalars["perf/data_wait_frac"] = local[5].item() / max(local[6].item(), 1e-9)
            for r, m in enumerate(mem):
                scalars[f"memory/rank{r}_mb"] = m
            for k, v in counters.items():
                scalars[f"data/{k}"] = v

            if cfg.eval.every_steps and comps.make_val_loader is not None and step % cfg.eval.every_steps == 0:
                for k, v in validation_loss(engine, comps, device, cast, lambda: watchdog.progress(step, "eval")).items():
                    scalars[f"eval/{k}"] = v

            timing_extra = {"timings": {k: round(v, 6) for k, v in timings.items()}, "mean_step_time_s": max_time}
            metrics.log(step, scalars, extra=timing_extra)
            if step % cfg.logging.log_every_steps == 0 or step == cfg.train.max_steps:
                metrics.progress(step, scalars)
            if on_step is not None:
                on_step(step, {"scalars": scalars, "timings": timings, "engine": engine})

            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
                watchdog.progress(step, "checkpoint")
                ckpt.save(engine, root, step, rank=rank, world_size=world, samples_seen=samples_seen,
                          reader_state=_reader_state(loader, epoch), config_hash=chash,
                          resolved_config=config_to_dict(cfg), keep_last=cfg.checkpoint.keep_last, log=log)
                last_saved = step
            if local[7].item() > 0 and step < cfg.train.max_steps:
                # A rank got SIGUSR1/SIGTERM (Slurm's time-limit warning, preemption): every rank saw the
                # flag in the same all-reduce, so all checkpoint after this step and exit together.
                if last_saved != step:
                    watchdog.progress(step, "checkpoint")
                    ckpt.save(engine, root, step, rank=rank, world_size=world, samples_seen=samples_seen,
                              reader_state=_reader_state(loader, epoch), config_hash=chash,
                              resolved_config=config_to_dict(cfg), keep_last=cfg.checkpoint.keep_last, log=log)
                    last_saved = step
                log(f"stop requested ({preempt.signal_name or 'another rank'}): checkpoint of step {step} written; "
                    f"exiting with code {preempt_exit_code()} so that the job can be requeued and resume")
                raise Preempted(step)
    finally:
        metrics.close()
    if last_saved != step and step > 0:
        ckpt.save(engine, root, step, rank=rank, world_size=world, samples_seen=samples_seen,
                  reader_state=_reader_state(loader, epoch), config_hash=chash,
                  resolved_config=config_to_dict(cfg), keep_last=cfg.checkpoint.keep_last, log=log)
    log(f"done: step {step}, {samples_seen} pairs seen")
    return {"step": step, "samples_seen": samples_seen, "engine": engine, "components": comps}


class Preempted(Exception):
    """Training stopped early on request, after a checkpoint; the process exits with code 75."""

    def __init__(self, step: int):
        super().__init__(f"stopped after step {step} on request")
        self.step = step


def preempt_exit_code() -> int:
    from launcher.preemption import PREEMPTED_EXIT_CODE

    return PREEMPTED_EXIT_CODE


def _install_preemption():
    """SIGUSR1 (Slurm's warning before the time limit) always; SIGTERM (scancel, preemption) only under
    Slurm: under torchrun alone SIGTERM is how the agent ends the ranks when one of them died."""
    import threading

    from launcher.preemption import PreemptionFlag

    if threading.current_thread() is not threading.main_thread():
        return None
    sigs = (signal.SIGUSR1, signal.SIGTERM) if os.environ.get("SLURM_JOB_ID") else (signal.SIGUSR1,)
    return PreemptionFlag.install(signals=sigs)


def _reader_state(loader, epoch: int):
    state = loader.state_dict() if hasattr(loader, "state_dict") else {}
    if isinstance(state, dict):
        state = dict(state)
        state.setdefault("epoch", epoch)
    return state
