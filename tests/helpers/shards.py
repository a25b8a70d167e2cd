"""Test shards in the fixed shard format (written with webdataset.TarWriter) and a char-level
stand-in for the prompter's encode/collate (a picklable test double of notellm2.modeling.prompts)."""
from __future__ import annotations

import io
import json
import os
import random
import struct
import zlib

import numpy as np
import torch
import webdataset as wds
from PIL import Image


class CharEncoder:
    """encode_fn: note dict -> {"input_ids": [...]}; records has_image as a leading marker id."""

    def __init__(self, max_len: int = 24):
        self.max_len = max_len

    def __call__(self, note: dict) -> dict:
        text = f"{note['title']}|{note['content']}|{','.join(note['topics'])}"
        ids = [2 if note["has_image"] else 1] + [3 + (ord(c) % 250) for c in text][: self.max_len - 1]
        return {"input_ids": ids}


class CharCollate:
    """collate_text_fn: right-pads input_ids with 0 and builds the attention mask."""

    def __call__(self, encodings: list) -> dict:
        n = max(len(e["input_ids"]) for e in encodings)
        ids = torch.zeros(len(encodings), n, dtype=torch.long)
        mask = torch.zeros(len(encodings), n, dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}


def jpeg_bytes(seed: int, size=(40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def huge_png_bytes(width: int = 30000, height: int = 30000) -> bytes:
    """A valid one-colour 1-bit PNG of width x height: ~100 KB on disk, gigabytes once decoded to RGB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" + b"\x00" * ((width + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def note_json(note_id: str) -> dict:
    return {"note_id": note_id, "title": f"title {note_id}", "content": f"content of {note_id}",
            "topics": [f"t{len(note_id) % 3}"], "category": "c"}


def pair_sample(i: int, query_id: str, target_id: str, q_img: bytes | None, t_img: bytes | None) -> dict:
    sample = {"__key__": f"{i:09d}", "q.json": json.dumps(note_json(query_id)).encode(),
              "t.json": json.dumps(note_json(target_id)).encode(),
              "pair.json": json.dumps({"query_id": query_id, "target_id": target_id, "score": 1.0}).encode()}
    if q_img is not None:
        sample["q.jpg"] = q_img
    if t_img is not None:
        sample["t.jpg"] = t_img
    return sample


def write_pair_shards(out_dir: str, counts: list[int], split: str = "train", manifest: bool = True,
                      no_image_every: int = 7, seed: int = 0, mutate=None) -> list[str]:
    """Shards `pairs-{split}-{i:06d}.tar` with counts[i] pairs each and a manifest.json.

    Pair j (global) is (q{j}, t{j}); every `no_image_every`-th query has no image.
    `mutate(shard_index, sample_index, sample) -> sample` lets a test corrupt samples.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths, entries, j = [], [], 0
    rnd = random.Random(seed)
    for s, count in enumerate(counts):
        path = os.path.join(out_dir, f"pairs-{split}-{s:06d}.tar")
        with wds.TarWriter(path) as tw:
            for i in range(count):
                q_img = None if j % no_image_every == 3 else jpeg_bytes(rnd.randrange(1 << 30))
                sample = pair_sample(j, f"q{j}", f"t{j}", q_img, jpeg_bytes(rnd.randrange(1 << 30)))
                if mutate is not None:
                    sample = mutate(s, i, sample)
                tw.write(sample)
                j += 1
        paths.append(path)
        entries.append({"name": os.path.basename(path), "kind": "pairs", "split": split, "count": count,
                        "sha256": "not-checked-by-reader"})
    if manifest:
        with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
            json.dump({"shards": entries}, fh)
    return paths


def write_note_shards(out_dir: str, counts: list[int], mutate=None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths, j = [], 0
    for s, count in enumerate(counts):
        path = os.path.join(out_dir, f"notes-test-{s:06d}.tar")
        with wds.TarWriter(path) as tw:
            for i in range(count):
                sample = {"__key__": f"{j:09d}", "json": json.dumps(note_json(f"n{j}")).encode()}
                if j % 5 != 2:
                    sample["jpg"] = jpeg_bytes(j)
                if mutate is not None:
                    sample = mutate(s, i, sample)
                tw.write(sample)
                j += 1
        paths.append(path)
    return paths


def batch_digest(batch: dict) -> dict:
    """JSON-able summary of a batch that changes when any tensor or id changes."""
    return {
        "note_id_strs": list(batch["note_id_strs"]),
        "note_ids": batch["note_ids"].tolist(),
        "has_image": batch["has_image"].tolist(),
        "input_ids_sum": int(batch["input_ids"].sum()),
        "pixel_sum": round(float(batch["pixel_values"].double().sum()), 4),
        "pixel_abs": round(float(batch["pixel_values"].double().abs().sum()), 4),
    }
