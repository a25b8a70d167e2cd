"""The note catalog: reading it and checking it.

Two formats (docs/data.md has examples):

- JSONL, one note per line: ``{"note_id": str, "title": str, "content": str, "topics": [str],
  "image": path | null, "category": str | null, "timestamp": int | null}``. ``note_id``, ``title``
  and ``content`` are required; the rest are optional. Keys not listed here are ignored.
- CSV in the paper's column order ``note_id,title,content,image_id,category`` (a header row with
  these names is optional) plus an image folder: the image of a note is ``<image_root>/<image_id>``,
  or that name with ``.jpg`` / ``.png`` appended. An empty ``image_id`` means no image.

Relative image paths are resolved against ``image_root`` when given, otherwise against the
catalog file's directory. Structural problems (bad JSON, a missing key, a wrong type) raise
`CatalogError` naming the file and line; content problems (duplicate ids, unreadable images,
empty texts) are what `validate_catalog` reports.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

from notellm2.errors import UserError
from notellm2.files import atomic_write
from notellm2.data_shards.config import MAX_IMAGE_PIXELS
from notellm2.data_shards.problems import Problem

CSV_COLUMNS = ("note_id", "title", "content", "image_id", "category")
_JSONL_EXT = (".jsonl", ".json", ".ndjson")
_CSV_EXT = (".csv",)
_IMAGE_SUFFIXES = ("", ".jpg", ".png")


class CatalogError(UserError, ValueError):
    """A catalog that cannot be read; the message names the file and the line."""


@dataclass
class Note:
    note_id: str
    title: str
    content: str
    topics: list[str] = field(default_factory=list)
    # Resolved image path (may not exist: `validate_catalog` reports that), or None for no image.
    image_path: Optional[str] = None
    category: Optional[str] = None
    timestamp: Optional[int] = None

    def text_json(self) -> dict:
        """The note's fields as written into shards (no image path: the image travels as bytes)."""
        return {"note_id": self.note_id, "title": self.title, "content": self.content,
                "topics": list(self.topics), "category": self.category}


def catalog_format(path: str, fmt: Optional[str] = None) -> str:
    if fmt:
        if fmt not in ("jsonl", "csv"):
            raise CatalogError(f"{path}: unknown catalog format {fmt!r}; allowed: jsonl, csv")
        return fmt
    low = path.lower()
    if low.endswith(_JSONL_EXT):
        return "jsonl"
    if low.endswith(_CSV_EXT):
        return "csv"
    raise CatalogError(f"{path}: cannot tell the catalog format from the extension; "
                       f"use .jsonl or .csv, or pass the format explicitly (jsonl, csv)")


def _resolve(image: Optional[str], base: str) -> Optional[str]:
    if image is None or image == "":
        return None
    return image if os.path.isabs(image) else os.path.normpath(os.path.join(base, image))


def _resolve_csv_image(image_id: str, base: str) -> Optional[str]:
    if not image_id:
        return None
    first = None
    for suffix in _IMAGE_SUFFIXES:
        candidate = _resolve(image_id + suffix, base)
        first = first or candidate
        if os.path.isfile(candidate):
            return candidate
    return first  # nothing exists: keep the plain name so the report shows what was looked for


def _opt_str(obj: dict, key: str, where: str) -> Optional[str]:
    v = obj.get(key)
    if v is None or isinstance(v, str):
        return v
    raise CatalogError(f"{where}: '{key}' must be a string or null, got {type(v).__name__} {v!r}")


def _note_from_json(obj, where: str, base: str) -> Note:
    if not isinstance(obj, dict):
        raise CatalogError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("note_id", "title", "content"):
        if key not in obj:
            raise CatalogError(f"{where}: missing required key '{key}'")
    nid = obj["note_id"]
    if isinstance(nid, bool) or not isinstance(nid, (str, int)) or str(nid) == "":
        raise CatalogError(f"{where}: 'note_id' must be a non-empty string, got {nid!r}")
    for key in ("title", "content"):
        if not isinstance(obj[key], str):
            raise CatalogError(f"{where}: '{key}' must be a string, got {type(obj[key]).__name__}")
    topics = obj.get("topics") or []
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        raise CatalogError(f"{where}: 'topics' must be a list of strings, got {topics!r}")
    ts = obj.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int)):
        raise CatalogError(f"{where}: 'timestamp' must be an integer (unix seconds) or null, got {ts!r}")
    return Note(note_id=str(nid), title=obj["title"], content=obj["content"], topics=topics,
                image_path=_resolve(_opt_str(obj, "image", where), base),
                category=_opt_str(obj, "category", where), timestamp=ts)


