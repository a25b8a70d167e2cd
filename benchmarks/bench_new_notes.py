"""The daily update of the related-notes table against a full rebuild, measured in the same run.

A pool of --pool clustered unit vectors (--dim; 0.5 % of them re-posts of another note: same vector,
same content hash) is day 1. Day 2 deletes --deleted notes, changes --changed (a new vector and
content hash) and adds --new (the set `notellm2 embed --base` would write: every other vector
unchanged, bit for bit). Each stage runs the real command in its own process (`python -m
notellm2.launcher ...`, or torchrun for the rank stage), so its CPU seconds (all threads and ranks,
os.wait4) and its peak resident memory (the largest VmHWM among its processes, polled every 50 ms)
are its own:

- build:    `index build` on day 1 (exact), the base of the update;
- update:   `index update` to day 2 (exact), one process;
- rebuild:  `index build` on day 2 (exact), from scratch;
- faiss:    (--faiss faiss-ivf|faiss-ivfpq) the same three stages with that backend; the updated and the
            rebuilt faiss tables' overlap with the exact rebuilt table;
- ranks:    the update again under torchrun on 1 and on 2 ranks (wall and CPU seconds, identical files);
- start-up: a process that only imports what the stages import: the fixed cost every stage pays, so
            that a small pool's ratio can also be read net of it.

Agreement: the updated exact table must equal the rebuilt one on every note's first k entries (ids
and scores). Time: CPU seconds are compared (this box's 2 cores are shared with other jobs, so wall
time measures the neighbours as much as the code); wall seconds are printed beside. Target: the
update costs at most 1/--target-ratio of the rebuild (default 20), with identical exact results.
Memory: the update's peak resident memory against the size of the index it maintains
(vectors.npy for exact, faiss.index for faiss). Ends with one line: RESULT {json}.

    python benchmarks/bench_new_notes.py                    # 1M x 64-d, 10k new, 1k changed, 1k deleted
    python benchmarks/bench_new_notes.py --pool 20000 --new 200 --changed 20 --deleted 20   # the tiny test's size
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from notellm2.launcher.eval.evaluate import save_embeddings  # noqa: E402
from notellm2.launcher.eval.provenance import write_content_hashes  # noqa: E402

FINGERPRINT = "bench-new-notes:synthetic-vectors"


def clustered(rng, n: int, centres: np.ndarray, spread: float = 0.35) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_set(folder: str, ids, vectors, hashes) -> str:
    meta = {"mode": "both", "fingerprint": FINGERPRINT, **write_content_hashes(folder, hashes)}
    save_embeddings(folder, list(ids), vectors, meta)
    return folder


def make_days(work: str, args) -> tuple[str, str]:
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((max(1, args.pool // 1000), args.dim))
    vec = clustered(rng, args.pool, centres)
    hashes = rng.integers(0, 256, (args.pool, 16), dtype=np.uint8)
    reposts = rng.choice(args.pool, args.pool // 200 * 2, replace=False).reshape(-1, 2)
    vec[reposts[:, 1]], hashes[reposts[:, 1]] = vec[reposts[:, 0]], hashes[reposts[:, 0]]
    ids = np.array([f"note{i:09d}" for i in rng.permutation(args.pool)])
    day1 = write_set(os.path.join(work, "day1"), ids, vec, hashes)
    gone = rng.choice(args.pool, args.deleted + args.changed, replace=False)
    keep = np.ones(args.pool, bool)
    keep[gone[:args.deleted]] = False
    changed = gone[args.deleted:]
    vec[changed] = clustered(rng, len(changed), centres)
    hashes[changed] = rng.integers(0, 256, (len(changed), 16), dtype=np.uint8)
    new_ids = [f"new{i:09d}" for i in range(args.new)]
    day2 = write_set(os.path.join(work, "day2"), list(ids[keep]) + new_ids,
                     np.concatenate([vec[keep], clustered(rng, args.new, centres)]),
                     np.concatenate([hashes[keep], rng.integers(0, 256, (args.new, 16), dtype=np.uint8)]))
    return day1, day2


def _hwm(pid: int) -> int:
    """The high-water mark of a process's resident memory (VmHWM, bytes), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _watch_hwm(pid: int, peaks: dict, stop: threading.Event, every: float = 0.05) -> None:
    """Poll the VmHWM of `pid` and its descendants (a rank each under torchrun) until `stop`. The
    rusage of a forked child would not do: Linux carries the parent's resident peak across fork and
    exec into the child's ru_maxrss, and this parent holds the two embedding sets."""
    import psutil

    while not stop.is_set():
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            peaks[p.pid] = max(peaks.get(p.pid, 0), _hwm(p.pid))
        stop.wait(every)


