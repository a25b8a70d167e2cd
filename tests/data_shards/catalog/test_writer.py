import io
import json
import os
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from notellm2.data_shards.catalog.notes import load_catalog
from notellm2.data_shards.writing.shards import (ShardSettings, ShardWriteError, bounded_size, read_pairs, shard_pattern, verify_shards,
                                write_shards)
from tests.helpers.data import (synthetic_catalog, synthetic_pairs, write_exif_rotated_jpeg, write_garbage,
                                 write_plain_jpeg)


def _files(d):
    return {n: open(os.path.join(d, n), "rb").read() for n in sorted(os.listdir(d))}


def _read_tar(path):
    """[(key, {ext: bytes})] in file order, plus the raw TarInfo list."""
    samples, infos = [], []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            infos.append(m)
            key, ext = m.name.split(".", 1)
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tf.extractfile(m).read()
    return samples, infos


def _read_set(out, kind, split):
    names = sorted(n for n in os.listdir(out) if n.startswith(f"{kind}-{split}-"))
    return [s for n in names for s in _read_tar(os.path.join(out, n))[0]], names


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("writer_inputs")
    cat = synthetic_catalog(root / "cat", n_notes=48, n_categories=4)
    pairs = synthetic_pairs(root / "pairs", cat, n_pairs=100,
                            extra_rows=[("n000001", "ghost", 0.5, "train"), ("n000002", "n000002", 0.9, "train")])
    return str(root), cat, pairs


