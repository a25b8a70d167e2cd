"""PairLoader throughput (pairs/s) for R ranks x W workers against the raw decode bound of the same run.

Bound: the same shards' JPEGs decoded and resized (shorter side 224, bicubic) + centre-cropped
with PIL by R*W plain processes, each taking its share of the shards; pairs/s = images/s / 2.
Loader: R processes (one per rank, no collectives needed: the reader never communicates), each
iterating one epoch of `PairLoader(rank=r, world_size=R)` with `num_workers=W`, from a common
start barrier to the last rank's end; pairs/s = pairs yielded / wall time. As in `notellm2 train`,
the loader leaves the pixels uint8 and the CLIP mean/std is applied on the training device after the
copy (`--normalize-in-loader` measures it applied in the rank process instead; `--no-pixel-slots`
moves the pixels through fresh shared memory per batch instead of the reused slots). Each side is
measured `--repeats` times, alternating, and the best time of each is used (the ratio of each loader
run to the raw run just before it is printed too: on a noisy machine they scatter by +-0.1).

    .venv/bin/python benchmarks/bench_loader.py                      # 2000 pairs of 256 px JPEGs
    .venv/bin/python benchmarks/bench_loader.py --shards 'dir/pairs-train-{000000..000007}.tar'

Ends with one line `RESULT {json}`; target: ratio >= 0.8.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import statistics
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from notellm2.data_shards.images import center_crop, resize_shorter_side  # noqa: E402
# the tests' char-level stand-in for the prompter: text encoding costs next to nothing here
from tests.helpers.shards import CharCollate, CharEncoder  # noqa: E402


# ----------------------------------------------------------------------------- synthetic shards

def _photo_like(rng: np.random.Generator, size: int) -> bytes:
    """A smooth gradient with blobs and mild noise: JPEG sizes close to real photos at this size."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x * rng.uniform(80, 255), y * rng.uniform(80, 255), (1 - x) * rng.uniform(80, 255)], -1)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r * r
        base[mask] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 8, base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(out_dir: str, n_pairs: int, image_px: int, n_shards: int, seed: int = 0) -> str:
    import webdataset as wds

    rng = np.random.default_rng(seed)
    per = [n_pairs // n_shards + (1 if i < n_pairs % n_shards else 0) for i in range(n_shards)]
    entries, j = [], 0
    for s, count in enumerate(per):
        name = f"pairs-train-{s:06d}.tar"
        with wds.TarWriter(os.path.join(out_dir, name)) as tw:
            for _ in range(count):
                q, t = f"q{j}", f"t{j}"
                note = lambda nid: json.dumps({"note_id": nid, "title": f"title of {nid}", "content": "words " * 20,
                                               "topics": ["a", "b"], "category": "c"}).encode()
                tw.write({"__key__": f"{j:09d}", "q.json": note(q), "t.json": note(t),
                          "q.jpg": _photo_like(rng, image_px), "t.jpg": _photo_like(rng, image_px),
                          "pair.json": json.dumps({"query_id": q, "target_id": t, "score": 1.0}).encode()})
                j += 1
        entries.append({"name": name, "kind": "pairs", "split": "train", "count": count, "sha256": ""})
    with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
        json.dump({"shards": entries}, fh)
    return os.path.join(out_dir, f"pairs-train-{{000000..{n_shards - 1:06d}}}.tar")


# ----------------------------------------------------------------------------- the raw bound

def _raw_worker(paths, size, start, out):
    start.wait()
    n = 0
    for path in paths:
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                    center_crop(resize_shorter_side(img, size), size)
                    n += 1
    out.put(n)


def _collect(out, ps, what: str) -> list:
    """One result per process; a process that dies without one fails the benchmark instead of hanging it."""
    results = []
    while len(results) < len(ps):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:
            dead = [p for p in ps if p.exitcode not in (None, 0)]
            if dead:
                for p in ps:
                    p.kill()
                raise RuntimeError(f"{what} {dead[0].name} exited with code {dead[0].exitcode} "
                                   f"(its traceback is above)") from None
    return results


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure_raw(paths, procs: int, size: int) -> tuple[float, int]:
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_raw_worker, args=(paths[i::procs], size, start, out)) for i in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    images = sum(_collect(out, ps, "raw decode process"))
    elapsed = time.perf_counter() - t0
    for p in ps:
        p.join()
    return elapsed, images


# ----------------------------------------------------------------------------- the loader

