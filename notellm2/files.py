"""Writing files whole or not at all, and hashing them: the one implementation every package uses.

`atomic_write` writes into a temporary file beside the target (same folder, so the rename never
crosses a filesystem), flushes and fsyncs it, renames it over the target (`os.replace`, atomic on
POSIX) and fsyncs the folder, so that after a crash or a kill the target is either the old file or the
whole new one, also after a power loss. On an exception the temporary file is removed and the target
is untouched. `commit_file` does the last three steps for a file a library wrote itself (parquet,
numpy, matplotlib, torch.save) under a temporary name.

Manifests: `tree_files` and `hash_files` list a folder's files with their SHA-256, `file_problem` says
why one no longer matches, and `seal_json` / `sealed_problem` give a JSON document its own SHA-256 (the
checkpoint manifest, the export's JSON). They catch damaged files, not an attacker, who can rewrite
the lists too. `follow_umask` gives files a library wrote with its own mode (safetensors: 0600) the
mode the umask allows.

Torch-free and importing nothing of the three packages.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import IO, Iterable, Iterator, Optional

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


# ----------------------------------------------------------------------------- manifests of file hashes

SEAL_KEY = "sha256"


def tree_files(root: str, exclude: Iterable[str] = ()) -> list[str]:
    """Every regular file under `root`, as sorted '/'-separated paths relative to it (links and the
    names in `exclude` left out)."""
    skip = set(exclude)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in files:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel not in skip and os.path.isfile(full) and not os.path.islink(full):
                out.append(rel)
    return sorted(out)


def hash_files(root: str, names: Iterable[str]) -> dict:
    """{relative name: hex SHA-256} of the named files under `root`."""
    return {name: sha256_file(os.path.join(root, name)) for name in names}


def file_problem(root: str, name: str, expected: dict) -> Optional[str]:
    """Why the file `name` under `root` differs from the SHA-256 `expected` lists for it (None: it
    matches). Damage, that is: a writer who can change the file can change the list too."""
    full = os.path.join(root, name)
    if name not in expected:
        return f"{full}: not listed in the SHA-256 manifest (a file added after the save?)"
    if not os.path.isfile(full):
        return f"{full}: listed in the SHA-256 manifest but missing"
    if sha256_file(full) != expected[name]:
        return f"{full}: its SHA-256 differs from the manifest's (a damaged or changed file)"
    return None


def read_json_object(path: str, error: type, label: str) -> dict:
    """The JSON object in file `path` (bytes decoded as UTF-8), or `error` with one line that starts with
    `label`: not decodable, not JSON, or JSON that is not an object. The caller checks the file exists."""
    with open(path, "rb") as fh:
        try:
            obj = json.loads(fh.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise error(f"{label}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{label}: not a JSON object")
    return obj


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal_json(obj: dict, **dump_kwargs) -> dict:
    """`obj` as it reads back from JSON, with its own SHA-256 under "sha256": a hash over the canonical
    JSON of every other key, so that a flipped byte anywhere in the file shows (`sealed_problem`)."""
    plain = json.loads(json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, **dump_kwargs))
    plain[SEAL_KEY] = hashlib.sha256(_canonical(plain)).hexdigest()
    return plain


def sealed_problem(obj: dict) -> Optional[str]:
    """None when `obj` (read from JSON) holds the seal `seal_json` gave it; else why not."""
    seal = obj.get(SEAL_KEY)
    if not isinstance(seal, str):
        return f"no {SEAL_KEY!r} seal"
    if hashlib.sha256(_canonical({k: v for k, v in obj.items() if k != SEAL_KEY})).hexdigest() != seal:
        return "its content differs from its own SHA-256 seal (a damaged or edited file)"
    return None


# ----------------------------------------------------------------------------- modes

def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so nothing changes it even briefly)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(root: str) -> None:
    """Give every file under `root` mode 0666 and every folder 0777, less the umask (0644 and 0755 under
    the usual 022), whatever mode the library that wrote them chose (safetensors writes 0600)."""
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                os.chmod(full, 0o666 & ~mask)
