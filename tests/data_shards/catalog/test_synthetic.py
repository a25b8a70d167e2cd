import colorsys
import os

import numpy as np
import pandas as pd
from PIL import Image

from notellm2.data_shards.catalog.notes import load_catalog
from notellm2.data_shards.catalog.synthetic import category_names, category_style, make_synthetic_catalog, make_synthetic_views, \
    make_synthetic_pairs


def _bytes(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = open(p, "rb").read()
    return out


def test_catalog_is_a_pure_function_of_the_seed(tmp_path):
    make_synthetic_catalog(str(tmp_path / "a"), n_notes=20, seed=5)
    make_synthetic_catalog(str(tmp_path / "b"), n_notes=20, seed=5)
    make_synthetic_catalog(str(tmp_path / "c"), n_notes=20, seed=6)
    a, b, c = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert a == b and len(a) == 21
    assert a["notes.jsonl"] != c["notes.jsonl"]


def _shape_hue(path):
    """Mean hue of the saturated pixels (the shape; the background is grey noise)."""
    hsv = np.asarray(Image.open(path).convert("HSV")).reshape(-1, 3).astype(float)
    sat = hsv[hsv[:, 1] > 100]
    ang = sat[:, 0] / 255 * 2 * np.pi
    return (np.arctan2(np.sin(ang).mean(), np.cos(ang).mean()) / (2 * np.pi)) % 1.0


def test_images_and_words_depend_on_category(tmp_path):
    k = 5
    cat = make_synthetic_catalog(str(tmp_path), n_notes=50, n_categories=k, seed=0)
    notes = load_catalog(cat)
    names = category_names(k)
    assert [n.category for n in notes[:k]] == names and all(n.image_path for n in notes)
    # The shape's hue identifies the category (nearest category hue) for every image.
    hues = [colorsys.rgb_to_hsv(*[c / 255 for c in category_style(j, k)[0]])[0] for j in range(k)]
    for n in notes:
        h = _shape_hue(n.image_path)
        nearest = min(range(k), key=lambda j: min(abs(h - hues[j]), 1 - abs(h - hues[j])))
        assert names[nearest] == n.category, n.note_id
    # Category words are never shared between categories; each note carries several of its own.
    words = {c: set() for c in names}
    for n in notes:
        words[n.category] |= set((n.title + " " + n.content).split())
    shared = set.intersection(*words.values())
    for c in names:
        own = words[c] - shared
        assert all(not (own & (words[o] - shared)) for o in names if o != c)
    for n in notes:
        own = [w for w in (n.title + " " + n.content).split() if w not in shared]
        assert len(own) >= 6
    # Without images for some notes
    cat2 = make_synthetic_catalog(str(tmp_path / "half"), n_notes=40, seed=1, image_fraction=0.5)
    with_img = sum(n.image_path is not None for n in load_catalog(cat2))
    assert 10 < with_img < 30


def test_views_mostly_stay_within_a_category(tmp_path):
    cat = make_synthetic_catalog(str(tmp_path / "c"), n_notes=60, n_categories=4, seed=0)
    p = make_synthetic_views(cat, str(tmp_path / "views.csv"), n_users=20, seed=0)
    df = pd.read_csv(p)
    assert list(df.columns) == ["user_id", "note_id", "timestamp"] and df["timestamp"].dtype == np.int64
    assert len(df) == 20 * 4 * 6 and set(df.note_id) <= {n.note_id for n in load_catalog(cat)}
    cat_of = {n.note_id: n.category for n in load_catalog(cat)}
    same = total = 0
    for _, g in df.sort_values(["user_id", "timestamp"]).groupby("user_id"):
        ids, ts = g.note_id.tolist(), g.timestamp.tolist()
        assert ts == sorted(ts)
        for i in range(1, len(ids)):
            if ts[i] - ts[i - 1] < 3600:  # same session
                total += 1
                same += cat_of[ids[i]] == cat_of[ids[i - 1]]
    assert same / total > 0.7
    pq = make_synthetic_views(cat, str(tmp_path / "views.parquet"), n_users=20, seed=0)
    assert pd.read_parquet(pq).equals(df)


def test_pairs_are_same_category_and_have_the_pairs_schema(tmp_path):
    cat = make_synthetic_catalog(str(tmp_path / "c"), n_notes=40, n_categories=4, seed=0)
    d = make_synthetic_pairs(cat, str(tmp_path / "p"), n_pairs=200, seed=0)
    df = pd.read_parquet(os.path.join(d, "pairs.parquet"))
    assert list(df.columns) == ["query_id", "target_id", "score"] + ["split"] and df.score.dtype == np.float64
    cat_of = {n.note_id: n.category for n in load_catalog(cat)}
    assert all(cat_of[q] == cat_of[t] and q != t for q, t in zip(df.query_id, df.target_id))
    counts = df.split.value_counts().to_dict()
    assert set(counts) == {"train", "val", "test"} and counts["train"] > counts["val"]
    assert os.path.isfile(os.path.join(d, "mining_manifest.json"))


COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20), "yellow": (230, 210, 0)}


