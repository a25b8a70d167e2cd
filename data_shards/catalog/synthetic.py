"""Small synthetic catalogs, view logs and pairs for tests and the CPU demo.

Everything a note shows depends on its category: the image draws one shape (circle, square,
triangle, ...) in one hue per category on a noisy background, and titles/contents mix words from
the category's own vocabulary with shared filler words. Users in the view log browse in sessions
that mostly stay within one category, so co-occurrence mining yields mostly same-category pairs.
All output is a pure function of the arguments (same seed, same bytes).
"""
from __future__ import annotations

import colorsys
import json
import os
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from notellm2.files import atomic_write
from notellm2.outputs import FileOutput

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
_CATEGORY_NAMES = ("travel", "food", "fashion", "fitness", "pets", "tech", "home", "beauty",
                   "books", "music", "garden", "cars")
_SHARED_WORDS = ("today", "really", "my", "new", "best", "guide", "share", "love", "tips", "with",
                 "and", "the", "for", "week", "simple", "great")
_SYLLABLES = ("ka", "lo", "mi", "ru", "ta", "ne", "so", "vi", "pa", "de", "zu", "ho", "be", "ri", "go", "la")
BASE_TIMESTAMP = 1_700_000_000


def category_names(n_categories: int) -> list[str]:
    return [_CATEGORY_NAMES[k] if k < len(_CATEGORY_NAMES) else f"category{k}" for k in range(n_categories)]


def category_style(k: int, n_categories: int) -> tuple[tuple[int, int, int], str]:
    """(RGB colour, shape name) of category `k`: hues spread around the wheel, shapes cycled."""
    r, g, b = colorsys.hsv_to_rgb((k / max(n_categories, 1)) % 1.0, 0.85, 0.9)
    return (int(r * 255), int(g * 255), int(b * 255)), SHAPES[k % len(SHAPES)]


def _vocab(rng: np.random.Generator, k: int, size: int = 12) -> list[str]:
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES, size=int(rng.integers(2, 4)))) + str(k))
    return sorted(words)


