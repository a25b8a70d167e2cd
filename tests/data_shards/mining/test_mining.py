"""Co-occurrence mining: exact pairs and scores on hand-built view logs (docs/mining.md).

Every test that takes the `engine` fixture runs twice: on DuckDB and on a real Spark session
(local[2], one per module: conftest.py)."""
from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest

from notellm2.data_shards.mining.mine import MiningError, MiningSettings, mine_pairs

DAY = 86_400
T0 = 1_700_000_000


def write_views(path, rows) -> str:
    """rows: (user_id, note_id, seconds after T0)."""
    df = pd.DataFrame(rows, columns=["user_id", "note_id", "timestamp"])
    df["timestamp"] = df["timestamp"] + T0
    path = str(path)
    if path.endswith(".csv"):
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def run_mining(engine, views, out, settings=None, **kw):
    """mine_pairs on the given engine: ("duckdb", None) or ("spark", session)."""
    name, session = engine
    settings = settings or MiningSettings(**kw)
    settings.engine = name
    return mine_pairs(views, out, settings, spark=session)


def mine(tmp_path, engine, rows, name="run", **kw):
    kw.setdefault("val_fraction", 0.0)
    kw.setdefault("test_fraction", 0.0)
    kw.setdefault("memory_limit", "512MB")
    views = write_views(tmp_path / f"{name}.parquet", rows)
    out = tmp_path / f"{name}_out"
    summary = run_mining(engine, views, out, MiningSettings(**kw))
    pairs = pd.read_parquet(out / "pairs.parquet")
    return pairs, summary


def scores(pairs) -> dict:
    return {(q, t): s for q, t, s in zip(pairs.query_id, pairs.target_id, pairs.score)}


def test_weighted_scores_are_sums_of_inverse_distinct_notes(tmp_path, engine):
    rows = [("u1", "A", 0), ("u1", "B", 100), ("u1", "C", 200),
            ("u2", "A", 0), ("u2", "B", 50)]
    pairs, summary = mine(tmp_path, engine, rows)
    got = scores(pairs)
    assert set(got) == {("A", "B"), ("A", "C"), ("B", "C")}
    assert got[("A", "B")] == pytest.approx(1 / 3 + 1 / 2, abs=1e-11)
    assert got[("A", "C")] == pytest.approx(1 / 3, abs=1e-11)
    assert got[("B", "C")] == pytest.approx(1 / 3, abs=1e-11)
    assert summary["counts"]["co_occurrences"] == 4
    assert list(pairs.columns) == ["query_id", "target_id", "score", "split"]
    assert str(pairs.score.dtype) == "float64" and set(pairs.split) == {"train"}


def test_unweighted_scores_count_users(tmp_path, engine):
    rows = [("u1", "A", 0), ("u1", "B", 100), ("u1", "C", 200),
            ("u2", "A", 0), ("u2", "B", 50)]
    pairs, _ = mine(tmp_path, engine, rows, weighting=False)
    assert scores(pairs) == {("A", "B"): 2.0, ("A", "C"): 1.0, ("B", "C"): 1.0}


def test_window_is_inclusive_at_exactly_seven_days(tmp_path, engine):
    rows = [("u1", "A", 0), ("u1", "B", 7 * DAY),          # exactly 7 days: counts
            ("u2", "C", 0), ("u2", "D", 7 * DAY + 1)]      # one second more: does not
    pairs, _ = mine(tmp_path, engine, rows, weighting=False)
    assert scores(pairs) == {("A", "B"): 1.0}
    # A shorter window drops the 7-day pair too: no pair at all is refused, and nothing is written.
    with pytest.raises(MiningError, match="no related pair mined from 4 view events"):
        mine(tmp_path, engine, rows, name="short", weighting=False, window_days=6.5)
    assert not (tmp_path / "short_out").exists()