def test_rerun_gives_byte_identical_shards_and_manifest(inputs, tmp_path):
    root, cat, pairs = inputs
    st = ShardSettings(shard_size=16, image_size=48, seed=3)
    m1 = write_shards(pairs, cat, str(tmp_path / "a"), settings=st, workers=1)
    write_shards(pairs, cat, str(tmp_path / "b"), settings=ShardSettings(shard_size=16, image_size=48, seed=3), workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b  # including manifest.json; and 2 workers order like 1
    assert len(m1["shards"]) > 6
    # The row order of pairs.parquet does not matter either.
    df = pd.read_parquet(os.path.join(pairs, "pairs.parquet")).sample(frac=1.0, random_state=7)
    shuffled = tmp_path / "shuffled_pairs"
    shuffled.mkdir()
    df.to_parquet(shuffled / "pairs.parquet", index=False)
    write_shards(str(shuffled), cat, str(tmp_path / "c"), settings=ShardSettings(shard_size=16, image_size=48, seed=3), workers=1)
    c = _files(tmp_path / "c")
    assert {k: v for k, v in c.items() if k != "manifest.json"} == {k: v for k, v in a.items() if k != "manifest.json"}
    # Another seed: the same pairs in another order.
    write_shards(pairs, cat, str(tmp_path / "d"), settings=ShardSettings(shard_size=16, image_size=48, seed=4), workers=1)
    order = lambda d: [json.loads(s["pair.json"])["query_id"] + ">" + json.loads(s["pair.json"])["target_id"]
                       for s in (x[1] for x in _read_set(d, "pairs", "train")[0])]
    oa, od = order(str(tmp_path / "a")), order(str(tmp_path / "d"))
    assert oa != od and sorted(oa) == sorted(od)


def test_shard_contents_match_pairs_and_catalog(inputs, tmp_path):
    root, cat, pairs = inputs
    out = str(tmp_path / "s")
    m = write_shards(pairs, cat, out, settings=ShardSettings(shard_size=16, image_size=48), workers=1)
    notes = {n.note_id: n for n in load_catalog(cat)}
    df = pd.read_parquet(os.path.join(pairs, "pairs.parquet"))
    for split in ("train", "val", "test"):
        part = df[(df.split == split) & (df.query_id != df.target_id) & df.query_id.isin(notes) & df.target_id.isin(notes)]
        best = part.groupby(["query_id", "target_id"])["score"].max().to_dict()
        samples, names = _read_set(out, "pairs", split)
        assert [s[0] for s in samples] == [f"{i:09d}" for i in range(len(samples))]  # keys run across shards
        got = {}
        for _, s in samples:
            assert set(s) == {"pair.json", "q.json", "t.json", "q.jpg", "t.jpg"}
            p = json.loads(s["pair.json"])
            got[(p["query_id"], p["target_id"])] = p["score"]
            for role, nid in (("q", p["query_id"]), ("t", p["target_id"])):
                nj = json.loads(s[f"{role}.json"])
                n = notes[nid]
                assert nj == {"note_id": n.note_id, "title": n.title, "content": n.content, "topics": n.topics,
                              "category": n.category}
                img = Image.open(io.BytesIO(s[f"{role}.jpg"]))
                assert img.format == "JPEG" and min(img.size) == 48  # the 64 px source was scaled down
        assert got == best
        counts = m["counts"][split]
        assert counts["pairs_written"] == len(samples) == len(best)
        # Shard sizes by count: all full except the last.
        sizes = [e["count"] for e in m["shards"] if e["kind"] == "pairs" and e["split"] == split]
        assert sum(sizes) == len(samples) and all(s == 16 for s in sizes[:-1]) and 0 < sizes[-1] <= 16
        assert m["patterns"][f"pairs-{split}"] == shard_pattern(names)
        # Notes shards: exactly the notes of this split's pairs, each once.
        nsamples, _ = _read_set(out, "notes", split)
        ids = [json.loads(s["json"])["note_id"] for _, s in nsamples]
        assert ids == sorted({x for k in best for x in k})
        assert all(set(s) == {"json", "jpg"} for _, s in nsamples)
        assert counts["notes_written"] == len(ids) == counts["notes_with_image"]
    assert m["counts"]["train"]["self_pairs"] == 1 and m["counts"]["train"]["missing_note_pairs"] == 1
    assert m["problems"]["missing_note"]["first"] == ["ghost"]
    # Manifest checksums and counts hold; tar headers carry no time or owner.
    assert verify_shards(out) == []
    _, infos = _read_tar(os.path.join(out, "pairs-train-000000.tar"))
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
    src = m["sources"]
    assert src["catalog"]["notes"] == 48 and len(src["pairs"]["sha256"]) == 64 and src["mining_manifest"] is not None
    assert m["settings"]["shard_size"] == 16 and m["settings"]["splits"] == ["train", "val", "test"]


def test_reads_with_webdataset(inputs, tmp_path):
    import webdataset as wds

    root, cat, pairs = inputs
    out = str(tmp_path / "s")
    m = write_shards(pairs, cat, out, settings=ShardSettings(shard_size=16, splits=("train",)), workers=1)
    ds = wds.WebDataset(os.path.join(out, m["patterns"]["pairs-train"]), shardshuffle=False,
                        nodesplitter=wds.split_by_node).decode("pil")
    samples = list(ds)
    assert len(samples) == m["counts"]["train"]["pairs_written"]
    assert samples[0]["q.jpg"].mode == "RGB" and samples[0]["pair.json"]["query_id"] == samples[0]["q.json"]["note_id"]
    assert not any(n.startswith(("pairs-val", "notes-test")) for n in os.listdir(out))  # only the chosen split


def _small_inputs(tmp_path, images, pairs_rows):
    """A hand-made catalog: images = {note_id: writer(path) or None}; pairs_rows = [(q, t, score, split)]."""
    (tmp_path / "img").mkdir(exist_ok=True)
    with open(tmp_path / "notes.jsonl", "w") as fh:
        for nid, make in images.items():
            rel = None
            if make is not None:
                rel = f"img/{nid}.jpg"
                make(tmp_path / rel)
            fh.write(json.dumps({"note_id": nid, "title": f"title {nid}", "content": "c", "image": rel}) + "\n")
    pd.DataFrame(pairs_rows, columns=["query_id", "target_id", "score", "split"]).to_parquet(tmp_path / "pairs.parquet")
    return str(tmp_path), str(tmp_path / "notes.jsonl")


def test_exif_orientation_and_bounded_size(tmp_path):
    pairs, cat = _small_inputs(tmp_path, {
        "rot": lambda p: write_exif_rotated_jpeg(p, stored_w=120, stored_h=60),  # displays as 60 x 120
        "small": lambda p: write_plain_jpeg(p, 20, 30),
        "pano": lambda p: write_plain_jpeg(p, 1000, 50),
    }, [("rot", "small", 1.0, "train"), ("pano", "rot", 1.0, "train")])
    out = str(tmp_path / "s")
    write_shards(pairs, cat, out, settings=ShardSettings(image_size=32, splits=("train",)), workers=1)
    samples, _ = _read_set(out, "notes", "train")
    imgs = {json.loads(s["json"])["note_id"]: Image.open(io.BytesIO(s["jpg"])) for _, s in samples}
    assert imgs["rot"].size == (32, 64)  # rotated upright, shorter side 32
    # EXIF orientation 6 rotates 90 degrees clockwise: the red top-left corner goes to the top right.
    arr = np.asarray(imgs["rot"].convert("RGB")).astype(int)
    top_right, top_left = arr[1:4, -4:-1].reshape(-1, 3).mean(0), arr[1:4, 1:4].reshape(-1, 3).mean(0)
    assert top_right[0] > 200 and top_right[1] < 80 and not (top_left[0] > 200 and top_left[1] < 80)
    assert not imgs["rot"].getexif()  # no EXIF travels into the shard
    assert imgs["small"].size == (20, 30)  # never enlarged
    assert imgs["pano"].size == (128, 6)  # longer side capped at 4 x image_size
    assert bounded_size(1000, 50, 32) == (128, 6) and bounded_size(64, 64, 256) == (64, 64)


@pytest.mark.parametrize("policy", ["drop_image", "skip_pair"])
def test_bad_image_policy(tmp_path, policy):
    pairs, cat = _small_inputs(tmp_path, {
        "a": lambda p: write_plain_jpeg(p, 40, 40),
        "b": lambda p: write_garbage(p),
        "c": lambda p: write_plain_jpeg(p, 40, 40),
        "d": None,  # a note without image is fine under both policies
    }, [("a", "b", 1.0, "train"), ("a", "c", 0.5, "train"), ("c", "d", 0.2, "train"), ("b", "x", 0.1, "train")])
    os.remove(tmp_path / "img" / "c.jpg")  # referenced but missing: also a bad image
    out = str(tmp_path / "s")
    if policy == "skip_pair":  # every pair touches b or c: nothing to write is refused, nothing left behind
        with pytest.raises(ShardWriteError, match=r"no pair to write .*\(train: 4 in, 1 with a note missing from "
                                                  r"the catalog, 0 self, 0 duplicate, 3 bad image"):
            write_shards(pairs, cat, out, settings=ShardSettings(splits=("train",), bad_image_policy=policy), workers=1)
        assert not os.path.exists(out)
        return
    m = write_shards(pairs, cat, out, settings=ShardSettings(splits=("train",), bad_image_policy=policy), workers=1)
    assert m["problems"]["bad_image"]["count"] == 2 and m["problems"]["bad_image"]["first"] == ["b", "c"]
    assert "undecodable" in m["problems"]["bad_image"]["details"][0]
    assert "cannot read" in m["problems"]["bad_image"]["details"][1]
    assert m["problems"]["missing_note"]["first"] == ["x"]
    samples, _ = _read_set(out, "pairs", "train")
    got = {(json.loads(s["pair.json"])["query_id"], json.loads(s["pair.json"])["target_id"]): set(s) for _, s in samples}
    if policy == "drop_image":
        assert set(got) == {("a", "b"), ("a", "c"), ("c", "d")}
        assert got[("a", "b")] == {"pair.json", "q.json", "q.jpg", "t.json"}  # b written without image
        assert got[("c", "d")] == {"pair.json", "q.json", "t.json"}
        assert m["counts"]["train"]["bad_image_pairs"] == 3 and m["counts"]["train"]["pairs_written"] == 3
        notes, _ = _read_set(out, "notes", "train")
        assert {json.loads(s["json"])["note_id"]: "jpg" in s for _, s in notes} == {"a": True, "b": False, "c": False, "d": False}
    assert verify_shards(out) == []
    # every problem, not only the manifest's first few, is in the problem log the summary points to
    assert m["problem_log"] == "problems.jsonl"
    logged = [json.loads(line) for line in open(os.path.join(out, "problems.jsonl"))]
    assert [(r["kind"], r["note_id"]) for r in logged] == [("missing_note", "x"), ("bad_image", "b"), ("bad_image", "c")]


def test_interrupted_run_leaves_no_truncated_shard_and_rerun_recovers(inputs, tmp_path, monkeypatch):
    import notellm2.data_shards.writing.shards as w

    root, cat, pairs = inputs
    st = lambda: ShardSettings(shard_size=8, image_size=32, splits=("train",))
    clean = str(tmp_path / "clean")
    write_shards(pairs, cat, clean, settings=st(), workers=1)

    out = str(tmp_path / "s")
    os.makedirs(out)
    for junk in (".pairs-train-000000.tar.tmp-99999", ".manifest.json.tmp-99999", ".images.spool-99999"):
        open(os.path.join(out, junk), "wb").write(b"left by a killed run")  # removed at start
    calls = {"n": 0}
    real = w._json_bytes

    def flaky(obj):
        calls["n"] += 1
        if calls["n"] == 3 * 20 + 2:  # in the middle of the third shard (3 json members per pair)
            raise KeyboardInterrupt("simulated interruption")
        return real(obj)

    monkeypatch.setattr(w, "_json_bytes", flaky)
    # A killed process runs no clean-up: the shard being written stays where it was written.
    monkeypatch.setattr(w._ShardSink, "abort", lambda self: None)
    with pytest.raises(KeyboardInterrupt):
        write_shards(pairs, cat, out, settings=st(), workers=1)
    monkeypatch.undo()
    left = sorted(os.listdir(out))
    # Complete shards under final names, the partial one only under a hidden temporary name, no manifest.
    assert [n for n in left if not n.startswith(".")] == ["pairs-train-000000.tar", "pairs-train-000001.tar"]
    assert [n for n in left if n.startswith(".")] == [f".pairs-train-000002.tar.tmp-{os.getpid()}"]
    for n in left[1:]:
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(clean, n), "rb").read()
    assert verify_shards(out)[0].endswith("no manifest (the shard set is incomplete or was not written by write-shards)")
    # Without a manifest the leftovers are an interrupted run: a plain rerun replaces them.
    write_shards(pairs, cat, out, settings=st(), workers=1)
    assert _files(out) == _files(clean)