def iter_catalog(path: str, image_root: Optional[str] = None, fmt: Optional[str] = None
                 ) -> Iterator[tuple[int, Union[Note, CatalogError]]]:
    """Yield ``(line_number, Note or CatalogError)`` for every record, so a checker can go on
    past a bad line. Errors about the file as a whole (missing, unknown format) are raised."""
    fmt = catalog_format(path, fmt)
    if not os.path.isfile(path):
        raise CatalogError(f"{path}: catalog file does not exist")
    base = image_root if image_root is not None else (os.path.dirname(os.path.abspath(path)))
    if image_root is not None and not os.path.isdir(image_root):
        raise CatalogError(f"{image_root}: image root is not a directory")
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{path}:{lineno}"
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a byte order mark (spreadsheet exports)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield lineno, CatalogError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})")
                    continue
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    yield lineno, CatalogError(f"{where}: not valid JSON ({e.msg} at column {e.colno})")
                    continue
                try:
                    yield lineno, _note_from_json(obj, where, base)
                except CatalogError as e:
                    yield lineno, e
        return
    with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: a leading BOM is dropped
        reader = csv.reader(fh)
        try:
            yield from _iter_csv_rows(reader, path, base)
        except UnicodeDecodeError as e:
            raise CatalogError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({e.reason}); "
                               f"re-save the CSV as UTF-8") from None
        except csv.Error as e:  # a NUL byte, a field past the size limit, a quote left open at the end
            raise CatalogError(f"{path}:{reader.line_num}: not a readable CSV row ({e})") from None


def _iter_csv_rows(reader, path: str, base: str):
    first = True
    start = 1
    for row in reader:
        lineno, where = start, f"{path}:{start}"
        start = reader.line_num + 1  # a quoted field may span lines
        if first:
            first = False
            if [c.strip().lower() for c in row] == list(CSV_COLUMNS):
                continue
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(CSV_COLUMNS):
            yield lineno, CatalogError(
                f"{where}: expected {len(CSV_COLUMNS)} columns ({','.join(CSV_COLUMNS)}), got {len(row)}")
            continue
        nid, title, content, image_id, category = row
        if not nid:
            yield lineno, CatalogError(f"{where}: empty note_id")
            continue
        yield lineno, Note(note_id=nid, title=title, content=content, topics=[],
                           image_path=_resolve_csv_image(image_id.strip(), base),
                           category=category or None, timestamp=None)


def load_catalog(path: str, image_root: Optional[str] = None, fmt: Optional[str] = None) -> list[Note]:
    """Read a catalog (format from the extension unless `fmt` is given: "jsonl" or "csv").

    Raises `CatalogError` naming the file and line at the first malformed record. Duplicate ids
    and unreadable images are not checked here (see `validate_catalog`, `index_catalog`).
    """
    notes = []
    for _, item in iter_catalog(path, image_root, fmt):
        if isinstance(item, CatalogError):
            raise item
        notes.append(item)
    return notes


def index_catalog(notes: list[Note], source: str = "catalog") -> dict[str, Note]:
    """note_id -> Note; raises `CatalogError` listing the first duplicated ids."""
    index: dict[str, Note] = {}
    dups: list[str] = []
    for n in notes:
        if n.note_id in index:
            dups.append(n.note_id)
        index[n.note_id] = n
    if dups:
        first = sorted(set(dups))[:5]
        raise CatalogError(f"{source}: {len(dups)} duplicate note ids (first: {', '.join(first)}); "
                           f"run `notellm2 data validate` and fix the catalog")
    return index


def write_catalog_jsonl(notes: list[Note], path: str, image_base: Optional[str] = None) -> str:
    """Write notes as JSONL; image paths are written relative to `image_base` when given."""
    with atomic_write(path) as fh:
        for n in notes:
            image = n.image_path
            if image is not None and image_base is not None:
                image = os.path.relpath(image, image_base)
            rec = {"note_id": n.note_id, "title": n.title, "content": n.content, "topics": n.topics,
                   "image": image, "category": n.category, "timestamp": n.timestamp}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


# ----------------------------------------------------------------------------- validation

# Problem kinds and their severity. Errors make `notellm2 data validate` exit 1.
ERRORS = ("malformed_record", "duplicate_id", "missing_image", "unreadable_image")
WARNINGS = ("empty_text", "empty_title", "empty_content")