def test_order_matters_unless_symmetric(tmp_path, engine):
    rows = [("u1", "A", 0), ("u1", "B", 10),
            ("u2", "B", 0), ("u2", "A", 10),
            ("u3", "A", 0), ("u3", "B", 10)]
    pairs, _ = mine(tmp_path, engine, rows, weighting=False)
    assert scores(pairs) == {("A", "B"): 2.0, ("B", "A"): 1.0}
    only_ab = [("u1", "A", 0), ("u1", "B", 10)]
    pairs, _ = mine(tmp_path, engine, only_ab, name="one", weighting=False)
    assert scores(pairs) == {("A", "B"): 1.0}  # B before A never adds to (B, A)
    pairs, _ = mine(tmp_path, engine, rows, name="sym", weighting=False, symmetric=True)
    assert scores(pairs) == {("A", "B"): 3.0, ("B", "A"): 3.0}
    pairs, _ = mine(tmp_path, engine, only_ab, name="sym1", weighting=False, symmetric=True)
    assert scores(pairs) == {("A", "B"): 1.0, ("B", "A"): 1.0}


def test_self_views_ignored_and_only_first_view_counts(tmp_path, engine):
    # u1 re-views A and B; only A@0 and B@20 count, so no (A, A) and no (B, A); N_u1 = 2.
    rows = [("u1", "A", 0), ("u1", "A", 10), ("u1", "B", 20), ("u1", "A", 30), ("u1", "B", 40),
            ("u2", "C", 0), ("u2", "C", 5), ("u2", "C", 9),  # only self-views: nothing
            ("u3", "D", 0), ("u3", "D", 0)]                  # an exact duplicate event
    pairs, summary = mine(tmp_path, engine, rows)
    assert scores(pairs) == {("A", "B"): pytest.approx(0.5, abs=1e-11)}
    assert summary["counts"]["events"] == 10
    assert summary["counts"]["first_views"] == 4  # (u1,A) (u1,B) (u2,C) (u3,D)
    # Unweighted: the repeated A->B inside u1 still adds only 1.
    pairs, _ = mine(tmp_path, engine, rows, name="unw", weighting=False)
    assert scores(pairs) == {("A", "B"): 1.0}


def test_equal_timestamps_are_ordered_by_note_id(tmp_path, engine):
    rows = [("u1", "B", 5), ("u1", "A", 5)]
    pairs, _ = mine(tmp_path, engine, rows, weighting=False)
    assert scores(pairs) == {("A", "B"): 1.0}


def test_top_k_ties_broken_by_partner_id(tmp_path, engine):
    # Query q has partners n9, n10, n2 (one user each) and n5 (two users).
    rows = []
    for i, partner in enumerate(["n9", "n10", "n2", "n5"]):
        rows += [(f"u{i}", "q", 0), (f"u{i}", partner, 10)]
    rows += [("u9", "q", 0), ("u9", "n5", 10)]
    pairs, _ = mine(tmp_path, engine, rows, weighting=False, top_k=3)
    q = pairs[pairs.query_id == "q"]
    # Highest score first; the tie (1.0) is broken by partner id ascending ("n10" < "n2" < "n9").
    assert list(q.target_id) == ["n5", "n10", "n2"]
    assert list(q.score) == [2.0, 1.0, 1.0]


def test_thresholds_are_inclusive(tmp_path, engine):
    rows = []
    for partner, n_users in (("b", 1), ("c", 2), ("d", 3)):
        rows += [(f"{partner}{j}", "a", 0) for j in range(n_users)]
        rows += [(f"{partner}{j}", partner, 10) for j in range(n_users)]
    pairs, _ = mine(tmp_path, engine, rows, weighting=False, min_score=2, max_score=3)
    assert scores(pairs) == {("a", "c"): 2.0, ("a", "d"): 3.0}
    pairs, _ = mine(tmp_path, engine, rows, name="eq", weighting=False, min_score=2, max_score=2)
    assert scores(pairs) == {("a", "c"): 2.0}
    # Thresholds apply before top-k: with top_k=1 and max 2, 'c' is the best surviving partner.
    pairs, _ = mine(tmp_path, engine, rows, name="k1", weighting=False, max_score=2, top_k=1)
    assert scores(pairs) == {("a", "c"): 2.0}


