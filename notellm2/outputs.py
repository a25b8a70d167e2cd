"""What every verb does with its output path, one rule for all (docs/data.md, "Errors and reruns"):

- an output path of the wrong kind (a file where a folder is expected, a folder where a file is) is
  refused in one line naming the option, before any work;
- a finished output records the request that made it (the settings and the content of the inputs, in
  its manifest). A rerun whose request is the same does nothing (the output would come out the same);
  one whose request differs is refused unless the user passes --overwrite.

Torch-free and importing nothing of the three packages, like `notellm2.files`.
"""
from __future__ import annotations

import os
from typing import Optional

from notellm2.errors import UserError


class OutputError(UserError, ValueError):
    """An output path that cannot be written as asked (names the option and the path)."""


def check_folder_output(path: str, option: str = "--out") -> None:
    """`path` will be a folder: refused when a file (or anything but a folder) sits there."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{option} {path}: is a file, not a folder; give a folder (it is created when missing)")
    _check_parent(path, option)


def check_file_output(path: str, option: str = "--out") -> None:
    """`path` will be a file: refused when a folder sits there or its parent is a file."""
    if os.path.isdir(path):
        raise OutputError(f"{option} {path}: is a folder, not a file; give a file name")
    _check_parent(path, option)


def _check_parent(path: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.lexists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise OutputError(f"{option} {path}: {parent} is a file, so nothing can be written below it")


def request_differences(old: Optional[dict], new: dict) -> list[str]:
    """Key by key, what differs between the request a finished output recorded and this one
    ("key A there, B now"; nested dicts by dotted key; long values by name only). Empty: the same."""
    out: list[str] = []
    _diff(old or {}, new, "", out)
    return out


def _diff(old: dict, new: dict, prefix: str, out: list) -> None:
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            _diff(a, b, name + ".", out)
        elif all(x is None or isinstance(x, (bool, int, float)) or (isinstance(x, str) and len(x) <= 40)
                 for x in (a, b)):
            out.append(f"{name} {a!r} there, {b!r} now")
        else:
            out.append(f"{name} differs")


def recorded_request(out_dir: str, name: str) -> Optional[dict]:
    """The `request` recorded in the JSON file `name` of a finished output folder (None: no such file,
    so no finished output; a file that cannot be read or records none gives a request that matches
    nothing, so a rerun needs --overwrite)."""
    import json

    path = os.path.join(out_dir, name)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            request = json.load(fh).get("request")
    except (OSError, ValueError, AttributeError):
        return {name: "unreadable"}
    return request if isinstance(request, dict) else {"request": f"not recorded in {name}"}


def reuse_finished(out: str, recorded: Optional[dict], request: dict, overwrite: bool, what: str,
                   option: str = "--out", error: type = OutputError) -> bool:
    """True when `out` holds a finished output made by the same `request` (the caller then does nothing).
    False when there is none, or it differs and `overwrite` is set (the caller replaces it). Refused
    (`error`, a UserError naming what differs) when it differs and `overwrite` is not set."""
    if recorded is None:
        return False
    differences = request_differences(recorded, request)
    if not differences:
        return True
    if overwrite:
        return False
    shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
    raise error(f"{option} {out}: holds {what} of other inputs or settings ({shown}); pass --overwrite to "
                      f"replace it, or choose another {'folder' if os.path.isdir(out) else 'path'}")


class FileOutput:
    """A single-file output that cannot record its request (a CSV, a JSONL catalog): written under a
    temporary name beside `path`, then compared with what is there. The same bytes: the file is left as
    it is (`unchanged` True). Other bytes: replaced when `overwrite`, else refused (OutputError) and the
    temporary file removed. Nothing else is left behind on an error.

        with FileOutput(path, overwrite, "a view log") as out:
            df.to_parquet(out.tmp)
        if out.unchanged: ...
    """

    def __init__(self, path: str, overwrite: bool, what: str, option: str = "--out"):
        from notellm2.files import temporary_name

        check_file_output(path, option)
        self.path, self.overwrite, self.what, self.option = path, overwrite, what, option
        self.tmp = temporary_name(path)
        self.unchanged = False

    def __enter__(self) -> "FileOutput":
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        from notellm2.files import commit_file, sha256_file

        try:
            if exc_type is not None:
                return False
            if os.path.isfile(self.path):
                if sha256_file(self.path) == sha256_file(self.tmp):
                    self.unchanged = True
                    return False
                if not self.overwrite:
                    raise OutputError(f"{self.option} {self.path}: holds {self.what} with other contents (other "
                                      f"inputs or settings); pass --overwrite to replace it, or choose another file")
            commit_file(self.tmp, self.path)
            return False
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)


def missing_top(path: str) -> Optional[str]:
    """The topmost folder of `path` that does not exist yet (None: `path` exists)."""
    top, probe = None, os.path.abspath(path)
    while not os.path.exists(probe):
        top, probe = probe, os.path.dirname(probe)
    return top


def make_folder(path: str) -> Optional[str]:
    """os.makedirs(path); returns the topmost folder this call created (None: it existed), so that a
    failed run can remove all it made (`remove_made`), its parents included."""
    top = missing_top(path)
    os.makedirs(path, exist_ok=True)
    return top


def remove_made(top: Optional[str]) -> None:
    """Remove the folder tree `make_folder` created (nothing when it created none)."""
    if top is not None:
        import shutil

        shutil.rmtree(top, ignore_errors=True)