@dataclass
class ValidationReport:
    catalog: str
    records: int = 0
    notes_with_image: int = 0
    problems: dict = field(default_factory=dict)  # kind -> Problem

    def problem(self, kind: str) -> Problem:
        return self.problems.setdefault(kind, Problem(kind))

    @property
    def n_errors(self) -> int:
        return sum(p.count for k, p in self.problems.items() if k in ERRORS)

    @property
    def n_warnings(self) -> int:
        return sum(p.count for k, p in self.problems.items() if k in WARNINGS)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def to_dict(self) -> dict:
        return {"catalog": self.catalog, "records": self.records, "notes_with_image": self.notes_with_image,
                "errors": self.n_errors, "warnings": self.n_warnings, "ok": self.ok,
                "problems": {k: {"severity": "error" if k in ERRORS else "warning", "count": p.count,
                                 "first": p.first, "details": p.details}
                             for k, p in sorted(self.problems.items())}}

    def format(self) -> str:
        lines = [f"catalog {self.catalog}: {self.records} records, {self.notes_with_image} with an image"]
        for kind in ERRORS + WARNINGS:
            p = self.problems.get(kind)
            if not p or not p.count:
                continue
            sev = "ERROR" if kind in ERRORS else "warning"
            lines.append(f"  {sev} {kind}: {p.count} (first: {', '.join(p.first)})")
            for ident, detail in zip(p.first, p.details):
                if detail:
                    lines.append(f"      {ident}: {detail}")
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {self.n_errors} errors, {self.n_warnings} warnings")
        return "\n".join(lines)


def check_image_file(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Optional[str]:
    """None when the file decodes fully as an image within the pixel limit, else the reason."""
    from notellm2.data_shards.images import BadImage, open_image

    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"
    try:
        open_image(data, max_pixels=max_pixels)
    except BadImage as e:
        return str(e)
    return None


def _check_image_task(args):
    path, max_pixels = args
    return check_image_file(path, max_pixels)


def validate_catalog(path: str, image_root: Optional[str] = None, fmt: Optional[str] = None,
                     max_pixels: int = MAX_IMAGE_PIXELS, workers: Optional[int] = 1, check_images: bool = True,
                     progress: bool = False, keep: int = 5) -> ValidationReport:
    """Check a catalog and return a report (never raises for content problems).

    Errors: malformed records, duplicate note ids, images that are referenced but missing, and
    images that do not decode (or exceed `max_pixels`). Warnings: notes whose title and content
    are both empty (``empty_text``), or only one of them (``empty_title`` / ``empty_content``).
    Images are fully decoded with `workers` processes (None: `default_workers()`).
    """
    from tqdm import tqdm

    report = ValidationReport(catalog=path)
    seen: set[str] = set()
    to_check: list[tuple[str, str]] = []
    for lineno, item in tqdm(iter_catalog(path, image_root, fmt), desc="reading catalog", unit=" notes",
                             disable=not progress):
        report.records += 1
        if isinstance(item, CatalogError):
            report.problem("malformed_record").add(f"line {lineno}", str(item), keep)
            continue
        n = item
        if n.note_id in seen:
            report.problem("duplicate_id").add(n.note_id, "", keep)
        seen.add(n.note_id)
        title_empty, content_empty = not n.title.strip(), not n.content.strip()
        if title_empty and content_empty:
            report.problem("empty_text").add(n.note_id, "", keep)
        elif title_empty:
            report.problem("empty_title").add(n.note_id, "", keep)
        elif content_empty:
            report.problem("empty_content").add(n.note_id, "", keep)
        if n.image_path is not None:
            report.notes_with_image += 1
            if not os.path.isfile(n.image_path):
                report.problem("missing_image").add(n.note_id, n.image_path, keep)
            elif check_images:
                to_check.append((n.note_id, n.image_path))
    if to_check:
        tasks = [(p, max_pixels) for _, p in to_check]
        workers = default_workers() if workers is None else workers
        with _maybe_pool(min(workers, len(tasks))) as pool:
            results = ordered_imap(pool, _check_image_task, tasks, chunksize=8)
            for (nid, _), reason in tqdm(zip(to_check, results), total=len(to_check), desc="decoding images",
                                         unit=" img", disable=not progress):
                if reason is not None:
                    report.problem("unreadable_image").add(nid, reason, keep)
    return report


class _InlinePool:
    """The `imap` of a pool, run in this process (workers <= 1: no start-up cost, easy debugging)."""

    def imap(self, fn, items, chunksize=1):
        return map(fn, items)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def default_workers() -> int:
    """The cores this process may run on (a Slurm allocation, a taskset), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_imap(pool, fn, items: list, chunksize: int = 8, window: int = 2048):
    """`pool.imap(fn, items)` in order, but with at most two windows of `window` items queued at a
    time (a plain imap queues every task up front: millions for a large catalog). The next window
    is submitted before the current one is drained, so the workers never wait on the consumer."""
    starts = list(range(0, len(items), window))
    pending = [pool.imap(fn, items[s:s + window], chunksize) for s in starts[:2]]
    for k in range(len(starts)):
        current = pending.pop(0)
        if k + 2 < len(starts):
            s = starts[k + 2]
            pending.append(pool.imap(fn, items[s:s + window], chunksize))
        yield from current


def _maybe_pool(workers: int):
    if workers <= 1:
        return _InlinePool()
    import multiprocessing as mp

    # fork is cheap (no re-import of torch); the workers only run PIL code.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    return mp.get_context(method).Pool(workers)
