"""Reusable data builders for tests (plain functions; wrap them in pytest fixtures where useful).

    cat = synthetic_catalog(tmp_path / "cat")                       # notes.jsonl + images/
    pairs = synthetic_pairs(tmp_path / "pairs", cat)                # pairs.parquet + mining_manifest.json
    shards, manifest = synthetic_shards(tmp_path)                   # catalog -> pairs -> shards in one call
    manifest["patterns"]["pairs-train"]                             # e.g. "pairs-train-{000000..000003}.tar"

Bad images for error paths: `write_exif_rotated_jpeg`, `write_truncated_jpeg`, `write_garbage`.
Everything is small (64 px images, tens of notes) and builds in well under a second.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from notellm2.data_shards.catalog.synthetic import make_synthetic_catalog, make_synthetic_pairs, make_synthetic_views


def synthetic_catalog(out_dir, n_notes: int = 60, n_categories: int = 4, seed: int = 0,
                      image_size: int = 64, image_fraction: float = 1.0) -> str:
    return make_synthetic_catalog(str(out_dir), n_notes=n_notes, n_categories=n_categories, seed=seed,
                                  image_size=image_size, image_fraction=image_fraction)


def synthetic_views(catalog: str, out_path, n_users: int = 30, seed: int = 0) -> str:
    return make_synthetic_views(catalog, str(out_path), n_users=n_users, seed=seed)


def synthetic_pairs(out_dir, catalog: str, n_pairs: int = 120, seed: int = 0, extra_rows=None) -> str:
    return make_synthetic_pairs(catalog, str(out_dir), n_pairs=n_pairs, seed=seed, extra_rows=extra_rows)


def synthetic_shards(root, n_notes: int = 60, n_categories: int = 4, n_pairs: int = 120, shard_size: int = 32,
                     image_size: int = 64, seed: int = 0, workers: int = 1, splits=("train", "val", "test")):
    """Catalog -> pairs -> shards under `root`; returns (shard_dir, manifest dict)."""
    from notellm2.data_shards.writing.shards import ShardSettings, write_shards

    root = str(root)
    cat = synthetic_catalog(os.path.join(root, "catalog"), n_notes=n_notes, n_categories=n_categories, seed=seed)
    pairs = synthetic_pairs(os.path.join(root, "pairs"), cat, n_pairs=n_pairs, seed=seed)
    out = os.path.join(root, "shards")
    manifest = write_shards(pairs, cat, out, settings=ShardSettings(shard_size=shard_size, image_size=image_size,
                                                                    seed=seed, splits=tuple(splits)),
                            workers=workers)
    return out, manifest


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def write_exif_rotated_jpeg(path, stored_w: int = 60, stored_h: int = 30, orientation: int = 6) -> str:
    """A JPEG whose pixels are stored_w x stored_h but whose EXIF says to rotate it (6: 90 degrees
    clockwise), so it displays as stored_h x stored_w. The top-left stored pixel is red."""
    img = _gradient(stored_w, stored_h)
    img.paste((255, 0, 0), (0, 0, max(2, stored_w // 6), max(2, stored_h // 6)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(str(path), "JPEG", quality=95, exif=exif.tobytes())
    return str(path)


def write_plain_jpeg(path, w: int, h: int) -> str:
    _gradient(w, h).save(str(path), "JPEG", quality=90)
    return str(path)


def write_truncated_jpeg(path, w: int = 64, h: int = 64) -> str:
    buf = io.BytesIO()
    _gradient(w, h).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 3])
    return str(path)


def write_garbage(path, text: bytes = b"this is not an image\n") -> str:
    with open(path, "wb") as fh:
        fh.write(text)
    return str(path)