def test_cap_pairs_each_view_with_the_next_m_views(tmp_path, engine):
    rows = [("u1", f"x{i:02d}", i * 60) for i in range(10)]
    pairs, summary = mine(tmp_path, engine, rows, weighting=False, max_views_per_user=3, top_k=10)
    expected = {(f"x{i:02d}", f"x{j:02d}") for i in range(10) for j in range(i + 1, min(10, i + 4))}
    assert set(scores(pairs)) == expected
    assert summary["counts"]["co_occurrences"] == len(expected) == 7 * 3 + 2 + 1


@pytest.mark.timeout(400)  # Spark on a loaded 2-core box took 100 s
def test_bot_with_100k_views_is_bounded(tmp_path, engine):
    n, m = 100_000, 5
    rows = [("bot", f"n{i:06d}", i) for i in range(n)]           # 100k distinct notes in ~28 hours
    rows += [("bot", f"n{i:06d}", n + i) for i in range(0, n, 7)]  # plus re-views (ignored)
    rows += [("u1", "n000000", 0), ("u1", "n000001", 5)]
    t0 = time.perf_counter()
    pairs, summary = mine(tmp_path, engine, rows, max_views_per_user=m, top_k=10, memory_limit="1GB")
    elapsed = time.perf_counter() - t0
    c = summary["counts"]
    # The bot yields sum_i min(m, n-1-i) = n*m - m(m+1)/2 co-occurrences, u1 one more.
    assert c["co_occurrences"] == n * m - m * (m + 1) // 2 + 1
    assert c["first_views"] == n + 2
    assert len(pairs) == c["scored_pairs"] == n * m - m * (m + 1) // 2
    assert pairs.groupby("query_id").size().max() == m
    # u1 (N=2) dominates the bot (N=100000) on (n000000, n000001).
    assert scores(pairs)[("n000000", "n000001")] == pytest.approx(0.5 + 1 / n, abs=1e-9)
    print(f"100k-view bot mined in {elapsed:.1f} s")


def _split_log():
    # Notes n00..n19 first seen at increasing times; each user views two consecutive notes.
    rows = []
    for i in range(19):
        rows += [(f"u{i}", f"n{i:02d}", i * 3600), (f"u{i}", f"n{i + 1:02d}", i * 3600 + 60)]
        rows += [(f"v{i}", f"n{i + 1:02d}", i * 3600 + 100), (f"v{i}", f"n{i:02d}", i * 3600 + 200)]
    return rows


def test_time_split_holds_out_latest_notes(tmp_path, engine):
    pairs, summary = mine(tmp_path, engine, _split_log(), weighting=False, split_by="time",
                          val_fraction=0.1, test_fraction=0.2)
    assert summary["counts"]["notes_by_split"] == {"train": 14, "val": 2, "test": 4}
    test_notes = {f"n{i:02d}" for i in range(16, 20)}
    val_notes = {"n14", "n15"}
    for q, t, split in zip(pairs.query_id, pairs.target_id, pairs.split):
        expect = ("test" if {q, t} & test_notes else "val" if {q, t} & val_notes else "train")
        assert split == expect, (q, t, split)
    train = pairs[pairs.split == "train"]
    assert not (set(train.query_id) | set(train.target_id)) & (test_notes | val_notes)
    assert summary["counts"]["pairs_by_split"] == pairs.split.value_counts().reindex(
        ["train", "val", "test"], fill_value=0).to_dict()
    # The boundary pair (n15 -> n16) holds a val and a test note: it is a test pair.
    assert pairs[(pairs.query_id == "n15") & (pairs.target_id == "n16")].split.item() == "test"


