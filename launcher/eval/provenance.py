"""Where vectors came from: the model's fingerprint and each note's content hash (docs/new_notes.md).

Every embedding set records, in `embeddings.json`:
- `fingerprint`: the export's fingerprint (`export_fingerprint`), or for the untrained baseline a hash
  of the config's model, loss and seed (`untrained_fingerprint`);
- `mode`: the probe the vectors answer (both, text, image);
- `content_hashes`: the file `content_hashes.npy` (uint8 [notes, 16], in the rows' order; see
  notellm2.data_shards.reader.content_hash) and its SHA-256, so that a folder whose files come from two
  runs is refused.

Vectors of two fingerprints (or two probe modes) never meet in one set, one index or one related
table: `require_same_source` refuses the mix in one line. Comparing two models side by side is
`notellm2 eval`'s job and stays allowed there.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from notellm2.data_shards.reader.content_hash import HASH_BYTES, TEXT_FIELDS
from notellm2.errors import UserError
from notellm2.files import atomic_write, sha256_file

CONTENT_HASHES = "content_hashes.npy"
CONTENT_HASH_DEFINITION = (f"sha256[:{HASH_BYTES}] of the text fields ({', '.join(TEXT_FIELDS)}) and the shard's "
                           "image bytes (notellm2.data_shards.reader.content_hash)")


class ProvenanceError(UserError, ValueError):
    """Vectors whose origin does not fit where they are going (one line, naming the folders)."""


# ----------------------------------------------------------------------------- the model's fingerprint

def export_fingerprint(export_dir: str) -> str:
    """The fingerprint of an export folder: the one function the stack reads it through.

    The export format 2 writes `fingerprint` into notellm2_export.json (one hash over the weights, the
    frozen tower, the prompt and the image settings); that value is returned as it is. An export
    without it (format 1) gets a hash computed here from its own files: every file's relative path
    and SHA-256. That hash covers the weights, the tokenizer and the JSON (which holds the prompt and
    image settings and names the frozen tower), but not the tower's weights, which a format-1 export
    does not copy: a tower changed in place under the same name is not seen. Files are hashed by content
    (`content_digest`), so that two exports of one checkpoint get one fingerprint. Format 2 exports
    (launcher/export.py) always carry the field; the computed hash serves the format-1 ones that still load."""
    from notellm2.modeling.pretrained import EXPORT_META

    root = os.path.abspath(export_dir)
    meta_path = os.path.join(root, EXPORT_META)
    if not os.path.isfile(meta_path):
        raise ProvenanceError(f"{export_dir}: no {EXPORT_META} (not a notellm2 export directory)")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except (OSError, ValueError) as e:
        raise ProvenanceError(f"{meta_path}: not readable JSON ({e})") from None
    if isinstance(meta, dict) and isinstance(meta.get("fingerprint"), str) and meta["fingerprint"]:
        return meta["fingerprint"]
    h = hashlib.sha256()
    for dirpath, dirnames, names in os.walk(root):
        dirnames.sort()
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            h.update(f"{os.path.relpath(path, root)}\t{content_digest(path)}\n".encode())
    return "files-sha256:" + h.hexdigest()


def content_digest(path: str) -> str:
    """sha256 of what a file holds rather than its bytes, where two saves of the same content differ: an
    .npz by its members' names, CRCs and sizes (np.savez stamps the time), a .safetensors by its header
    (keys sorted) and data (the metadata map is written in a per-process order: seen {'step', 'format'}
    and {'format', 'step'} for one checkpoint exported twice); any other file by its bytes."""
    import struct
    import zipfile

    if path.endswith(".npz") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = sorted((i.filename, i.CRC, i.file_size) for i in z.infolist())
        return hashlib.sha256(json.dumps(members).encode()).hexdigest()
    if not path.endswith(".safetensors"):
        return sha256_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        try:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        except (struct.error, ValueError, MemoryError, OverflowError):
            return sha256_file(path)  # not a readable safetensors: its bytes, whatever they are
        h.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def untrained_fingerprint(cfg) -> str:
    """The untrained baseline's fingerprint: a hash of the config's model, loss and seed (what decides
    its weights; embed draws the new modules from train.seed)."""
    from notellm2.launcher.config import config_to_dict

    d = config_to_dict(cfg)
    blob = json.dumps({"model": d["model"], "loss": d["loss"], "seed": d["train"]["seed"]}, sort_keys=True,
                      default=str)
    return "untrained-config-sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def model_fingerprint(model_dir: Optional[str], cfg) -> str:
    return export_fingerprint(model_dir) if model_dir else untrained_fingerprint(cfg)


# ----------------------------------------------------------------------------- content hashes of a set

def write_content_hashes(out_dir: str, hashes: np.ndarray) -> dict:
    """Write `content_hashes.npy` (before `embeddings.json`, which then names it); returns the
    embeddings.json entry."""
    table = np.ascontiguousarray(hashes, np.uint8)
    if table.ndim != 2 or table.shape[1] != HASH_BYTES:
        raise ValueError(f"content hashes: expected uint8 [notes, {HASH_BYTES}], got {table.shape}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, CONTENT_HASHES)
    with atomic_write(path, "wb") as fh:
        np.save(fh, table)
    return {"content_hashes": {"file": CONTENT_HASHES, "sha256": sha256_file(path),
                               "definition": CONTENT_HASH_DEFINITION}}


def hashes_for(ids: list[str], known_ids: list[str], known: np.ndarray, where: str) -> np.ndarray:
    """The rows of `known` (hashes of `known_ids`) in the order of `ids`; every id must be known."""
    pos = {n: i for i, n in enumerate(known_ids)}
    missing = [n for n in ids if n not in pos]
    if missing:
        raise RuntimeError(f"{where}: {len(missing)} embedded notes have no content hash (first: {missing[:3]})")
    return known[np.fromiter((pos[n] for n in ids), np.int64, len(ids))] if ids else np.zeros((0, HASH_BYTES), np.uint8)


@dataclass
class SetSource:
    """What an embedding folder says about its origin."""
    folder: str
    fingerprint: Optional[str]
    mode: Optional[str]
    count: int
    hashes: Optional[np.ndarray]  # uint8 [count, HASH_BYTES] in the rows' order, None for a set without them


def read_json(path: str, missing: str, error: type = None):
    """A JSON file's content, or a one-line refusal (`error`, default ProvenanceError): `missing` says
    what a missing file means."""
    error = error or ProvenanceError
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: missing ({missing})") from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: not readable JSON ({e})") from None


def read_set_source(emb_dir: str, need_hashes: bool = False) -> SetSource:
    """The fingerprint, mode and (checked) content hashes of an embedding folder. A folder written
    before provenance existed has neither: `need_hashes` refuses it in one line."""
    info = read_json(os.path.join(emb_dir, "embeddings.json"), "not a finished `notellm2 embed` output")
    count = int(info.get("count", -1))
    entry = info.get("content_hashes")
    hashes = None
    if isinstance(entry, dict):
        path = os.path.join(emb_dir, entry.get("file", CONTENT_HASHES))
        if not os.path.isfile(path) or sha256_file(path) != entry.get("sha256"):
            raise ProvenanceError(f"{path}: missing or not the file embeddings.json names (another run's?); "
                                  "embed the set again")
        hashes = np.load(path, allow_pickle=False)
        if hashes.shape != (count, HASH_BYTES):
            raise ProvenanceError(f"{path}: shape {hashes.shape}, expected ({count}, {HASH_BYTES})")
    if need_hashes and (hashes is None or not info.get("fingerprint")):
        raise ProvenanceError(f"{emb_dir}: no fingerprint or content hashes (written before `notellm2 embed` "
                              "recorded them); embed the full catalog once without --base")
    return SetSource(emb_dir, info.get("fingerprint"), info.get("mode"), count, hashes)


def require_same_source(items: list[tuple[str, Optional[str], Optional[str]]]) -> None:
    """Refuse in one line when (name, fingerprint, mode) items differ in fingerprint or mode: what is
    made of them would mix vectors of two models (or two probes)."""
    first_name, first_fp, first_mode = items[0]
    for name, fp, mode in items[1:]:
        if fp != first_fp:
            raise ProvenanceError(f"{name} has model fingerprint {_short(fp)} but {first_name} has "
                                  f"{_short(first_fp)}; vectors of two models cannot be mixed (rebuild from one "
                                  "model's embeddings; `notellm2 eval` compares models side by side)")
        if mode != first_mode:
            raise ProvenanceError(f"{name} holds --mode {mode} vectors but {first_name} holds --mode "
                                  f"{first_mode}; embed both with one probe mode")


def _short(fp: Optional[str]) -> str:
    if not fp:
        return "none (a set written before fingerprints)"
    head, _, tail = fp.rpartition(":")
    return f"{head}:{tail[:12]}" if head else fp[:12]