def _rank_main(pattern, rank, world, workers, batch, size, normalize, slots, start, out):
    import torch

    from notellm2.data_shards.batch import to_device
    from notellm2.data_shards.config import DataConfig
    from notellm2.data_shards.reader import PairLoader

    torch.set_num_threads(1)
    loader = PairLoader(pattern, data_cfg=DataConfig(num_workers=workers, shuffle_buffer=100, pixel_slots=slots),
                        encode_fn=CharEncoder(max_len=96), collate_text_fn=CharCollate(), rank=rank, world_size=world,
                        pairs_per_rank=batch, image_size=size)
    start.wait()
    pairs = 0
    for b in loader:
        if normalize:  # the batch's to_device() on this process's CPU
            b = to_device(b, torch.device("cpu"))
        pairs += len(b["sample_keys"])
    out.put((rank, pairs, loader.batches_per_epoch, loader.pixel_transport))


def measure_loader(pattern, ranks: int, workers: int, batch: int, size: int,
                   normalize: bool = False, slots: bool = True) -> tuple[float, int, list]:
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(ranks + 1), ctx.Queue()
    ps = [ctx.Process(target=_rank_main, args=(pattern, r, ranks, workers, batch, size, normalize, slots, start, out), daemon=False)
          for r in range(ranks)]
    for p in ps:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    results = _collect(out, ps, "loader rank process")
    elapsed = time.perf_counter() - t0
    for p in ps:
        p.join()
    return elapsed, sum(r[1] for r in results), sorted(results)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", help="existing pair shards (pattern); default: generate synthetic ones")
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--image-px", type=int, default=256)
    ap.add_argument("--num-shards", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="pairs per rank per batch")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--normalize-in-loader", action="store_true",
                    help="normalise the pixels in the rank process (to_device on its CPU) instead of leaving them uint8 "
                         "for the device, as `notellm2 train` does")
    ap.add_argument("--no-pixel-slots", action="store_true",
                    help="data.pixel_slots: false (pixels through fresh shared memory per batch), to compare")
    args = ap.parse_args(argv)

    from notellm2.data_shards.reader import expand_shards

    tmp = None
    if args.shards:
        pattern = args.shards
    else:
        tmp = tempfile.mkdtemp(prefix="bench-loader-")
        t0 = time.perf_counter()
        pattern = make_shards(tmp, args.pairs, args.image_px, args.num_shards)
        print(f"generated {args.pairs} pairs of {args.image_px}px JPEGs in {args.num_shards} shards "
              f"({time.perf_counter() - t0:.1f}s)")
    try:
        paths = expand_shards(pattern)
        procs = args.ranks * args.workers
        raw_best, loader_best, raw_images, loader_pairs, per_rank, paired = None, None, 0, 0, [], []
        for rep in range(args.repeats):
            c0 = _children_cpu()
            t_raw, raw_images = measure_raw(paths, procs, args.size)
            c1 = _children_cpu()
            t_loader, loader_pairs, per_rank = measure_loader(pattern, args.ranks, args.workers, args.batch, args.size,
                                                            args.normalize_in_loader, not args.no_pixel_slots)
            c2 = _children_cpu()
            # CPU seconds (all processes, user + sys) tell how much of a wall-time gap is the machine's load
            print(f"repeat {rep}: raw {raw_images} images in {t_raw:.2f}s ({1e3 * (c1 - c0) / raw_images:.2f} "
                  f"CPU-ms/image); loader {loader_pairs} pairs in {t_loader:.2f}s "
                  f"({1e3 * (c2 - c1) / (2 * loader_pairs):.2f} CPU-ms/image, setup included)")
            paired.append((loader_pairs / t_loader) / (raw_images / 2 / t_raw))
            raw_best = t_raw if raw_best is None else min(raw_best, t_raw)
            loader_best = t_loader if loader_best is None else min(loader_best, t_loader)
        bound = raw_images / 2 / raw_best
        figure = loader_pairs / loader_best
        ratio = figure / bound
        batches = [r[2] for r in per_rank]
        print(f"raw bound: {procs} processes decode+resize+crop {raw_images} JPEGs: {bound:.1f} pairs/s")
        where = "in the loader" if args.normalize_in_loader else "on the device, as notellm2 train does"
        transport = {k: sum(r[3][k] for r in per_rank) for k in per_rank[0][3]}
        print(f"loader: {args.ranks} ranks x {args.workers} workers, {args.batch} pairs/rank/batch, CLIP mean/std {where}, "
              f"batches per rank {batches}, pixels moved {transport}: {figure:.1f} pairs/s")
        print(f"ratio loader/bound: {ratio:.3f} (target >= {args.target}); per repeat (each loader run against the "
              f"raw run just before it): {', '.join(f'{r:.3f}' for r in paired)}, median {statistics.median(paired):.3f}")
        result = {"name": "bench_loader", "figure": round(figure, 2), "bound_or_baseline": round(bound, 2),
                  "ratio": round(ratio, 4), "target": args.target, "pass": bool(ratio >= args.target),
                  "unit": "pairs/s", "ranks": args.ranks, "workers": args.workers, "pairs": loader_pairs,
                  "paired_ratios": [round(r, 4) for r in paired], "pixels_moved": transport}
        print("RESULT " + json.dumps(result))
        return result
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