def test_hash_split_is_stable_per_note_and_seeded(tmp_path, engine):
    from notellm2.data_shards.mining.mine import hash_split_of

    rows = _split_log()
    settings = dict(weighting=False, split_by="hash", val_fraction=0.2, test_fraction=0.3)
    pairs, _ = mine(tmp_path, engine, rows, **settings)
    # Each note's split depends only on its id and the seed: a different log agrees on it.
    pairs2, _ = mine(tmp_path, engine, rows[:20], name="other", **settings)
    s = MiningSettings(**settings, seed=0)
    for df in (pairs, pairs2):
        for q, t, split in zip(df.query_id, df.target_id, df.split):
            labels = {hash_split_of(q, s), hash_split_of(t, s)}
            assert split == ("test" if "test" in labels else "val" if "val" in labels else "train")
        train = df[df.split == "train"]
        assert all(hash_split_of(x, s) == "train" for x in set(train.query_id) | set(train.target_id))
    ids = [f"note-{i}" for i in range(2000)]
    by_seed = [[hash_split_of(x, MiningSettings(**settings, seed=seed)) for x in ids] for seed in (0, 1)]
    assert by_seed[0] != by_seed[1]
    assert 0.25 < by_seed[0].count("test") / len(ids) < 0.35


def test_csv_with_datetimes_matches_parquet_with_unix_seconds(tmp_path, engine):
    rows = [("u1", "A", 0), ("u1", "B", 3 * DAY), ("u1", "C", 9 * DAY), ("u2", "B", 10), ("u2", "C", 20)]
    pairs, _ = mine(tmp_path, engine, rows)
    df = pd.DataFrame(rows, columns=["user_id", "note_id", "timestamp"])
    df["timestamp"] = pd.to_datetime(df["timestamp"] + T0, unit="s").dt.strftime("%Y-%m-%d %H:%M:%S")
    df.to_csv(tmp_path / "views.csv", index=False)
    run_mining(engine, tmp_path / "views.csv", tmp_path / "csv_out",
               MiningSettings(val_fraction=0.0, test_fraction=0.0, memory_limit="512MB"))
    from_csv = pd.read_parquet(tmp_path / "csv_out" / "pairs.parquet")
    pd.testing.assert_frame_equal(pairs, from_csv)
    assert scores(pairs)[("B", "C")] == pytest.approx(1 / 3 + 1 / 2, abs=1e-11)  # u1: 6 days apart; u2 too
    assert ("A", "C") not in scores(pairs)  # 9 days apart


def test_outputs_and_manifest(tmp_path, engine):
    rows = _split_log()
    pairs, summary = mine(tmp_path, engine, rows, test_fraction=0.2)
    out = tmp_path / "run_out"
    assert sorted(os.listdir(out)) == ["mining_manifest.json", "note_split.parquet", "pairs.parquet"]  # no temp leftovers
    manifest = json.loads((out / "mining_manifest.json").read_text())
    assert manifest == json.loads(json.dumps(summary))
    import hashlib
    assert manifest["outputs"]["pairs.parquet"]["sha256"] == hashlib.sha256(
        (out / "pairs.parquet").read_bytes()).hexdigest()
    assert manifest["inputs"][0]["sha256"] == hashlib.sha256((tmp_path / "run.parquet").read_bytes()).hexdigest()
    assert manifest["settings"]["window_days"] == 7.0 and manifest["settings"]["split_by"] == "time"
    assert manifest["counts"]["pairs"] == len(pairs)
    assert set(manifest["timings_s"]) >= {"read", "co-occurrence", "rank", "write"}
    # Re-running on the same input gives byte-identical pairs.
    again = tmp_path / "again"
    run_mining(engine, tmp_path / "run.parquet", again, MiningSettings(val_fraction=0.0, test_fraction=0.2))
    assert (again / "pairs.parquet").read_bytes() == (out / "pairs.parquet").read_bytes()


