"""Search work split across ranks, in parts that survive a kill (`neighbors`, `index build`, `index update`).

The work of a stage is cut into chunks (of queries, or of pool rows); chunk c goes to rank
c mod world_size, which writes its result to WORK/<stage>-<c:06d>.npz (a temporary file moved into
place, so a part that exists is whole). After a barrier, rank 0 reads the parts in chunk order. The
result does not depend on how many ranks ran or which rank wrote which part: it equals one rank's,
and a killed run, rerun with the same command at any world size, resumes from the parts that exist.

WORK/manifest.json records what decides the parts' contents (the inputs and settings, not the world
size). A rerun with other settings is refused in one line naming the folder and what differs; add
--restart to discard the parts. Rank 0 removes WORK once the output is in place.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import zipfile
from typing import Callable, Optional

import numpy as np

from notellm2.errors import UserError
from notellm2.files import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
# Test-only hook (launcher/train/faults.py style): RANK:N makes that rank SIGKILL itself right after
# it has put its N-th part of this run in place.
DIE_AFTER_PARTS_ENV = "NOTELLM2_TEST_DIE_AFTER_SEARCH_PARTS"


class PartsError(UserError, ValueError):
    """Parts left by a run with other settings, or a part that cannot be read (one line)."""


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two settings dicts, one phrase per key."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, (int, str)) and isinstance(b, (int, str)) or a is None or b is None:
            out.append(f"{key} {a} there, {b} now")
        else:
            out.append(f"{key} differ")
    return out


def check_manifest(parts_dir: str, fingerprint: dict, restart: bool, pattern: str, owner: str, mine: str) -> None:
    """Refuse (one line) parts in `parts_dir` that other settings made: `manifest.json` holds the
    `fingerprint` of the settings that wrote them. Parts matching `pattern` without a manifest are
    refused too. Nothing is refused on `restart` (the caller discards the parts)."""
    if restart or not os.path.isdir(parts_dir):
        return
    manifest = os.path.join(parts_dir, MANIFEST)
    if not os.path.exists(manifest):
        if glob.glob(os.path.join(parts_dir, pattern)):
            raise PartsError(f"{parts_dir}: parts without {MANIFEST} (not {mine}); add --restart to discard them")
        return
    try:
        with open(manifest) as fh:
            old = json.load(fh)["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PartsError(f"{manifest}: not a readable parts manifest ({type(e).__name__}: {e}); "
                         "add --restart to discard the parts") from None
    if old != fingerprint:
        raise PartsError(f"{parts_dir}: parts of {owner} with other settings ({'; '.join(differences(old, fingerprint))}); "
                         "rerun with the same settings to resume, or add --restart to discard the parts")


def work_dir_for(out: str) -> str:
    """The parts folder of an output path: OUT.parts beside it."""
    return os.path.abspath(out).rstrip(os.sep) + ".parts"


class SearchParts:
    def __init__(self, work: str, settings: dict, rank: int = 0, world_size: int = 1):
        self.work, self.settings = work, json.loads(json.dumps(settings, default=str))
        self.rank, self.world_size = rank, world_size
        self.written = 0

    def check(self, restart: bool) -> None:
        """Every rank, before any work: refuse parts of other settings (unless `restart`). Read-only."""
        check_manifest(self.work, self.settings, restart, "*.npz", "a run", "this command's")

    def prepare(self, restart: bool) -> None:
        """Rank 0: discard the parts on `restart`; create WORK and its manifest."""
        if self.rank != 0:
            return
        if restart and os.path.isdir(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work, exist_ok=True)
        for stale in glob.glob(os.path.join(self.work, ".*.tmp-*")):
            os.remove(stale)  # a part being written when a rank died
        atomic_write_json(os.path.join(self.work, MANIFEST), {"fingerprint": self.settings}, indent=1, sort_keys=True)

    def path(self, stage: str, c: int) -> str:
        return os.path.join(self.work, f"{stage}-{c:06d}.npz")

    def run(self, stage: str, n_chunks: int, fn: Callable[[int], dict], progress: Optional[Callable] = None) -> dict:
        """This rank's chunks of `stage` (c = rank, rank + world_size, ...): fn(c) -> {name: array}, each
        written as a part unless it exists. Returns {"done": chunks computed, "resumed": chunks found}."""
        done = resumed = 0
        for c in range(self.rank, n_chunks, self.world_size):
            path = self.path(stage, c)
            if os.path.exists(path):
                resumed += 1
            else:
                arrays = fn(c)
                with atomic_write(path, "wb") as fh:
                    np.savez(fh, **arrays)
                done += 1
                self.written += 1
                self._die_hook()
            if progress is not None:
                progress(c)
        return {"done": done, "resumed": resumed}

    def read(self, stage: str, c: int) -> dict:
        path = self.path(stage, c)
        if not zipfile.is_zipfile(path):
            raise PartsError(f"{path}: missing or not a readable part (every rank must write to the same folder, "
                             "on a filesystem all nodes share); add --restart to start over")
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def remove(self) -> None:
        if self.rank == 0 and os.path.isdir(self.work):
            shutil.rmtree(self.work)

    def _die_hook(self) -> None:
        spec = os.environ.get(DIE_AFTER_PARTS_ENV, "")
        if spec and spec == f"{self.rank}:{self.written}":
            print(f"[test hook] rank {self.rank} kills itself (SIGKILL) after {self.written} parts", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
