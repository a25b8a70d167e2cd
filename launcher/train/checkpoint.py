"""Sharded ZeRO checkpoints: atomic save, keep-last-k, manifest, resume (same or other world size).

Layout under `<run_dir>/checkpoints/`:

    step_00000040/            one complete checkpoint (DeepSpeed shards of every rank)
        manifest.json         step, samples seen, world size, config hash, versions, reader states,
                              the SHA-256 of every other file, and its own SHA-256 (format 2)
        rank00000.json ...    per-rank RNG states and data-reader state (JSON; `.pt` before format 2)
        <DeepSpeed files>     zero_pp_rank_*_model_states.pt, *_optim_states.pt
    step_00000040.universal/  made on demand when a later run has another world size
    latest                    name of the newest complete checkpoint (written last, atomically)

A save first goes to `.tmp-step_XXXXXXXX/`; only when every rank has written its part does rank 0
write the manifest, rename the directory and then replace `latest`. A job killed during a save
leaves the `.tmp-` directory behind (ignored, removed by the next run) and `latest` pointing at the
previous complete checkpoint.

The frozen vision tower is not part of the DeepSpeed engine, so it is never in a checkpoint.

Loading runs no code from the files (docs/training.md, "What is safe to load"): what the stack writes
itself is JSON; DeepSpeed's own `.pt` files, which DeepSpeed unpickles with `weights_only=False` (on
resume, in the universal conversion and in `notellm2 export`), are first opened here with
`weights_only=True` and the allow-list of the types DeepSpeed writes (`notellm2.compat.
deepspeed_checkpoint_globals`); a file that needs any other type is refused in one line
(`check_files`). The manifest's hashes catch damaged files, not an attacker, who can rewrite them too.

The training loop talks to a `Checkpointer`: `find_resume()` decides what to resume from (and
converts it when the world size changed) before the engine exists, `resume(engine)` restores it,
`save(step, loader)` writes one.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from notellm2.launcher.train import faults
from notellm2.launcher.config import RunConfig, config_hash, config_to_dict
from notellm2.launcher.distributed import all_gather_object, barrier
from notellm2.errors import UserError
from notellm2.files import (atomic_write_json, atomic_write_text, commit_dir, file_problem, hash_files,
                            read_json_object, sealed_problem, seal_json, tree_files)
from notellm2.modeling.lora import resume_mismatch

FORMAT = 2  # 2: JSON rank files, the files' SHA-256 and the manifest's own in manifest.json
MANIFEST = "manifest.json"
BEST = "best"  # pointer file: the checkpoint with the best checkpoint.keep_best metric
LATEST = "latest"
TMP_PREFIX = ".tmp-"
UNIVERSAL_DONE = ".complete"  # marks a finished universal conversion


class CheckpointError(UserError, RuntimeError):
    pass


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def package_versions() -> dict:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "deepspeed", "transformers", "webdataset", "notellm2"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ----------------------------------------------------------------------------- RNG

def _tensor_text(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _text_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict:
    """Every generator's state, as JSON-able data (torch's byte states in base64)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _tensor_text(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = _tensor_text(torch.cuda.get_rng_state())
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned (also the tensors and tuples of a rank file before format 2)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    as_tensor = (lambda v: _text_tensor(v) if isinstance(v, str) else v)
    torch.set_rng_state(as_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(as_tensor(state["cuda"]))


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.json"


def read_rank_file(path: str, rank: int) -> dict:
    """This rank's {"rank", "rng", "reader"} of checkpoint `path`: JSON, or the `.pt` of a checkpoint
    before format 2, opened with `weights_only=True` (its numpy RNG state needs numpy's array types)."""
    from notellm2 import compat

    json_path = os.path.join(path, rank_file(rank))
    if os.path.isfile(json_path):
        with open(json_path) as fh:
            try:
                return json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
    legacy = os.path.join(path, f"rank{rank:05d}.pt")
    if not os.path.isfile(legacy):
        raise CheckpointError(f"checkpoint {path}: no {rank_file(rank)} (an incomplete checkpoint)")
    return load_restricted(legacy, compat.numpy_array_globals())


# ----------------------------------------------------------------------------- checking files before loading

_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]+)")
_LEGACY_RANK_FILE = re.compile(r"(^|/)rank\d+\.pt$")