def test_existing_complete_set_needs_overwrite_and_stale_shards_go(inputs, tmp_path):
    root, cat, pairs = inputs
    out = str(tmp_path / "s")
    write_shards(pairs, cat, out, settings=ShardSettings(shard_size=4, image_size=32), workers=1)
    many = sorted(os.listdir(out))
    before = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in many}
    # the same inputs and settings: nothing is written
    assert write_shards(pairs, cat, out, settings=ShardSettings(shard_size=4, image_size=32), workers=1)["unchanged"]
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == before
    with pytest.raises(ShardWriteError, match=r"settings.shard_size 4 there, 400 now.*pass --overwrite"):
        write_shards(pairs, cat, out, settings=ShardSettings(shard_size=400, image_size=32), workers=1)
    m = write_shards(pairs, cat, out, settings=ShardSettings(shard_size=400, image_size=32), workers=1, overwrite=True)
    now = sorted(os.listdir(out))
    assert len(now) < len(many)
    assert now == sorted([e["name"] for e in m["shards"]] + ["manifest.json", m["note_stats"]["file"], m["problem_log"]])
    assert verify_shards(out) == []


def test_verify_detects_corruption(inputs, tmp_path):
    root, cat, pairs = inputs
    out = str(tmp_path / "s")
    write_shards(pairs, cat, out, settings=ShardSettings(shard_size=16, image_size=32, splits=("val",)), workers=1)
    p = os.path.join(out, "pairs-val-000000.tar")
    data = bytearray(open(p, "rb").read())
    data[700] ^= 0xFF
    open(p, "wb").write(bytes(data))
    os.remove(os.path.join(out, "notes-val-000000.tar"))
    problems = verify_shards(out)
    assert len(problems) == 2 and "sha256 differs" in problems[0] and "missing" in problems[1]