def draw_note_image(rng: np.random.Generator, colour, shape: str, size: int = 64) -> Image.Image:
    noise = rng.integers(170, 250, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(noise, "RGB")
    d = ImageDraw.Draw(img)
    jitter = rng.integers(-20, 21, size=3)
    col = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter))
    r = int(rng.integers(size // 5, size // 3 + 1))
    cx, cy = (int(v) for v in rng.integers(r, size - r + 1, size=2))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=col)
    elif shape == "square":
        d.rectangle(box, fill=col)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    elif shape == "cross":
        w = max(2, r // 3)
        d.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        d.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
    else:  # ring
        d.ellipse(box, outline=col, width=max(2, r // 3))
    return img


def make_synthetic_catalog(out_dir: str, n_notes: int = 200, n_categories: int = 5, seed: int = 0,
                           image_size: int = 64, image_fraction: float = 1.0) -> str:
    """Write ``out_dir/notes.jsonl`` and ``out_dir/images/*.jpg``; return the catalog path.

    Note ids are ``n000000``, ``n000001``, ...; note i belongs to category ``i % n_categories``
    (so categories are balanced). A fraction ``1 - image_fraction`` of notes gets no image.
    """
    if n_notes <= 0 or n_categories <= 0:
        raise ValueError("make_synthetic_catalog: n_notes and n_categories must be > 0")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    names = category_names(n_categories)
    vocabs = [_vocab(rng, k) for k in range(n_categories)]
    path = os.path.join(out_dir, "notes.jsonl")
    with atomic_write(path) as fh:
        for i in range(n_notes):
            k = i % n_categories
            nid = f"n{i:06d}"
            words = vocabs[k]
            title = " ".join([*rng.choice(words, size=2), *rng.choice(_SHARED_WORDS, size=2)])
            body = [str(w) for w in rng.choice(words, size=int(rng.integers(6, 12)))]
            body += [str(w) for w in rng.choice(_SHARED_WORDS, size=int(rng.integers(3, 7)))]
            rng.shuffle(body)
            image = None
            if rng.random() < image_fraction:
                colour, shape = category_style(k, n_categories)
                rel = f"images/{nid}.jpg"
                draw_note_image(rng, colour, shape, image_size).save(os.path.join(out_dir, rel), "JPEG", quality=90)
                image = rel
            rec = {"note_id": nid, "title": title, "content": " ".join(body),
                   "topics": [str(w) for w in rng.choice(words, size=2, replace=False)],
                   "image": image, "category": names[k],
                   "timestamp": BASE_TIMESTAMP + int(rng.integers(0, 30 * 86400))}
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return path


VISUAL_NEIGHBOURS = 5
HIST_LEVELS = 4  # per channel: 4 x 4 x 4 = 64 colour bins
HIST_SIZE = 64  # images are reduced to at most 64 x 64 before counting
WHITE = 240  # pixels with every channel at or above this are background (clip art sits on white)


def colour_histogram(path: str, max_pixels: int | None = None) -> Optional[np.ndarray]:
    """The image's colour distribution without its background: reduced to at most 64 x 64 pixels
    (transparency flattened on white, as the shards do), near-white pixels (every channel >= 240)
    dropped, the rest counted in 4 x 4 x 4 RGB bins and normalised to sum 1. None when the image
    cannot be read or is blank (nothing but background)."""
    from notellm2.data_shards.config import MAX_IMAGE_PIXELS
    from notellm2.data_shards.images import BadImage, open_image

    try:
        with open(path, "rb") as fh:
            img = open_image(fh.read(), max_pixels or MAX_IMAGE_PIXELS)
    except (OSError, BadImage):
        return None
    img.thumbnail((HIST_SIZE, HIST_SIZE), Image.Resampling.BILINEAR)
    px = np.asarray(img, dtype=np.uint8).reshape(-1, 3)
    px = px[(px < WHITE).any(axis=1)]
    if not len(px):
        return None
    q = (px.astype(np.int64) * HIST_LEVELS) // 256
    hist = np.bincount((q[:, 0] * HIST_LEVELS + q[:, 1]) * HIST_LEVELS + q[:, 2], minlength=HIST_LEVELS ** 3)
    return hist.astype(np.float64) / hist.sum()


def visual_neighbour_table(notes, k: int = VISUAL_NEIGHBOURS, progress: bool = False) -> dict:
    """{category: {note_id: its k nearest note ids of the category by L1 distance of colour histograms}}
    (ties in catalog order); notes without a histogram are left out."""
    from tqdm import tqdm

    if k <= 0:
        raise ValueError(f"visual_neighbours: got {k!r}; allowed: an integer > 0")
    hists: dict[str, list] = {}
    for n in tqdm(notes, desc="colour histograms", unit="image", disable=not progress):
        h = colour_histogram(n.image_path) if n.image_path else None
        if h is not None:
            hists.setdefault(n.category or "", []).append((n.note_id, h))
    table: dict = {}
    for cat, items in hists.items():
        ids = [i for i, _ in items]
        mat = np.stack([h for _, h in items])
        dist = np.abs(mat[:, None, :] - mat[None, :, :]).sum(axis=2)
        np.fill_diagonal(dist, np.inf)
        order = np.argsort(dist, axis=1, kind="stable")
        table[cat] = {ids[i]: [ids[j] for j in order[i, :min(k, len(ids) - 1)]] for i in range(len(ids))}
    return table


def make_synthetic_views(catalog: str, out_path: str, n_users: int = 50, sessions_per_user: int = 4,
                         views_per_session: int = 6, p_in_category: float = 0.9, seed: int = 0,
                         session_gap_days: float = 8.0, visual_browsing: float = 0.0,
                         visual_neighbours: int = VISUAL_NEIGHBOURS, progress: bool = False,
                         overwrite: bool = True) -> str:
    """Write a view log (CSV, or Parquet when `out_path` ends in .parquet) with columns
    ``user_id, note_id, timestamp``; return `out_path`. A file of other contents at `out_path` is
    replaced only with `overwrite` (notellm2.outputs.FileOutput; the same contents are left as they are).

    Each user prefers two categories; each session picks one of them (or, 1 time in 5, any
    category) and views `views_per_session` notes, each from the session's category with
    probability `p_in_category` and from the whole catalog otherwise. Views within a session are
    20-300 s apart; sessions are `session_gap_days` to that plus one day apart, by default more
    than the miner's default 7-day co-occurrence window, so mined pairs stay within a session.

    `visual_browsing` > 0 makes browsing prefer what looks alike: an in-category view that follows a
    view of the same category is, with that probability, one of the previous note's
    `visual_neighbours` nearest notes of the category by colour histogram (`colour_histogram`, a
    feature independent of any model's vision tower), drawn uniformly; otherwise any note of the
    category. Notes without a usable image (or with a blank one) have no neighbours and are never
    chosen that way. With 0 (the default) the log is exactly what it was before the option existed.
    """
    import pandas as pd

    from notellm2.data_shards.catalog.notes import CatalogError, load_catalog

    if not 0.0 <= visual_browsing <= 1.0:
        raise ValueError(f"visual_browsing: got {visual_browsing!r}; allowed: a number in [0, 1]")
    notes = load_catalog(catalog)
    if not notes:
        raise CatalogError(f"{catalog}: the catalog holds no note to view")
    by_cat: dict[str, list[str]] = {}
    for n in notes:
        by_cat.setdefault(n.category or "", []).append(n.note_id)
    cats = sorted(by_cat)
    all_ids = [n.note_id for n in notes]
    neighbours = visual_neighbour_table(notes, visual_neighbours, progress) if visual_browsing > 0 else {}
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        prefs = rng.choice(len(cats), size=min(2, len(cats)), replace=False)
        t = BASE_TIMESTAMP + int(rng.integers(0, 86400))
        for _ in range(sessions_per_user):
            k = int(rng.choice(prefs)) if rng.random() < 0.8 else int(rng.integers(len(cats)))
            pool = by_cat[cats[k]]
            prev = None
            for _ in range(views_per_session):
                if rng.random() < p_in_category:
                    near = neighbours.get(cats[k], {}).get(prev) if neighbours else None
                    if near and rng.random() < visual_browsing:
                        nid = near[int(rng.integers(len(near)))]
                    else:
                        nid = pool[int(rng.integers(len(pool)))]
                else:
                    nid = all_ids[int(rng.integers(len(all_ids)))]
                prev = nid
                rows.append((f"u{u:05d}", nid, t))
                t += int(rng.integers(20, 301))
            t += int(session_gap_days * 86400) + int(rng.integers(0, 86400))
    df = pd.DataFrame(rows, columns=["user_id", "note_id", "timestamp"]).astype({"timestamp": "int64"})
    with FileOutput(out_path, overwrite, "a view log") as out:
        if out_path.endswith(".parquet"):
            df.to_parquet(out.tmp, index=False)
        else:
            df.to_csv(out.tmp, index=False)
    return out_path


def make_synthetic_pairs(catalog: str, out_dir: str, n_pairs: int = 300, p_same_category: float = 1.0,
                         split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0,
                         extra_rows: Optional[list[tuple[str, str, float, str]]] = None) -> str:
    """Write a pairs directory (``pairs.parquet`` + ``mining_manifest.json``) without running the
    miner: each pair joins two distinct notes of the same category (with probability
    `p_same_category`, else any two notes). `extra_rows` (query_id, target_id, score, split) are
    appended as given, e.g. to plant ids missing from the catalog. Returns `out_dir`."""
    import pandas as pd

    from notellm2.data_shards.catalog.notes import load_catalog

    notes = load_catalog(catalog)
    by_cat: dict[str, list[str]] = {}
    for n in notes:
        by_cat.setdefault(n.category or "", []).append(n.note_id)
    cats = sorted(c for c in by_cat if len(by_cat[c]) >= 2)
    if not cats:
        raise ValueError(f"{catalog}: no category has two notes; cannot draw pairs")
    all_ids = [n.note_id for n in notes]
    rng = np.random.default_rng(seed)
    splits = np.array(["train", "val", "test"])
    rows = []
    for _ in range(n_pairs):
        if rng.random() < p_same_category:
            pool = by_cat[cats[int(rng.integers(len(cats)))]]
        else:
            pool = all_ids
        a, b = rng.choice(len(pool), size=2, replace=False)
        split = splits[int(rng.choice(3, p=np.asarray(split_fractions) / sum(split_fractions)))]
        rows.append((pool[int(a)], pool[int(b)], float(np.round(rng.random(), 6)), str(split)))
    rows += list(extra_rows or [])
    df = pd.DataFrame(rows, columns=["query_id", "target_id", "score", "split"]).astype({"score": "float64"})
    os.makedirs(out_dir, exist_ok=True)
    df.to_parquet(os.path.join(out_dir, "pairs.parquet"), index=False)
    counts = {s: int((df["split"] == s).sum()) for s in ("train", "val", "test")}
    manifest = {"settings": {"synthetic": True, "seed": seed, "n_pairs": n_pairs,
                             "p_same_category": p_same_category}, "inputs": {"catalog": catalog},
                "counts": counts}
    with open(os.path.join(out_dir, "mining_manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
    return out_dir