def _needed_global(path: str, allowed: list, fallback: str) -> str:
    """The full dotted name of the first global `path` needs beyond `allowed` (torch's message drops the
    module of builtins: "exec" for builtins.exec)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file it cannot list; the message's name serves
        return fallback
    allowed_names = {f"{g.__module__}.{g.__qualname__}" for g in allowed}
    extra = [n for n in names if n not in allowed_names]
    return ", ".join(extra[:3]) if extra else fallback


def load_restricted(path: str, allowed: list) -> Any:
    """torch.load of `path` with `weights_only=True` and the types `allowed` besides torch's own (tensor
    data memory-mapped where the file is a zip, so a large shard costs little); CheckpointError naming
    the file when it needs another type or cannot be read."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe:
            raise CheckpointError(f"{path}: needs {_needed_global(path, allowed, unsafe.group(1))} to load, a type "
                                  "outside those notellm2 allows in a checkpoint; refused, since unpickling it could "
                                  "run code") from None
        why = _UNPICKLER_ERROR.search(str(e))
        raise CheckpointError(f"{path}: cannot be read as a torch file ({why.group(1) if why else 'unpickling failed'}; "
                              "a damaged file?)") from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged zip or pickle raises; nothing else runs here
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{path}: cannot be read as a torch file ({type(e).__name__}: {first}; a damaged "
                              "file?)") from None


def check_files(path: str, manifest: Optional[dict], rank: int = 0, world_size: int = 1) -> None:
    """Collective when `world_size` > 1 (every rank calls it with its rank; with 1, one caller checks all): before DeepSpeed
    unpickles anything of checkpoint folder `path`, every file is compared with the SHA-256 the manifest
    lists for it (format 2) and every `.pt` file is opened with `weights_only=True` and the allow-list
    of the types DeepSpeed writes. The ranks share the files; the first problem any rank found is
    raised on every rank as one CheckpointError naming the file."""
    from notellm2 import compat

    expected = (manifest or {}).get("files")
    names = tree_files(path, exclude=(MANIFEST, UNIVERSAL_DONE))
    problems = []
    if expected is not None:
        problems += [f"{os.path.join(path, n)}: listed in the SHA-256 manifest but missing"
                     for n in sorted(set(expected) - set(names))]
    for name in names[rank::world_size]:
        why = file_problem(path, name, expected) if expected is not None else None
        if why is None and name.endswith(".pt"):
            legacy = _LEGACY_RANK_FILE.search(name)
            allowed = compat.numpy_array_globals() if legacy else compat.deepspeed_checkpoint_globals()
            try:
                load_restricted(os.path.join(path, name), allowed)
            except CheckpointError as e:
                why = str(e)
        if why:
            problems.append(why)
    # Only a split check is a collective: `notellm2 export` checks every file on one rank, and may run
    # inside a process group that other ranks are not in this call (a test, a notebook).
    found = [p for part in all_gather_object(problems) for p in part] if world_size > 1 else problems
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(f"checkpoint refused: {found[0]}{more}")


# ----------------------------------------------------------------------------- finding checkpoints

def read_manifest(path: str) -> dict:
    """The manifest of checkpoint folder `path`; a format-2 manifest must match its own SHA-256."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"checkpoint {path}: no {MANIFEST} (incomplete save?)")
    manifest = read_json_object(mpath, CheckpointError, f"checkpoint {mpath}: unreadable manifest")
    fmt = manifest.get("format")
    if fmt == FORMAT:
        why = sealed_problem(manifest)
        if why:
            raise CheckpointError(f"checkpoint {mpath}: {why}")
    elif fmt != 1:
        raise CheckpointError(f"checkpoint {mpath}: format {fmt!r}; this notellm2 reads formats 1 and {FORMAT}")
    return manifest


def list_complete(root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first."""
    out = []
    for path in glob.glob(os.path.join(root, "step_*")):
        name = os.path.basename(path)
        if not os.path.isdir(path) or "." in name or not os.path.isfile(os.path.join(path, MANIFEST)):
            continue
        try:
            out.append((int(name.split("_")[1]), path))
        except ValueError:
            continue
    return sorted(out)