def test_bad_inputs_give_clear_errors(inputs, tmp_path):
    root, cat, pairs = inputs
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"query_id": ["a"], "target_id": ["b"], "split": ["train"]}).to_parquet(bad / "pairs.parquet")
    with pytest.raises(ShardWriteError, match=r"pairs.parquet: missing columns score"):
        read_pairs(str(bad))
    pd.DataFrame({"query_id": ["a"], "target_id": ["b"], "score": [1.0], "split": ["dev"]}).to_parquet(bad / "pairs.parquet")
    with pytest.raises(ShardWriteError, match=r"unknown split values \['dev'\]"):
        read_pairs(str(bad))
    pd.DataFrame({"query_id": ["a", None], "target_id": ["b", "c"], "score": [1.0, 2.0], "split": ["train"] * 2}).to_parquet(bad / "pairs.parquet")
    with pytest.raises(ShardWriteError, match=r"row 1: column 'query_id' must be a non-empty string"):
        read_pairs(str(bad))
    pd.DataFrame({"query_id": ["a"], "target_id": ["b"], "score": [float("nan")], "split": ["train"]}).to_parquet(bad / "pairs.parquet")
    with pytest.raises(ShardWriteError, match=r"row 0: 'score' must be finite"):
        read_pairs(str(bad))
    with pytest.raises(ShardWriteError, match="pairs file does not exist"):
        read_pairs(str(tmp_path / "nowhere"))
    dup = tmp_path / "dup.jsonl"
    dup.write_text(open(cat).read() + open(cat).readline())
    with pytest.raises(ShardWriteError, match=r"1 duplicate note ids \(first: n000000\)"):
        write_shards(pairs, str(dup), str(tmp_path / "o"), image_root=os.path.dirname(cat))
    with pytest.raises(ShardWriteError, match="splits: got 'dev'"):
        write_shards(pairs, cat, str(tmp_path / "o"), settings=ShardSettings(splits=("dev",)))
    with pytest.raises(ShardWriteError, match="shard_size: got 0"):
        write_shards(pairs, cat, str(tmp_path / "o"), settings=ShardSettings(shard_size=0))


