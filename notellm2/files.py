"""Writing files whole or not at all, and hashing them: the one implementation every package uses.

`atomic_write` writes into a temporary file beside the target (same folder, so the rename never
crosses a filesystem), flushes and fsyncs it, renames it over the target (`os.replace`, atomic on
POSIX) and fsyncs the folder, so that after a crash or a kill the target is either the old file or the
whole new one, also after a power loss. On an exception the temporary file is removed and the target
is untouched. `commit_file` does the last three steps for a file a library wrote itself (parquet,
numpy, matplotlib, torch.save) under a temporary name.

Torch-free and importing nothing of the three packages.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Iterator, Optional

HASH_CHUNK = 1 << 20


def temporary_name(path: str) -> str:
    """A hidden, process-unique temporary name beside `path` (`dir/.name.tmp-PID`)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename inside it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_file(tmp: str, path: str) -> None:
    """fsync `tmp` (already written and closed), rename it to `path`, fsync the folder."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: Optional[str] = "utf-8") -> Iterator[IO]:
    """`with atomic_write(path) as fh: fh.write(...)`: the file appears whole at the end, or not at all."""
    if "b" in mode:
        encoding = None
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def atomic_write_json(path: str, obj, indent: Optional[int] = 1, **kwargs) -> None:
    with atomic_write(path, "w") as fh:
        json.dump(obj, fh, indent=indent, **kwargs)


def sha256_file(path: str, chunk: int = HASH_CHUNK) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def commit_dir(tmp: str, path: str) -> None:
    """A folder written under a temporary name, moved into place: every file in it fsynced, the folder
    renamed over `path` (which must not exist, or be an empty folder), the parent folder fsynced."""
    for root, _, files in os.walk(tmp):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