def latest_complete(root: str) -> Optional[str]:
    """The checkpoint named by `latest` when it is complete, else the newest complete one."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as fh:
            name = fh.read().strip()
        path = os.path.join(root, name)
        if name and os.path.isfile(os.path.join(path, MANIFEST)):
            return path
    found = list_complete(root)
    return found[-1][1] if found else None


def best_checkpoint(root: str) -> Optional[str]:
    """The checkpoint the `best` pointer names (checkpoint.keep_best), when it is complete."""
    pointer = os.path.join(root, BEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as fh:
        name = fh.read().strip()
    path = os.path.join(root, name)
    return path if name and os.path.isfile(os.path.join(path, MANIFEST)) else None


def prune(root: str, keep_last: int) -> list[str]:
    """Remove all complete checkpoints but the newest `keep_last` and the one the `best` pointer names."""
    kept_best = best_checkpoint(root)
    removed = []
    for _, path in list_complete(root)[:-keep_last]:
        if kept_best is not None and os.path.samefile(path, kept_best):
            continue
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(path + ".universal", ignore_errors=True)
        removed.append(path)
    return removed


def remove_partial(root: str) -> list[str]:
    """Remove `.tmp-*` leftovers of interrupted saves (rank 0, before training)."""
    removed = []
    for path in glob.glob(os.path.join(root, TMP_PREFIX + "*")):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ----------------------------------------------------------------------------- saving

def save(engine, root: str, step: int, *, rank: int, world_size: int, samples_seen: int,
         reader_state: Any, config_hash: str, resolved_config: dict, keep_last: int,
         extra: Optional[dict] = None, log=print, best: bool = False) -> str:
    """Collective: every rank calls it. Returns the final checkpoint path. `best`: this checkpoint is
    the new best (checkpoint.keep_best); the `best` pointer names it and pruning never removes the
    checkpoint that pointer names."""
    name = step_name(step)
    tmp_tag = TMP_PREFIX + name
    tmp_path = os.path.join(root, tmp_tag)
    final = os.path.join(root, name)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        if os.path.isdir(tmp_path):
            shutil.rmtree(tmp_path)
    barrier()
    t0 = time.monotonic()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False)
    faults.in_save(rank, "after_shards", step)
    atomic_write_json(os.path.join(tmp_path, rank_file(rank)), {"rank": rank, "rng": rng_state(), "reader": reader_state})
    # Reader states also go into the manifest so that another world size can read all of them.
    states = all_gather_object(reader_state)
    faults.in_save(rank, "before_manifest", step)
    barrier()
    # Every rank hashes its share of the files (the same split `check_files` reads them back with).
    names = tree_files(tmp_path)
    hashes = {}
    for part in all_gather_object(hash_files(tmp_path, names[rank::world_size])):
        hashes.update(part)
    if rank == 0:
        manifest = {
            "format": FORMAT,
            "step": step,
            "samples_seen": samples_seen,
            "world_size": world_size,
            "config_hash": config_hash,
            "zero_stage": engine.zero_optimization_stage(),
            "saved_at": time.time(),
            "versions": package_versions(),
            "reader_states": states,
            "rng_files": [rank_file(r) for r in range(world_size)],
            "config": resolved_config,
            **(extra or {}),
            "files": dict(sorted(hashes.items())),
        }
        atomic_write_json(os.path.join(tmp_path, MANIFEST), seal_json(manifest, default=str), default=str)
        if os.path.isdir(final):
            shutil.rmtree(final)
        for stale in (final + ".universal",):
            shutil.rmtree(stale, ignore_errors=True)
        commit_dir(tmp_path, final)  # every rank's files flushed to disk before `latest` names them
        atomic_write_text(os.path.join(root, LATEST), name)
        if best:
            atomic_write_text(os.path.join(root, BEST), name)
        prune(root, keep_last)
        log(f"checkpoint {final} saved in {time.monotonic() - t0:.1f}s (step {step}, keeps last {keep_last})")
    barrier()
    return final


# ----------------------------------------------------------------------------- resuming

@dataclass
class Resume:
    path: str  # the complete checkpoint directory
    manifest: dict
    universal: bool  # world size differs: load through a universal checkpoint

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def decide_resume(resume: str, root: str, world_size: int, config_hash: str, allow_mismatch: bool,
                  lora=None) -> Optional[Resume]:
    """Decide what to resume from: None (fresh start) or the checkpoint to load. Raises CheckpointError on a
    mismatch; `lora` (the run's model.llm.lora): also when the checkpoint's adapters are not this run's,
    even with allow_mismatch (notellm2.modeling.lora.resume_mismatch)."""
    if resume == "none":
        found = list_complete(root)
        if found:
            raise CheckpointError(
                f"checkpoint.resume=none, but {root} already holds checkpoints (steps {[s for s, _ in found]}); "
                "a fresh run there would mix with them (keep_last could even delete its own newer saves). "
                "Use another train.output_dir, remove the old checkpoints, or resume with checkpoint.resume=auto")
        return None
    if resume == "auto":
        path = latest_complete(root)
        if path is None:
            return None
    else:
        path = resume.rstrip("/")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint.resume: {path} is not a directory")
    manifest = read_manifest(path)
    why = resume_mismatch(manifest.get("config"), lora) if lora is not None else None
    if why:
        raise CheckpointError(f"checkpoint {path}: {why}")
    if manifest.get("config_hash") != config_hash and not allow_mismatch:
        raise CheckpointError(
            f"checkpoint {path}: config hash {manifest.get('config_hash')} differs from this run's {config_hash}; "
            "the model, loss or data settings changed. Use another train.output_dir, or set "
            "checkpoint.allow_config_mismatch=true to resume anyway")
    return Resume(path, manifest, universal=int(manifest["world_size"]) != world_size)


def universal_path(chosen: Resume) -> str:
    return chosen.path + ".universal"


def convert_to_universal(chosen: Resume, world_size: int, log=print) -> str:
    """Rank 0 only: run DeepSpeed's ds_to_universal on the checkpoint (once; reused afterwards)."""
    out = universal_path(chosen)
    done_flag = os.path.join(out, UNIVERSAL_DONE)
    if os.path.isfile(done_flag):
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp_out = out + ".tmp"
    shutil.rmtree(tmp_out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", chosen.path,
           "--output_folder", tmp_out, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    log(f"world size changed ({chosen.manifest['world_size']} -> {world_size}): converting {chosen.path} to a "
        f"DeepSpeed universal checkpoint: {' '.join(cmd)}")
    env = dict(os.environ)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CheckpointError(f"ds_to_universal failed on {chosen.path} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # DeepSpeed looks for the model-state files next to zero/; copy our manifest and rank files too.
    for f in os.listdir(chosen.path):
        src = os.path.join(chosen.path, f)
        if os.path.isfile(src) and not os.path.exists(os.path.join(tmp_out, f)):
            shutil.copy2(src, os.path.join(tmp_out, f))
    open(os.path.join(tmp_out, UNIVERSAL_DONE), "w").close()
    commit_dir(tmp_out, out)
    return out


def load(engine, chosen: Resume, rank: int, world_size: int) -> dict:
    """Collective: load model + optimizer + scheduler state; restore this rank's RNG when the world
    size is unchanged. Returns {"reader": this rank's reader state or None, "reader_states": all}."""
    path = universal_path(chosen) if chosen.universal else chosen.path
    if chosen.universal:  # made by the conversion, or found in a copied run folder: opened safely first too
        check_files(path, None, rank, world_size)
    root, tag = os.path.dirname(path), os.path.basename(path)
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
    reader = None
    if not chosen.universal:
        state = read_rank_file(chosen.path, rank)
        set_rng_state(state["rng"])
        reader = state["reader"]
    return {"reader": reader, "reader_states": chosen.manifest.get("reader_states")}


# ----------------------------------------------------------------------------- what the loop uses

@dataclass
class Resumed:
    """Where a run starts: step 0 of epoch 0 (fresh) or a restored checkpoint."""

    step: int = 0
    samples_seen: int = 0
    epoch: int = 0
    reader_state: Any = None  # what the data reader loads (None: it starts its epoch from the beginning)
    fresh: bool = True


class Checkpointer:
    """The checkpoints of one run (`<train.output_dir>/checkpoints`) as the training loop sees them.

        ckpt = Checkpointer(cfg, rank, world, log)
        ckpt.find_resume(watchdog)   # before the engine: which checkpoint; True = load a universal one
        resumed = ckpt.resume(engine)  # after deepspeed.initialize: model, optimizer, scheduler, RNG, reader
        ckpt.save(step, loader)      # collective; loader.state_dict() is what the reader resumes from

    Every method but the constructor is collective (every rank calls it)."""

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, log=print):
        self.cfg, self.rank, self.world_size, self.log = cfg, rank, world_size, log
        self.root = checkpoint_root(cfg.train.output_dir)
        self.config_hash = config_hash(cfg)
        self.pairs_per_step = cfg.data.pairs_per_rank * cfg.train.grad_accum_steps * world_size
        self.chosen: Optional[Resume] = None
        self.engine = None
        self.resumed = Resumed()
        self.last_saved = -1  # step of the newest checkpoint this run wrote or resumed from
        self.best_metric = cfg.checkpoint.keep_best or None
        self.best_value: Optional[float] = None  # the best metric so far (read back from the `best` checkpoint on resume)

    def improves(self, scalars: dict) -> bool:
        """Whether this step's `scalars` hold checkpoint.keep_best and it beats the best so far ("loss"
        in the name: lower is better; otherwise higher). The same on every rank (same scalars)."""
        if self.best_metric is None or self.best_metric not in scalars:
            return False
        value = float(scalars[self.best_metric])
        if self.best_value is None:
            return True
        lower = "loss" in self.best_metric
        return value < self.best_value if lower else value > self.best_value

    def find_resume(self, watchdog=None) -> bool:
        """Remove the leftovers of interrupted saves, decide what to resume from (checkpoint.resume),
        and, when the world size changed, convert that checkpoint to a universal one (rank 0; the
        others wait). Returns whether the engine must load a universal checkpoint."""
        if self.rank == 0:
            for path in remove_partial(self.root):
                self.log(f"removed the leftovers of an interrupted save: {path}")
        cfg = self.cfg
        self.chosen = decide_resume(cfg.checkpoint.resume, self.root, self.world_size, self.config_hash,
                                cfg.checkpoint.allow_config_mismatch, lora=cfg.model.llm.lora)
        if self.chosen is not None:  # before DeepSpeed (or its universal conversion) unpickles any of it
            check_files(self.chosen.path, self.chosen.manifest, self.rank, self.world_size)
        if self.chosen is not None and self.chosen.universal:
            if self.rank == 0:
                convert_to_universal(self.chosen, self.world_size, log=self.log)
            if watchdog is not None:
                watchdog.progress(0, "universal-conversion")
            barrier()
        return bool(self.chosen and self.chosen.universal)

    def resume(self, engine) -> Resumed:
        """Load the checkpoint `find_resume` chose into `engine` (fresh start: nothing to load). The
        reader's state: this rank's own at the same world size; at another world size every old
        rank's (the reader restarts the epoch with the shards no old rank had started)."""
        self.engine = engine
        chosen = self.chosen
        if chosen is None:
            self.resumed = Resumed()
            return self.resumed
        restored = load(engine, chosen, self.rank, self.world_size)
        reader_state = restored["reader"]
        states = restored["reader_states"] or []
        epoch_src = reader_state if reader_state is not None else (states[0] if states else None)
        epoch = int(epoch_src.get("epoch", 0)) if isinstance(epoch_src, dict) else 0
        if reader_state is None and chosen.universal and chosen.manifest.get("reader_states"):
            reader_state = chosen.manifest["reader_states"]
        self.resumed = Resumed(step=chosen.step, samples_seen=int(chosen.manifest.get("samples_seen", 0)), epoch=epoch,
                               reader_state=reader_state, fresh=False)
        self.last_saved = chosen.step
        best = best_checkpoint(self.root)
        if self.best_metric is not None and best is not None:
            value = read_manifest(best).get("metrics", {}).get(self.best_metric)
            self.best_value = float(value) if value is not None else None
        if chosen.universal:
            self.log(f"resumed step {chosen.step} from {chosen.path} through a universal checkpoint "
                     f"(world size {chosen.manifest['world_size']} -> {self.world_size}); "
                     f"the data reader restarts epoch {epoch}'s shards")
        else:
            self.log(f"resumed step {chosen.step} from {chosen.path} (exact: model, optimizer, scheduler, RNG, data reader)")
        return self.resumed

    def samples_seen(self, step: int) -> int:
        """Pairs trained on over all ranks up to the end of `step`."""
        return self.resumed.samples_seen + (step - self.resumed.step) * self.pairs_per_step

    def save(self, step: int, loader, scalars: Optional[dict] = None) -> str:
        """Collective: checkpoint the engine after `step`, with `loader.state_dict()` as this rank's reader
        state. `scalars` (the step's logged figures) go into the manifest; when they improve
        checkpoint.keep_best, this checkpoint becomes the kept best."""
        cfg = self.cfg
        best = self.improves(scalars or {})
        extra = {"metrics": {k: v for k, v in (scalars or {}).items() if k.startswith("eval/")}}
        path = save(self.engine, self.root, step, rank=self.rank, world_size=self.world_size,
                    samples_seen=self.samples_seen(step), reader_state=loader.state_dict(),
                    config_hash=self.config_hash, resolved_config=config_to_dict(cfg),
                    keep_last=cfg.checkpoint.keep_last, log=self.log, extra=extra, best=best)
        if best:
            self.best_value = float(scalars[self.best_metric])
            self.log(f"best {self.best_metric} so far: {self.best_value:.4f} at step {step} (kept as {path})")
        self.last_saved = step
        return path