def test_bad_inputs_name_the_file_and_the_problem(tmp_path, engine):
    bad = tmp_path / "nouser.parquet"
    pd.DataFrame({"uid": ["u"], "note_id": ["a"], "timestamp": [1]}).to_parquet(bad)
    with pytest.raises(MiningError, match=r"nouser\.parquet.*missing column.*user_id"):
        run_mining(engine, bad, tmp_path / "o1")
    csv = tmp_path / "badtime.csv"
    csv.write_text("user_id,note_id,timestamp\nu1,a,2024-01-01 10:00:00\nu1,b,not-a-date\n")
    with pytest.raises(MiningError, match=r"badtime\.csv.*timestamp='not-a-date'"):
        run_mining(engine, csv, tmp_path / "o2")
    nulls = tmp_path / "nulls.parquet"
    pd.DataFrame({"user_id": ["u", None], "note_id": ["a", "b"], "timestamp": [1, 2]}).to_parquet(nulls)
    with pytest.raises(MiningError, match=r"nulls\.parquet: 1 view event"):
        run_mining(engine, nulls, tmp_path / "o3")
    with pytest.raises(MiningError, match=r"views\.json.*unknown view-log format"):
        (tmp_path / "views.json").write_text("{}")
        run_mining(engine, tmp_path / "views.json", tmp_path / "o4")
    with pytest.raises(MiningError, match=r"missing\.parquet: view log not found"):
        run_mining(engine, tmp_path / "missing.parquet", tmp_path / "o5")
    with pytest.raises(MiningError, match=r"'top_k' = 0"):
        run_mining(engine, nulls, tmp_path / "o6", MiningSettings(top_k=0))
    with pytest.raises(MiningError, match=r"'test_fraction'"):
        run_mining(engine, nulls, tmp_path / "o7", MiningSettings(val_fraction=0.5, test_fraction=0.5))


def test_folder_of_parquet_parts_equals_one_file(tmp_path, engine):
    rows = _split_log()
    pairs, _ = mine(tmp_path, engine, rows, test_fraction=0.2)
    parts = tmp_path / "parts"
    parts.mkdir()
    write_views(parts / "part-0.parquet", rows[:30])
    write_views(parts / "part-1.parquet", rows[30:])
    (parts / "_SUCCESS").write_text("")
    summary = run_mining(engine, parts, tmp_path / "parts_out", MiningSettings(val_fraction=0.0, test_fraction=0.2))
    assert len(summary["inputs"]) == 2
    pd.testing.assert_frame_equal(pairs, pd.read_parquet(tmp_path / "parts_out" / "pairs.parquet"))


# Whole days after a UTC midnight, so that a DATE column carries the same instants.
T_MIDNIGHT = 1_699_920_000
_TYPED_ROWS = [("u1", "A", 0), ("u1", "B", 2), ("u1", "C", 9), ("u2", "B", 0), ("u2", "C", 3),
               ("u2", "A", 3), ("u3", "C", 1), ("u3", "A", 8), ("u3", "D", 8), ("u4", "D", 20)]