def run_stage(name: str, argv: list[str], nproc: int = 0, log=print, cmd: list[str] | None = None) -> dict:
    """Run a notellm2 command in its own process (nproc 0) or under torchrun (or `cmd` as it is); CPU
    seconds and peak RSS of it and its ranks (os.wait4 counts the reaped descendants)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if cmd is not None:
        pass
    elif nproc:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), "-m", "notellm2.launcher", *argv]
    else:
        cmd = [sys.executable, "-m", "notellm2.launcher", *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peaks: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_hwm, args=(proc.pid, peaks, stop), daemon=True)
    watcher.start()
    out = proc.stdout.read()
    stop.set()
    watcher.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}")
    stage = {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "wall_s": round(wall, 2),
             "peak_rss_mb": round(max(peaks.values(), default=0) / 2 ** 20, 1)}
    log(f"{name:>16}: {stage['cpu_s']:9.2f} CPU s ({stage['wall_s']:9.2f} s wall), peak RSS {stage['peak_rss_mb']:8.1f} MB"
        f"   {out.strip().splitlines()[-1] if out.strip() else ''}")
    return stage


def lists(folder: str, k: int, row_of: dict) -> tuple[np.ndarray, np.ndarray]:
    """Each note's first k neighbours as rows of a reference order (`row_of`: note id -> row), with scores,
    rows sorted by the note's reference row."""
    ids = open(os.path.join(folder, "ids.txt")).read().split("\n")[:-1]
    labels = np.load(os.path.join(folder, "labels.npy"))
    ref = np.fromiter((row_of[n] for n in ids), np.int64, len(ids))
    nbr = np.load(os.path.join(folder, "neighbors.npy"))[:, :k]
    scores = np.load(os.path.join(folder, "scores.npy"))[:, :k]
    as_ref = np.where(nbr >= 0, ref[np.searchsorted(labels, np.maximum(nbr, 0))], -1)
    order = np.argsort(ref)
    return as_ref[order], scores[order]


def overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each exact list that the approximate list holds (vectorised over rows)."""
    hit = (approx[:, :, None] == exact[:, None, :]) & (exact[:, None, :] >= 0)
    return float(hit.any(1).sum() / max(1, (exact >= 0).sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--new", type=int, default=10_000)
    ap.add_argument("--changed", type=int, default=1_000)
    ap.add_argument("--deleted", type=int, default=1_000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--reserve", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--faiss", default="faiss-ivf", choices=["none", "faiss-ivf", "faiss-ivfpq"])
    ap.add_argument("--ranks", default="1,2", help="world sizes of the rank stage (empty: skip it)")
    ap.add_argument("--target-ratio", type=float, default=20.0, help="the rebuild's cost over the update's, at least")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None, help="folder for the sets and indexes (default: a temporary one, removed)")
    args = ap.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="bench-new-notes-")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    day1, day2 = make_days(work, args)
    print(f"pool {args.pool} x {args.dim}: day 2 = {args.new} new, {args.changed} changed, {args.deleted} deleted; "
          f"k {args.k} + reserve {args.reserve}; sets written in {time.perf_counter() - t0:.1f} s -> {work}", flush=True)
    opts = ["--k", str(args.k), "--reserve", str(args.reserve), "--chunk", str(args.chunk)]

    def idx(name):
        return os.path.join(work, name)

    # what every stage pays before it reads a file: the interpreter and the imports (torch, numpy, pyarrow)
    startup = run_stage("start-up", [], cmd=[sys.executable, "-c", "import notellm2.launcher.cli, "
                                                                    "notellm2.launcher.eval.index, pyarrow.parquet"])
    stages = {"build": run_stage("build", ["index", "build", "--embeddings", day1, "--out", idx("v1"), *opts]),
              "update": run_stage("update", ["index", "update", "--index", idx("v1"), "--embeddings", day2, "--out",
                                             idx("v2"), "--chunk", str(args.chunk)]),
              "rebuild": run_stage("rebuild", ["index", "build", "--embeddings", day2, "--out", idx("r2"), *opts])}
    ids2 = open(os.path.join(day2, "ids.txt")).read().split("\n")[:-1]
    row_of = {n: i for i, n in enumerate(ids2)}
    up_rows, up_scores = lists(idx("v2"), args.k, row_of)
    re_rows, re_scores = lists(idx("r2"), args.k, row_of)
    identical = bool(np.array_equal(up_rows, re_rows) and np.array_equal(up_scores, re_scores))
    differing = int((up_rows != re_rows).any(1).sum())
    manifest = json.load(open(os.path.join(idx("v2"), "manifest.json")))
    index_mb = manifest["index_bytes"] / 2 ** 20
    ratio = stages["update"]["cpu_s"] / stages["rebuild"]["cpu_s"]
    net = max(0.0, stages["update"]["cpu_s"] - startup["cpu_s"]) / max(1e-9, stages["rebuild"]["cpu_s"] - startup["cpu_s"])
    print(f"exact: update / rebuild = {ratio:.4f} CPU ({stages['update']['wall_s'] / stages['rebuild']['wall_s']:.4f} "
          f"wall; {net:.4f} net of the {startup['cpu_s']:.2f} CPU s start-up both pay), target <= "
          f"{1 / args.target_ratio:.4f}; tables identical: {identical} ({differing} notes differ); "
          f"counts {manifest['counts']}", flush=True)
    result = {"name": "new_notes", "pool": args.pool, "dim": args.dim, "new": args.new, "changed": args.changed,
              "deleted": args.deleted, "k": args.k, "reserve": args.reserve, "stages": stages,
              "startup": startup, "ratio": round(ratio, 5), "ratio_net_of_startup": round(net, 5),
              "target": round(1 / args.target_ratio, 5), "identical": identical,
              "notes_differing": differing, "counts": manifest["counts"],
              "index_mb": round(index_mb, 1), "index_bytes_per_note": round(manifest["index_bytes"] / len(ids2), 1),
              "update_peak_over_index": round(stages["update"]["peak_rss_mb"] / index_mb, 2)}
    result["meets_target"] = bool(identical and ratio <= result["target"])

    if args.faiss != "none":
        fopts = [*opts, "--backend", args.faiss]
        f = {"build": run_stage(f"{args.faiss} build", ["index", "build", "--embeddings", day1, "--out", idx("f1"), *fopts]),
             "update": run_stage(f"{args.faiss} update", ["index", "update", "--index", idx("f1"), "--embeddings", day2,
                                                           "--out", idx("f2"), "--chunk", str(args.chunk)]),
             "rebuild": run_stage(f"{args.faiss} rebuild", ["index", "build", "--embeddings", day2, "--out", idx("fr2"),
                                                             *fopts])}
        fm = json.load(open(os.path.join(idx("f2"), "manifest.json")))
        f_up, _ = lists(idx("f2"), args.k, row_of)
        f_re, _ = lists(idx("fr2"), args.k, row_of)
        f.update(backend=args.faiss, ratio=round(f["update"]["cpu_s"] / f["rebuild"]["cpu_s"], 5),
                 overlap_updated_vs_exact=round(overlap(f_up, re_rows), 4),
                 overlap_rebuilt_vs_exact=round(overlap(f_re, re_rows), 4),
                 index_mb=round(fm["index_bytes"] / 2 ** 20, 2),
                 index_bytes_per_note=round(fm["index_bytes"] / len(ids2), 1))
        f["update_peak_over_index"] = round(f["update"]["peak_rss_mb"] / f["index_mb"], 2)
        print(f"{args.faiss}: update / rebuild = {f['ratio']:.4f} CPU; overlap with the exact table: updated "
              f"{f['overlap_updated_vs_exact']:.4f}, rebuilt {f['overlap_rebuilt_vs_exact']:.4f}", flush=True)
        result["faiss"] = f

    ranks = {}
    for n in [int(x) for x in args.ranks.split(",") if x.strip()]:
        out = idx(f"ranks{n}")
        ranks[str(n)] = run_stage(f"update {n} rank{'s' * (n > 1)}", ["index", "update", "--index", idx("v1"),
                                                                      "--embeddings", day2, "--out", out,
                                                                      "--chunk", str(args.chunk)], nproc=n)
        ranks[str(n)]["identical_to_one_process"] = all(
            open(os.path.join(out, name), "rb").read() == open(os.path.join(idx("v2"), name), "rb").read()
            for name in ("related.parquet", "neighbors.npy", "scores.npy"))
    if ranks:
        result["ranks"] = ranks
        if "1" in ranks and "2" in ranks:
            result["ranks_wall_2_over_1"] = round(ranks["2"]["wall_s"] / ranks["1"]["wall_s"], 3)
            print(f"update on 2 ranks / 1 rank: {result['ranks_wall_2_over_1']:.3f} wall "
                  f"(2 cores shared with other jobs: overhead, not speed-up, is what this measures)", flush=True)
    if not args.work:
        shutil.rmtree(work)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