_KILL_SCRIPT = """
import os, signal, sys
import notellm2.data_shards.writing.shards as w
from notellm2.data_shards.writing.shards import ShardSettings, write_shards
real_add = w._ShardSink.add
def add(self, members):
    real_add(self, members)
    if self.name == "pairs-train-000002.tar" and self.count == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # no finally, no clean-up: like a node going away
w._ShardSink.add = add
write_shards(sys.argv[1], sys.argv[2], sys.argv[3], settings=ShardSettings(shard_size=8, image_size=32, splits=("train",)), workers=1)
"""


def test_sigkilled_run_leaves_only_complete_shards_under_final_names(inputs, tmp_path):
    import subprocess
    import sys

    root, cat, pairs = inputs
    clean = str(tmp_path / "clean")
    write_shards(pairs, cat, clean, settings=ShardSettings(shard_size=8, image_size=32, splits=("train",)), workers=1)
    out = str(tmp_path / "s")
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, pairs, cat, out], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = sorted(os.listdir(out))
    finals = [n for n in left if not n.startswith(".")]
    assert finals == ["pairs-train-000000.tar", "pairs-train-000001.tar"]
    for n in finals:
        assert open(os.path.join(out, n), "rb").read() == open(os.path.join(clean, n), "rb").read()
    temps = [n for n in left if n.startswith(".")]
    assert len(temps) == 2 and any(".pairs-train-000002.tar.tmp-" in n for n in temps) \
        and any(n.startswith(".images.spool-") for n in temps)
    write_shards(pairs, cat, out, settings=ShardSettings(shard_size=8, image_size=32, splits=("train",)), workers=1)
    assert _files(out) == _files(clean)  # temp files gone, same bytes as an uninterrupted run


