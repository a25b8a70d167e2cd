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
        manifest = os.path.join(self.work, MANIFEST)
        if restart or not os.path.isdir(self.work):
            return
        if not os.path.exists(manifest):
            if glob.glob(os.path.join(self.work, "*.npz")):
                raise PartsError(f"{self.work}: parts without {MANIFEST} (not this command's); add --restart to "
                                 "discard them")
            return
        try:
            with open(manifest) as fh:
                old = json.load(fh)["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PartsError(f"{manifest}: not a readable parts manifest ({type(e).__name__}: {e}); "
                             "add --restart to discard the parts") from None
        if old != self.settings:
            differ = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            raise PartsError(f"{self.work}: parts of a run with other settings ({', '.join(differ)} differ); rerun "
                             "with the same inputs and settings to resume, or add --restart to discard them")

    def prepare(self, restart: bool) -> None:
        """Rank 0: discard the parts on `restart`; create WORK and its manifest."""
        if self.rank != 0:
            return
        if restart and os.path.isdir(self.work):
            shutil.rmtree(self.work)
        os.makedirs(self.work, exist_ok=True)
        for stale in glob.glob(os.path.join(self.work, ".*.tmp-*")):
            os.remove(stale)  # a part being written when a rank died
        atomic_write_json(os.path.join(self.work, MANIFEST), {"settings": self.settings}, indent=1, sort_keys=True)

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