def _typed_log(path, kind):
    """The same events with `timestamp` stored as `kind` (each type the readers accept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    secs = [T_MIDNIGHT + d * DAY for _, _, d in _TYPED_ROWS]
    users = [u for u, _, _ in _TYPED_ROWS]
    notes = [n for _, n, _ in _TYPED_ROWS]
    if kind.startswith("csv"):
        text = {"csv-seconds": [str(x) for x in secs],
                "csv-datetime": [pd.Timestamp(x, unit="s").strftime("%Y-%m-%d %H:%M:%S") for x in secs],
                "csv-iso-utc": [pd.Timestamp(x, unit="s").strftime("%Y-%m-%dT%H:%M:%SZ") for x in secs]}[kind]
        pd.DataFrame({"user_id": users, "note_id": notes, "timestamp": text}).to_csv(path, index=False)
        return path
    col = {
        "int64": pa.array(secs, pa.int64()),
        "int32": pa.array(secs, pa.int32()),
        "float64": pa.array([x + 0.75 for x in secs], pa.float64()),  # fractions are floored
        "timestamp-us": pa.array([x * 1_000_000 for x in secs], pa.timestamp("us")),
        "timestamp-us-utc": pa.array([x * 1_000_000 for x in secs], pa.timestamp("us", tz="UTC")),
        "timestamp-ms-berlin": pa.array([x * 1000 for x in secs], pa.timestamp("ms", tz="Europe/Berlin")),
        "date": pa.array([(x - 0) // DAY for x in secs], pa.date32()),
        "string-seconds": pa.array([str(x) for x in secs], pa.string()),
        "string-datetime": pa.array([pd.Timestamp(x, unit="s").strftime("%Y-%m-%d %H:%M:%S") for x in secs]),
    }[kind]
    pq.write_table(pa.table({"user_id": users, "note_id": notes, "timestamp": col}), path)
    return path


@pytest.mark.parametrize("kind", ["int32", "float64", "timestamp-us", "timestamp-us-utc", "timestamp-ms-berlin",
                                  "date", "string-seconds", "string-datetime", "csv-seconds", "csv-datetime",
                                  "csv-iso-utc"])
def test_each_timestamp_type_gives_the_same_pairs(tmp_path, engine, kind):
    settings = dict(window_days=7.0, val_fraction=0.0, test_fraction=0.25, weighting=False)
    base = run_mining(engine, _typed_log(str(tmp_path / "int64.parquet"), "int64"), tmp_path / "base",
                      MiningSettings(**settings))
    ext = ".csv" if kind.startswith("csv") else ".parquet"
    got = run_mining(engine, _typed_log(str(tmp_path / f"{kind}{ext}"), kind), tmp_path / "got",
                     MiningSettings(**settings))
    expect = pd.read_parquet(tmp_path / "base" / "pairs.parquet")
    # u1: A-B, B-C (exactly 7 days), not A-C (9 days); u2: B-A, B-C, A-C (A before C: same day, id
    # order); u3: C-A, C-D (7 days), A-D.
    assert scores(expect) == {("A", "B"): 1.0, ("B", "C"): 2.0, ("B", "A"): 1.0, ("A", "C"): 1.0,
                              ("C", "A"): 1.0, ("C", "D"): 1.0, ("A", "D"): 1.0}
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "got" / "pairs.parquet"), expect)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "got" / "note_split.parquet"),
                                  pd.read_parquet(tmp_path / "base" / "note_split.parquet"))
    assert got["counts"] == base["counts"]


def test_note_split_file_and_the_two_pair_split_modes(tmp_path, engine):
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs

    rows = _split_log() + [("lonely", "n99", 50 * 3600)]  # a note in no pair, seen last: a test note
    settings = dict(weighting=False, split_by="time", val_fraction=0.1, test_fraction=0.2)
    either, s_either = mine(tmp_path, engine, rows, name="either", **settings)
    both, s_both = mine(tmp_path, engine, rows, name="both", pair_split="both", **settings)
    note_split = read_note_split(tmp_path / "both_out")
    # Every note of the log, once, in note_id order; the same file in both modes.
    assert list(note_split.note_id) == sorted({n for _, n, _ in rows})
    pd.testing.assert_frame_equal(note_split, read_note_split(tmp_path / "either_out"))
    assert note_split.split.value_counts().to_dict() == {k: v for k, v in s_both["counts"]["notes_by_split"].items() if v}
    assert note_split.set_index("note_id").split["n99"] == "test"
    split_of = dict(zip(note_split.note_id, note_split.split))
    # both: a pair is kept only when its two notes share a split; the others are dropped and counted.
    assert all(split_of[q] == split_of[t] == s for q, t, s in zip(both.query_id, both.target_id, both.split))
    crossing = [(q, t) for q, t in zip(either.query_id, either.target_id) if split_of[q] != split_of[t]]
    assert len(crossing) > 0 and s_both["counts"]["pairs_dropped_cross_split"] == len(crossing)
    assert s_either["counts"]["pairs_dropped_cross_split"] == 0
    assert len(both) == len(either) - len(crossing) == s_both["counts"]["pairs"]
    # The train pairs are the same in both modes (either mode never puts a held-out note in train).
    pd.testing.assert_frame_equal(both[both.split == "train"].reset_index(drop=True),
                                  either[either.split == "train"].reset_index(drop=True))
    assert len(read_pairs(tmp_path / "both_out", split="test")) == s_both["counts"]["pairs_by_split"]["test"] > 0