def test_note_split_puts_every_split_note_in_the_notes_shards(inputs, tmp_path):
    """With note_split.parquet beside the pairs, notes-{split} holds every note of the split that
    the catalog has, also those in no pair; an id the catalog lacks is counted and reported."""
    root, cat, _ = inputs
    ids = sorted(n.note_id for n in load_catalog(cat))
    pairs_dir = tmp_path / "pairs"
    pairs_dir.mkdir()
    # test notes: ids[0:10] plus an id the catalog does not have; only ids[0] -> ids[1] is a pair.
    split_of = {x: ("test" if i < 10 else "val" if i < 14 else "train") for i, x in enumerate(ids)}
    split_of["ghost-note"] = "test"
    pd.DataFrame({"note_id": sorted(split_of), "split": [split_of[x] for x in sorted(split_of)]}).to_parquet(
        pairs_dir / "note_split.parquet")
    pd.DataFrame({"query_id": [ids[0], ids[20]], "target_id": [ids[1], ids[21]], "score": [1.0, 2.0],
                  "split": ["test", "train"]}).to_parquet(pairs_dir / "pairs.parquet")
    out = tmp_path / "shards"
    m = write_shards(str(pairs_dir), cat, str(out), settings=ShardSettings(shard_size=4, image_size=32), workers=1)
    for split, expect in (("test", ids[:10]), ("val", ids[10:14]), ("train", ids[14:])):
        samples, _ = _read_set(out, "notes", split)
        assert [json.loads(s["json"])["note_id"] for _, s in samples] == expect, split
        assert m["counts"][split]["notes_written"] == len(expect)
        assert all("jpg" in s for _, s in samples)  # their images are encoded too
    assert m["counts"]["test"]["split_notes_missing_from_catalog"] == 1
    assert "ghost-note" in m["problems"]["missing_note"]["first"]
    assert m["counts"]["test"]["pairs_written"] == 1 and m["counts"]["val"]["pairs_written"] == 0
    assert m["sources"]["note_split"]["sha256"]
    # Without the file (pairs from elsewhere) the notes shards hold the notes of the pairs, as before.
    os.remove(pairs_dir / "note_split.parquet")
    m = write_shards(str(pairs_dir), cat, str(tmp_path / "old"), settings=ShardSettings(image_size=32), workers=1)
    assert m["counts"]["test"]["notes_written"] == 2 and m["sources"]["note_split"] is None
    # A bad note split file is refused with its name.
    pd.DataFrame({"note_id": ["a", "a"], "split": ["test", "val"]}).to_parquet(pairs_dir / "note_split.parquet")
    with pytest.raises(ShardWriteError, match=r"note_split\.parquet: row 1: note_id 'a' appears more than once"):
        write_shards(str(pairs_dir), cat, str(tmp_path / "bad"), workers=1)


def test_pairs_file_readers(tmp_path):
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs

    d = tmp_path / "p"
    d.mkdir()
    pd.DataFrame({"query_id": ["a", "b", "c"], "target_id": ["b", "c", "a"], "score": [3, 2, 1],
                  "split": ["test", "train", "test"]}).to_parquet(d / "pairs.parquet")
    got = read_pairs(d, split="test", columns=["query_id", "target_id"])
    assert got.to_dict("list") == {"query_id": ["a", "c"], "target_id": ["b", "a"]}  # file order
    assert read_pairs(d / "pairs.parquet").score.dtype == "float64"
    with pytest.raises(ValueError, match=r"pairs\.parquet: no pairs in split 'val' \(splits present: train, test\)"):
        read_pairs(d, split="val")
    with pytest.raises(ValueError, match=r"unknown pair columns requested \['x'\]"):
        read_pairs(d, columns=["x"])
    with pytest.raises(FileNotFoundError, match=r"note_split\.parquet: note split file does not exist"):
        read_note_split(d)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*pairs file does not exist"):
        read_pairs(tmp_path / "nowhere")
    pd.DataFrame({"note_id": ["b", "a"], "split": ["test", "dev"]}).to_parquet(d / "note_split.parquet")
    with pytest.raises(ValueError, match=r"note_split\.parquet: unknown split values \['dev'\]"):
        read_note_split(d / "pairs.parquet")
    pd.DataFrame({"note_id": ["b", "a"], "split": ["test", "val"]}).to_parquet(d / "note_split.parquet")
    assert read_note_split(d).to_dict("list") == {"note_id": ["b", "a"], "split": ["test", "val"]}