def _colour_catalog(root, per_colour=4):
    """One category of clip art: squares of four colours on a transparent background (flattened on white)."""
    import json

    os.makedirs(root / "img")
    lines = []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            img = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
            img.paste((*rgb, 255), (5 + i, 5, 30 + i, 30))
            img.save(root / "img" / f"{colour}{i}.png")
            lines.append({"note_id": f"{colour}{i}", "title": "", "content": "", "image": f"img/{colour}{i}.png",
                          "category": "shapes"})
    (root / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(root / "c.jsonl")


def test_colour_histograms_ignore_the_white_background(tmp_path):
    from notellm2.data_shards.catalog.synthetic import HIST_LEVELS, colour_histogram

    cat = _colour_catalog(tmp_path)
    h = colour_histogram(os.path.join(os.path.dirname(cat), "img", "red0.png"))
    red_bin = ((220 * HIST_LEVELS // 256) * HIST_LEVELS + 20 * HIST_LEVELS // 256) * HIST_LEVELS + 20 * HIST_LEVELS // 256
    assert h.shape == (64,) and h[red_bin] == 1.0  # the transparent surround is background, not black
    Image.new("RGB", (30, 30), (255, 255, 255)).save(tmp_path / "white.png")
    assert colour_histogram(str(tmp_path / "white.png")) is None
    assert colour_histogram(str(tmp_path / "missing.png")) is None


def test_visual_browsing_walks_to_colour_neighbours_and_zero_keeps_the_old_log(tmp_path):
    """With --visual-browsing 1 every in-category step of a session goes to one of the previous note's
    colour-nearest notes (here: its three same-colour siblings); with 0 the log is the one of the code
    before the option (sha256 of its CSV, from commit 3743ba4's make_synthetic_views)."""
    import hashlib

    from notellm2.data_shards.catalog.synthetic import visual_neighbour_table

    cat = _colour_catalog(tmp_path)
    table = visual_neighbour_table(load_catalog(cat), k=3)
    assert table["shapes"]["red0"] == ["red1", "red2", "red3"]

    def same_colour_steps(visual):
        p = make_synthetic_views(cat, str(tmp_path / f"v{visual}.csv"), n_users=30, p_in_category=1.0, seed=0,
                                 visual_browsing=visual, visual_neighbours=3)
        df = pd.read_csv(p).sort_values(["user_id", "timestamp"], kind="stable")
        same = total = 0
        for _, g in df.groupby("user_id"):
            ids, ts = g.note_id.tolist(), g.timestamp.tolist()
            for i in range(1, len(ids)):
                if ts[i] - ts[i - 1] < 3600:
                    total += 1
                    same += ids[i].rstrip("0123456789") == ids[i - 1].rstrip("0123456789") and ids[i] != ids[i - 1]
        return same / total

    assert same_colour_steps(1.0) == 1.0
    assert same_colour_steps(0.0) < 0.4  # chance: 3 siblings among 16

    syn = make_synthetic_catalog(str(tmp_path / "syn"), n_notes=40, n_categories=4, seed=0)
    old = make_synthetic_views(syn, str(tmp_path / "old.csv"), n_users=12, seed=3)
    assert hashlib.sha256(open(old, "rb").read()).hexdigest() == \
        "39f8c3159057b129a1c872e8e7d6f229a2a1d7e22b4b32957cf1ec6a282adfc3"


def test_simulate_views_refuses_a_visual_probability_outside_0_1(tmp_path, capsys):
    from notellm2.launcher.cli import main

    cat = _colour_catalog(tmp_path)
    for bad, msg in ((["--visual-browsing", "1.5"], "argument --visual-browsing: 1.5: must be in [0.0, 1.0]"),
                     (["--visual-neighbours", "0"], "argument --visual-neighbours: 0: must be an integer >= 1")):
        assert main(["data", "simulate-views", "--catalog", cat, "--out", str(tmp_path / "v.csv"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
    assert not (tmp_path / "v.csv").exists()
