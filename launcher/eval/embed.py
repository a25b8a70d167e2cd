"""Embedding export: notes shards -> L2-normalised vectors, one process or several ranks.

Each rank embeds its share of the notes (`notellm2.data_shards.reader.NotesLoader` gives every note exactly
once across ranks) and writes it as parts, one every `--part-every` batches (see "parts" below); a
killed run resumes from the parts it finished. When every rank is done, rank 0 writes
`embeddings.npy` (float32, or float16 with `--dtype float16`), `ids.txt` and `embeddings.json` from
the parts (see `notellm2.launcher.eval.evaluate.save_embedding_chunks`). `--device cuda` embeds on the rank's GPU.

The probe `mode` is one definition with the model's own: the loader renders each note with
`prompter.encode(note, mode)` and the batch goes through `note_model.encode(..., mode=mode)`
(notellm2.modeling.names.PROBES). The image probe is only defined for a note with an image: a note without
one (or whose image could not be read) is left out of the output and counted in embeddings.json.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import shutil
import signal
import time
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from notellm2.data_shards.batch import to_device
from notellm2.data_shards.config import DataConfig
from notellm2.data_shards.reader import NotesLoader
from notellm2.launcher.eval.evaluate import EMBEDDING_DTYPES, save_embedding_chunks
from notellm2.errors import UserError
from notellm2.modeling.names import PROBE_MODES, probe_unavailable
from notellm2.files import atomic_write, atomic_write_json, sha256_file
from notellm2.outputs import check_folder_output, missing_top, recorded_request, reuse_finished


def probe_encode(prompter, mode: str, note: dict) -> dict:
    """The notes loader's encode_fn for probe `mode` (module level: DataLoader workers pickle it).

    A note without an image has no image probe: it gets its text prompt with `has_image` False, and
    `embed_notes` drops the row (every row of an image-probe prompt has `has_image` True)."""
    if mode == "image" and not note.get("has_image"):
        return prompter.encode(note, "text")
    return prompter.encode(note, mode)


def notes_loader(prompter, shards, data_cfg: DataConfig, batch_size: int, mode: str, rank: int, world_size: int,
                 image_size: int, max_notes: int | None = None, skip_batches: int = 0,
                 bad_sample_log: str | None = None) -> NotesLoader:
    """The notes loader of probe `mode` (checked against the prompter's variant); `bad_sample_log`: the
    file its bad notes are listed in (NotesLoader)."""
    if mode not in PROBE_MODES:
        raise ValueError(f"embed mode {mode!r}: allowed {', '.join(PROBE_MODES)}")
    why = probe_unavailable(prompter.variant, mode)
    if why:
        raise ValueError(f"embed --mode {mode}: {why}")
    return NotesLoader(shards, data_cfg, functools.partial(probe_encode, prompter, mode), prompter.collate,
                       rank=rank, world_size=world_size, batch_size=batch_size, image_size=image_size,
                       max_notes=max_notes, skip_batches=skip_batches, bad_sample_log=bad_sample_log)


@torch.no_grad()
def embedded_batches(note_model, vision_tower, loader: NotesLoader, mode: str, rank: int = 0,
                     progress: bool = True, image_features=None, visual_out: list | None = None):
    """(ids, float32 vectors, notes left out for want of an image) of each batch `loader` yields, in order.

    `image_features(cpu_batch, device_batch) -> (tokens, pooled)` replaces the tower call when given
    (the in-training evaluation's notellm2.launcher.train.validation.TowerMemo). `visual_out` (mode both, mICL
    variants): gets (ids, vectors) of the image probe read from the same forward
    (NoteModel.encode_with_visual), for the notes with an image."""
    note_model.eval()
    bar = tqdm(loader, total=loader.total_batches, initial=loader.skip_batches, desc=f"embed rank {rank}",
               disable=not progress or rank != 0, unit="batch")
    from notellm2.modeling.vision import encode_images  # the one tower call of training, validation and embedding

    device = next(note_model.parameters()).device  # under ZeRO-3 a partitioned parameter still sits on the rank's device
    for cpu_batch in bar:
        batch = to_device(cpu_batch, device)  # uint8 pixels -> CLIP-normalised there, as in training
        # has_image: the prompter's word that image features enter this row (an <IMG> slot or the gate).
        # The tower runs for every batch but the text probe's, even one without such a row: then the
        # model still calls its connector and gate (with zero effect), so that every rank calls the same
        # modules in the same order, which ZeRO-3's parameter gathers need (in-training evaluation).
        feeds = batch["has_image"]
        tokens = pooled = None
        if mode != "text":
            tokens, pooled = (image_features(cpu_batch, batch) if image_features is not None
                              else encode_images(vision_tower, batch))
        keep = ~batch["is_dummy"]
        if visual_out is not None:
            emb, vis = note_model.encode_with_visual(batch, tokens, pooled)
            emb, with_image = emb.float(), keep & feeds
            visual_out.append(([s for s, k in zip(batch["note_id_strs"], with_image.tolist()) if k],
                               vis.float()[with_image].cpu().numpy()))
        else:
            emb = note_model.encode(batch, tokens, pooled, mode=mode).float()
        no_image = 0
        if mode == "image":
            no_image = int((keep & ~feeds).sum())
            keep = keep & feeds
        ids = [s for s, k in zip(batch["note_id_strs"], keep.tolist()) if k]
        yield ids, emb[keep].cpu().numpy(), no_image


def embed_notes(note_model, vision_tower, prompter, shards, data_cfg: DataConfig, batch_size: int,
                mode: str = "both", rank: int = 0, world_size: int = 1, image_size: int = 224,
                progress: bool = True, skipped: dict | None = None,
                max_notes: int | None = None, image_features=None,
                visual_out: list | None = None) -> tuple[list[str], np.ndarray]:
    """This rank's (ids, vectors); dummy padding rows of the loader are dropped, and in the image probe
    the notes without an image (their count is added to `skipped["no_image"]` when given). Every rank
    runs the same number of batches through the same modules (in-training evaluation under ZeRO-3).
    `image_features`, `visual_out`: see embedded_batches."""
    loader = notes_loader(prompter, shards, data_cfg, batch_size, mode, rank, world_size, image_size, max_notes)
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    no_image = 0
    for batch_ids, vecs, left_out in embedded_batches(note_model, vision_tower, loader, mode, rank, progress,
                                                      image_features, visual_out):
        ids.extend(batch_ids)
        vectors.append(vecs)
        no_image += left_out
    if skipped is not None:
        skipped["no_image"] = skipped.get("no_image", 0) + no_image
    dim = vectors[0].shape[1] if vectors else 0
    return ids, (np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))


# ----------------------------------------------------------------------------- parts (resumable embedding)
#
# OUT/parts/rank{r:05d}-{k:05d}.npz holds rank r's batches k*N .. (k+1)*N - 1 (N = --part-every): the
# ids, the float32 vectors (before any --dtype cast), the count left out for want of an image. Each is
# written to a temporary name and moved into place, so a part that exists is whole. OUT/parts/manifest.json
# holds the fingerprint of the settings that decide the parts' contents; a rerun with other settings
# is refused (or, with --restart, the parts are discarded). A rerun with the same settings skips each
# rank's finished parts as whole batches: the remaining batches are composed exactly as in an unbroken
# run, so the vectors are bitwise the same. When every rank is done, rank 0 writes the final files
# from the parts in rank order, then part order (the order of one gather of every rank's share), and
# removes OUT/parts.

PARTS_DIR = "parts"
PARTS_MANIFEST = "manifest.json"
PARTS_FORMAT = 1
DEFAULT_PART_EVERY = 20
# Test-only hook (launcher/train/faults.py style): RANK:K makes that rank SIGKILL itself right after part K is in place.
DIE_AFTER_PART_ENV = "NOTELLM2_TEST_DIE_AFTER_PART"


def part_path(parts_dir: str, rank: int, k: int) -> str:
    return os.path.join(parts_dir, f"rank{rank:05d}-{k:05d}.npz")


def _write_json_atomic(path: str, data: dict) -> None:
    atomic_write_json(path, data, indent=2, sort_keys=True)


def write_part(path: str, ids: list[str], vectors: np.ndarray, no_image: int, batches: tuple[int, int],
               bad: dict | None = None) -> None:
    """One part, whole or not at all (a temporary file, fsync'ed, then os.replace). `bad`: the loader's
    counts of bad notes in these batches ({"blanked": {reason: n}, "unusable": {...}}), kept as JSON."""
    with atomic_write(path, "wb") as fh:  # a file object: np.savez keeps the name as given
        np.savez(fh, ids=np.array(ids, dtype=str), vectors=np.ascontiguousarray(vectors, np.float32),
                 no_image=np.int64(no_image), batches=np.array(batches, np.int64),
                 bad=np.array(json.dumps(bad or {}, sort_keys=True)))


def part_bad_counts(path: str) -> dict:
    """The bad-note counts a part recorded ({} for a part written before they were)."""
    with np.load(path, allow_pickle=False) as z:
        return json.loads(str(z["bad"])) if "bad" in z.files else {}


def _add_counts(into: dict, delta: dict) -> dict:
    for group, bucket in (delta or {}).items():
        dst = into.setdefault(group, {})
        for reason, n in bucket.items():
            dst[reason] = dst.get(reason, 0) + n
    return into


def _count_delta(now: dict, before: dict) -> dict:
    """The loader's bad-note counts (blanked, unusable) added since `before`."""
    out = {}
    for group in ("blanked", "unusable"):
        bucket = {r: n - (before.get(group) or {}).get(r, 0) for r, n in (now.get(group) or {}).items()}
        bucket = {r: n for r, n in bucket.items() if n}
        if bucket:
            out[group] = bucket
    return out


def read_part(path: str, batches: tuple[int, int] | None = None) -> tuple[list[str], np.ndarray, int]:
    """(ids, vectors, no_image) of one part; `batches` checks the range it claims to hold."""
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path}: not a readable embed part (not an .npz archive); "
                        "rerun with --restart to embed from the start")
    try:
        with np.load(path, allow_pickle=False) as z:
            ids, vectors = z["ids"].tolist(), z["vectors"]
            no_image, held = int(z["no_image"]), tuple(int(b) for b in z["batches"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable embed part ({type(e).__name__}: {e}); "
                        "rerun with --restart to embed from the start") from None
    if vectors.ndim != 2 or len(ids) != len(vectors):
        raise UserError(f"{path}: {len(ids)} ids but vectors of shape {vectors.shape}; rerun with --restart")
    if batches is not None and held != tuple(batches):
        raise UserError(f"{path}: holds batches {held[0]}..{held[1] - 1}, expected {batches[0]}..{batches[1] - 1}; "
                        "rerun with --restart")
    return ids, vectors, no_image


def parts_fingerprint(model_dir: str | None, cfg, shards: str, mode: str, world_size: int, batch_size: int,
                      part_every: int, data_cfg: DataConfig) -> dict:
    """What decides the parts' contents (the storage --dtype does not: parts hold float32). The model is
    the export folder's files (path, size, mtime) or the hash of the config's model, loss and seed; the
    shards are their paths, sizes and mtimes."""
    from notellm2.data_shards.reader.shard_index import expand_shards

    if model_dir:
        root = os.path.abspath(model_dir)
        files = []
        for dirpath, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                st = os.stat(os.path.join(dirpath, name))
                files.append([os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime_ns])
        model = {"export": root, "files": files}
    else:
        from notellm2.launcher.eval.provenance import untrained_fingerprint

        model = {"untrained_config_sha256": untrained_fingerprint(cfg).rpartition(":")[2]}
    shard_list = []
    for path in expand_shards(shards):
        st = os.stat(path)
        shard_list.append([os.path.abspath(path), st.st_size, st.st_mtime_ns])
    return {"format": PARTS_FORMAT, "model": model, "shards": shard_list, "mode": mode, "world_size": world_size,
            "batch_size": batch_size, "part_every": part_every, "max_image_pixels": data_cfg.max_image_pixels,
            **({"vision_cache": os.path.abspath(data_cfg.vision_cache)} if data_cfg.vision_cache else {})}


def check_parts(out_dir: str, fingerprint: dict, restart: bool) -> None:
    """Refuse (UserError) parts in OUT/parts that another run's settings made, unless `restart`
    (rank 0 then discards them). Read-only: every rank calls it before the process group starts."""
    from notellm2.launcher.eval.search_parts import check_manifest

    check_manifest(os.path.join(out_dir, PARTS_DIR), fingerprint, restart, "rank*.npz", "an embed", "this embed's")


def prepare_parts(out_dir: str, fingerprint: dict, restart: bool) -> str:
    """Rank 0: discard the parts on `restart`, create OUT/parts and its manifest. Returns the folder."""
    parts_dir = os.path.join(out_dir, PARTS_DIR)
    if restart and os.path.isdir(parts_dir):
        shutil.rmtree(parts_dir)
    os.makedirs(parts_dir, exist_ok=True)
    _write_json_atomic(os.path.join(parts_dir, PARTS_MANIFEST), {"fingerprint": fingerprint})
    return parts_dir


def finished_parts(parts_dir: str, rank: int, n_parts: int) -> int:
    """How many of this rank's parts, from the first on, are in place (a part in place is whole)."""
    k = 0
    while k < n_parts and os.path.exists(part_path(parts_dir, rank, k)):
        k += 1
    return k


def _die_after_part(rank: int, k: int) -> None:
    spec = os.environ.get(DIE_AFTER_PART_ENV, "")
    if spec and spec == f"{rank}:{k}":
        print(f"[test hook] rank {rank} kills itself (SIGKILL) after part {k}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def remove_parts(parts_dir: str) -> None:
    """The parts, then the manifest last: a kill in between leaves a manifest and fewer parts (resumable)."""
    for path in sorted(glob.glob(os.path.join(parts_dir, "rank*.npz*"))):
        os.remove(path)
    shutil.rmtree(parts_dir)


def assemble_parts(out_dir: str, parts_dir: str, world_size: int, n_parts: int, part_every: int,
                   n_batches: int, meta: dict, dtype: str, shards=None) -> tuple[int, int, int]:
    """Rank 0: the final files from every rank's parts (rank order, then part order), streamed into
    place; with `shards`, each note's content hash from them (launcher/eval/provenance.py) first.
    Returns (notes, dim, left out for want of an image)."""
    paths = [part_path(parts_dir, r, k) for r in range(world_size) for k in range(n_parts)]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise RuntimeError(f"{missing[0]}: missing ({len(missing)} of {len(paths)} parts): every rank must write "
                           f"to the same {parts_dir} (--out on a filesystem all nodes share)")
    ids: list[str] = []
    dim, no_image = 0, 0
    bad: dict = {}
    for i, path in enumerate(paths):
        k = i % n_parts
        part_ids, vectors, left_out = read_part(path, (k * part_every, min((k + 1) * part_every, n_batches)))
        ids.extend(part_ids)
        no_image += left_out
        dim = dim or int(vectors.shape[1])
        _add_counts(bad, part_bad_counts(path))
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"embed: {len(ids) - len(set(ids))} notes were embedded twice")
    if meta.get("mode") == "image":
        meta = {**meta, "left_out_no_image": no_image}
    if shards is not None:
        meta = {**meta, **content_hashes_of(out_dir, ids, shards)}
    extra = [{"sample": name, "reason": "sha256_differs_from_manifest", "action": "read as it is",
              "message": "the shard's sha256 differs from the manifest.json beside it (damaged or rewritten since "
                         "write-shards)"} for name in meta.get("shards_differing_from_manifest", [])]
    log_name = _merge_bad_logs(out_dir, parts_dir, world_size, extra)
    meta = {**meta, "bad_notes": bad, **({"bad_sample_log": log_name} if log_name else {})}
    chunks = (read_part(p)[1] for p in paths)
    save_embedding_chunks(out_dir, ids, dim, chunks, meta, dtype)
    return len(ids), dim, no_image


def content_hashes_of(out_dir: str, ids: list[str], shards) -> dict:
    """Write the content hash of each of `ids` (read from `shards`) beside the vectors; returns the
    embeddings.json entry (launcher/eval/provenance.py)."""
    from notellm2.data_shards.reader.content_hash import shard_content_hashes
    from notellm2.launcher.eval.provenance import hashes_for, write_content_hashes

    known_ids, known = shard_content_hashes(shards)
    return write_content_hashes(out_dir, hashes_for(ids, known_ids, known, out_dir))


BAD_SAMPLE_LOG = "bad_samples.jsonl"


def _bad_log(parts_dir: str, rank: int) -> str:
    return os.path.join(parts_dir, f"bad-rank{rank:05d}.jsonl")


def _bad_line(bad: dict) -> str:
    """{"blanked": {"bad_image": 2}} -> "2 notes embedded with a blank image (bad_image 2)"."""
    from notellm2.data_shards.reader.samples import counts_line

    words = {"blanked": "embedded with a blank image (text only)", "unusable": "left out (not readable)"}
    return "; ".join(f"{sum(b.values())} notes {words.get(g, g)} ({counts_line(b)})" for g, b in bad.items() if b)


def _merge_bad_logs(out_dir: str, parts_dir: str, world_size: int, extra: list = ()) -> str | None:
    """Rank 0: `extra` records and every rank's bad-note log (parts/bad-rank*.jsonl) as one
    OUT/bad_samples.jsonl, each (sample, reason) once (a resumed run may have read a batch twice).
    None, and no file, when empty."""
    seen = {(rec["sample"], rec["reason"]) for rec in extra}
    lines = [json.dumps(rec, ensure_ascii=False) for rec in extra]
    for r in range(world_size):
        path = _bad_log(parts_dir, r)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut by a kill
                    continue
                key = (rec.get("sample"), rec.get("reason"))
                if key not in seen:
                    seen.add(key)
                    lines.append(json.dumps(rec, ensure_ascii=False))
    target = os.path.join(out_dir, BAD_SAMPLE_LOG)
    if not lines:
        if os.path.exists(target):
            os.remove(target)
        return None
    with atomic_write(target) as fh:
        fh.write("\n".join(lines) + "\n")
    return BAD_SAMPLE_LOG


def run_embed(note_model, vision_tower, prompter, shards, out_dir: str, data_cfg: DataConfig, batch_size: int,
              mode: str, rank: int, world_size: int, image_size: int, meta: dict,
              part_every: int = DEFAULT_PART_EVERY, fingerprint: dict | None = None, restart: bool = False,
              dtype: str = "float32", made: str | None = None) -> int:
    """Every rank embeds its share into parts (resuming from its finished ones); rank 0 then writes
    `out_dir` from them. `fingerprint` (parts_fingerprint) is what the parts manifest records. `made`:
    the topmost folder of `out_dir` that did not exist before (removed when the run is refused)."""
    from notellm2.launcher.distributed import barrier

    t0 = time.time()
    fingerprint = fingerprint if fingerprint is not None else {"mode": mode, "world_size": world_size,
                                                               "batch_size": batch_size, "part_every": part_every}
    parts_dir = os.path.join(out_dir, PARTS_DIR)
    if rank == 0:
        prepare_parts(out_dir, fingerprint, restart)
    barrier()  # the parts folder and its manifest exist (and old parts are gone on --restart)
    for stale in glob.glob(os.path.join(parts_dir, f".rank{rank:05d}-*.npz.tmp-*")):  # notellm2.files.temporary_name
        os.remove(stale)  # a part being written when the last run died
    bad_log = _bad_log(parts_dir, rank)
    probe = notes_loader(prompter, shards, data_cfg, batch_size, mode, rank, world_size, image_size,
                         bad_sample_log=bad_log)
    n_batches = probe.total_batches
    n_parts = (n_batches + part_every - 1) // part_every
    done_parts = finished_parts(parts_dir, rank, n_parts)
    done = min(done_parts * part_every, n_batches)
    kept = 0  # this rank's embedded notes, resumed parts included
    if done_parts:
        for k in range(done_parts):  # a part from a run with other code is refused here, not at the end
            kept += len(read_part(part_path(parts_dir, rank, k), (k * part_every, min((k + 1) * part_every,
                                                                                          n_batches)))[0])
        print(f"rank {rank}: resumed: {done_parts} parts ({done} batches) done, embedding {n_batches - done} of "
              f"{n_batches} batches", flush=True)
    else:
        print(f"rank {rank}: embedding {n_batches} of {n_batches} batches (a part every {part_every})", flush=True)
    loader = notes_loader(prompter, shards, data_cfg, batch_size, mode, rank, world_size, image_size,
                          skip_batches=done, bad_sample_log=bad_log) if done else probe
    k, b = done_parts, done
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    no_image = 0
    embedded = 0
    counted: dict = {}
    nonfinite: list[str] = []
    for batch_ids, vecs, left_out in embedded_batches(note_model, vision_tower, loader, mode, rank):
        bad_rows = ~np.isfinite(vecs).all(axis=1)
        if bad_rows.any():  # refused below, on every rank together (nothing of them is written)
            nonfinite.extend(i for i, bad in zip(batch_ids, bad_rows.tolist()) if bad)
        ids.extend(batch_ids)
        vectors.append(vecs)
        no_image += left_out
        kept += len(batch_ids)
        b += 1
        embedded += 1
        if b % part_every == 0 or b == n_batches:
            stats = loader.stats()
            write_part(part_path(parts_dir, rank, k), ids, np.concatenate(vectors), no_image,
                       (k * part_every, b), bad=_count_delta(stats, counted))
            counted = stats
            _die_after_part(rank, k)
            k, ids, vectors, no_image = k + 1, [], [], 0
    print(f"rank {rank}: embedded {embedded} batches", flush=True)
    _refuse_what_cannot_be_right(nonfinite, kept, rank, out_dir, parts_dir, meta, made,
                                 loader.stats() if b > done else probe.stats())
    barrier()  # every rank's parts are in place
    if rank == 0:
        info = {"mode": mode, "world_size": world_size, **meta}
        count, dim, left = assemble_parts(out_dir, parts_dir, world_size, n_parts, part_every, n_batches, info,
                                          dtype, shards=shards)
        remove_parts(parts_dir)
        print(f"embedded {count} notes ({dim} dims, mode {mode}, stored as {dtype}) "
              f"in {time.time() - t0:.1f} s -> {os.path.abspath(out_dir)}")
        if mode == "image" and left:
            print(f"left out {left} notes without a usable image (the image probe needs one)")
        with open(os.path.join(out_dir, "embeddings.json")) as fh:
            info = json.load(fh)
        log_path = os.path.join(os.path.abspath(out_dir), info.get("bad_sample_log") or BAD_SAMPLE_LOG)
        if info.get("bad_notes"):
            print(f"bad notes: {_bad_line(info['bad_notes'])}; each one is listed in {log_path}")
        if info.get("shards_differing_from_manifest"):
            print(f"shards whose sha256 differs from their manifest.json (damaged or rewritten since write-shards): "
                  f"{len(info['shards_differing_from_manifest'])}, read as they are; listed in {log_path}")
    return 0


def _refuse_what_cannot_be_right(nonfinite: list[str], kept: int, rank: int, out_dir: str, parts_dir: str,
                                 meta: dict, made: str | None, stats: dict) -> None:
    """Collective, before the final barrier: a NaN or inf vector is never a result, and neither is an
    output without a single note. When any rank got a non-finite vector, or no rank kept a note, every
    rank refuses in the same line (naming the first notes and the model, or the bad-note counts) and
    rank 0 removes the parts and the folders the run made: nothing is written."""
    from notellm2.launcher.distributed import all_gather_object
    from notellm2.launcher.distributed import shutdown as end_group

    found = all_gather_object([nonfinite[:5], len(nonfinite), kept, _count_delta(stats, {})])
    total_bad, total_kept = sum(r[1] for r in found), sum(r[2] for r in found)
    if total_bad == 0 and total_kept > 0:
        return
    if total_bad:
        first = [i for r in found for i in r[0]][:5]
        model = meta.get("model", "?")
        model = f"the export {model}" if model != "untrained" else f"the untrained model of {meta.get('config')}"
        message = (f"embed: {total_bad} notes got a non-finite (NaN or inf) vector from {model} "
                   f"(first: {', '.join(first)}); a damaged or diverged model? Nothing was written to {out_dir}")
    else:
        bad: dict = {}
        for r in found:
            _add_counts(bad, r[3])
        image_probe = (meta.get("request") or {}).get("mode") == "image"
        why = _bad_line(bad) or ("no note has an image, which the image probe needs" if image_probe
                                 else "they hold no note")
        message = f"embed: no note of the shards could be embedded ({why}); nothing was written to {out_dir}"
    if rank == 0:
        remove_parts(parts_dir)
        if made is not None and not any(files for _, _, files in os.walk(made)):
            shutil.rmtree(made)
    end_group()  # every rank is here: end the group before the error leaves the command
    raise UserError(message)


# Ranks wait for each other at the barrier after their parts: rank 0 waits there for the slowest rank's
# remaining share (a resumed rank may have fewer batches left than another), which must fit in it.
EMBED_COLLECTIVE_TIMEOUT_S = 1800  # torch's default, what embed had before


EMBED_DEVICES = ("cpu", "cuda")


def embed_device(topo, device: str, cuda_available: bool | None = None, cuda_count: int | None = None) -> torch.device:
    """The torch device `notellm2 embed --device` means on this rank: the CPU, or cuda:LOCAL_RANK (the
    GPU init_distributed binds the rank to). Refused in one line where there is no such GPU."""
    if device not in EMBED_DEVICES:
        raise UserError(f"--device {device}: allowed {', '.join(EMBED_DEVICES)}")
    if device == "cpu":
        return torch.device("cpu")
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda_available:
        raise UserError("--device cuda: no CUDA device here (torch.cuda.is_available() is False); use --device cpu")
    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if topo.local_rank >= cuda_count:
        raise UserError(f"--device cuda: local rank {topo.local_rank} has no GPU (this node has {cuda_count}); "
                        "start at most one rank per GPU")
    return torch.device("cuda", topo.local_rank)


def embed_variant(model_dir: str | None, cfg) -> str:
    """The variant `notellm2 embed` would embed with: the export's (reads only its JSON) or the config's."""
    from notellm2.modeling.pretrained import read_export_config

    if model_dir:
        return read_export_config(model_dir).model.variant
    if cfg is None:
        raise UserError("give --model EXPORT_DIR, or --config for the untrained baseline")
    return cfg.model.variant


def load_embedder(model_dir: str | None, cfg, config_path: str | None = None, device: torch.device | str = "cpu",
                  trust_code: bool = False, tower_path: str | None = None):
    """(note_model, vision_tower, prompter, image_size, source) for `notellm2 embed`, on `device`: the
    export in `model_dir` (through the serving encoder, in its stored dtype), or the untrained model
    `cfg` describes (the zero-shot baseline; its new modules are drawn from cfg.train.seed, the same on
    every rank and run)."""
    if model_dir:
        from notellm2.modeling.pretrained import NoteEncoder

        enc = NoteEncoder.from_pretrained(model_dir, device=device, trust_code=trust_code, tower_path=tower_path)
        return enc.note_model, enc.vision_tower, enc.prompter, enc.image_size, {"model": os.path.abspath(model_dir)}
    from notellm2.modeling.encoder import build_all

    torch.manual_seed(cfg.train.seed)
    note_model, tower, prompter = build_all(cfg.model, cfg.loss)
    note_model.to(device)
    if tower is not None:
        tower.to(device)
    source = {"model": "untrained", "config": os.path.abspath(config_path) if config_path else None}
    return note_model, tower, prompter, cfg.model.vision.image_size, source


def check_embed_cache(path: str | None, tower, label: str = "data.vision_cache") -> None:
    """A vision cache for embedding must hold this model's tower's features (its key), refused in one line
    naming `label` (the option or key that gave it) before any note is read (the loader checks that it
    covers the shards)."""
    if not path:
        return
    if tower is None:
        raise UserError(f"{label}: {path!r} is set, but this model uses no image; embed without it")
    from notellm2.data_shards.vision_cache import open_cache
    from notellm2.modeling.vision import tower_key

    cache, live = open_cache(path), tower_key(tower)
    if cache.key != live:
        raise UserError(f"{label}: {path!r} holds features of a tower with key {cache.key[:16]}, but the model's tower "
                        f"has key {live[:16]}; write it again with `notellm2 data cache-vision` for this model")


def shards_fingerprint(shards) -> tuple[list, list]:
    """([name, sha256] of each shard, the names of those whose sha256 differs from the manifest.json
    beside them that lists them). Each shard is hashed (one read): a shard damaged since write-shards
    is found, and counted in the summary, even when its samples still decode."""
    from notellm2.data_shards.reader.shard_index import expand_shards

    listed: dict = {}
    out, differ = [], []
    for path in expand_shards(shards):
        folder = os.path.dirname(path)
        if folder not in listed:
            listed[folder] = {}
            try:
                with open(os.path.join(folder, "manifest.json")) as fh:
                    for e in json.load(fh).get("shards", []):
                        listed[folder][e["name"]] = e["sha256"]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        digest = sha256_file(path)
        out.append([os.path.basename(path), digest])
        if listed[folder].get(os.path.basename(path), digest) != digest:
            differ.append(os.path.basename(path))
    return out, differ


def output_request(model_dir: str | None, cfg, shard_digests: list, mode: str, world_size: int, batch_size: int,
                   data_cfg: DataConfig, dtype: str) -> dict:
    """What decides a finished output's files (recorded in embeddings.json as `request`): the model and
    the shards by content, the probe, the rank layout and batch size (they set the row order), the pixel
    limit, the vision cache and the storage dtype. Not --part-every, --num-workers or --device."""
    cache = None
    if data_cfg.vision_cache:
        meta = os.path.join(data_cfg.vision_cache, "cache.json")
        cache = sha256_file(meta) if os.path.isfile(meta) else os.path.abspath(data_cfg.vision_cache)
    from notellm2.launcher.eval.provenance import model_fingerprint

    return {"model": model_fingerprint(model_dir, cfg), "shards": shard_digests, "mode": mode,
            "world_size": world_size, "batch_size": batch_size, "max_image_pixels": data_cfg.max_image_pixels,
            "vision_cache": cache, "dtype": dtype}


def check_notes_shards(shards, label: str = "--shards") -> None:
    """Refuse pairs shards where notes shards are needed (their every sample would be unusable)."""
    from notellm2.data_shards.reader.shard_index import check_shard_kind, expand_shards

    try:
        check_shard_kind(expand_shards(shards), "notes", label, "embed")
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{label}: {e}") from None


def embed_command(model_dir: str | None, cfg, config_path: str | None, shards: str | None, out_dir: str,
                  mode: str = "both", batch_size: int = 32, num_workers: int = 1,
                  part_every: int = DEFAULT_PART_EVERY, restart: bool = False, device: str = "cpu",
                  dtype: str = "float32", vision_cache: str | None = None, trust_code: bool = False,
                  tower_path: str | None = None, base: str | None = None, overwrite: bool = False) -> int:
    """`notellm2 embed`: the user's mistakes (a probe the variant lacks, no shards or pairs shards, --device
    cuda without a GPU, parts left by other settings, an --out that is a file or holds embeddings of
    another request without `overwrite`) are refused before any rank starts or loads a model; a finished
    output of the same request is left as it is (return 0). Then every rank (torchrun / srun, or one
    process) embeds its share into parts under OUT/parts, resuming from its finished ones, and rank 0
    writes `out_dir` from them. With `base`, only the notes new or changed since that set are embedded
    (notellm2.launcher.eval.delta)."""
    from notellm2.launcher import distributed

    distributed.enable_crash_traces()  # a native crash prints every thread's stack into this rank's log
    if batch_size <= 0 or part_every <= 0:
        raise UserError(f"--batch-size {batch_size}, --part-every {part_every}: both must be integers > 0")
    if dtype not in EMBEDDING_DTYPES:
        raise UserError(f"--dtype {dtype}: allowed {', '.join(EMBEDDING_DTYPES)}")
    variant = embed_variant(model_dir, cfg)
    why = probe_unavailable(variant, mode)
    if why:
        raise UserError(f"--mode {mode}: {why}; use --mode text or --mode both")
    shards_given = bool(shards)
    shards = shards or (None if model_dir or cfg is None else cfg.data.notes_shards)
    if not shards:
        raise UserError("no notes shards (--shards, or data.notes_shards in the config)")
    data_cfg = DataConfig(num_workers=num_workers) if model_dir else cfg.data
    if vision_cache:  # --vision-cache: the tower's features instead of pixels (an export has no data config)
        data_cfg = dataclasses.replace(data_cfg, vision_cache=vision_cache)
    check_folder_output(out_dir)
    if os.path.isdir(shards):  # a `notellm2 data write-notes` folder: its shards (and, for --base, its deletions)
        from notellm2.data_shards.writing.notes_only import read_notes_set

        notes_set = read_notes_set(shards)
        check_notes_shards(notes_set.shards, "--shards" if shards_given else "data.notes_shards")
        shards = shards if base else notes_set.shards
    else:
        check_notes_shards(shards, "--shards" if shards_given else "data.notes_shards")
    topo = distributed.detect_topology()
    torch_device = embed_device(topo, device)
    if base:  # only the new and changed notes (launcher/eval/delta.py)
        from notellm2.launcher.eval.delta import delta_embed

        return delta_embed(model_dir, cfg, config_path, shards, base, out_dir, data_cfg, topo, torch_device, mode,
                           batch_size, part_every, restart, dtype)
    shard_digests, differ = shards_fingerprint(shards)
    request = output_request(model_dir, cfg, shard_digests, mode, topo.world_size, batch_size, data_cfg, dtype)
    recorded = recorded_request(out_dir, "embeddings.json")
    if recorded is not None:
        if reuse_finished(out_dir, recorded, request, overwrite, "finished embeddings"):
            if topo.rank == 0:
                print(f"{out_dir}: already holds these embeddings (same model, shards and settings); nothing to do")
            return 0
    fingerprint = parts_fingerprint(model_dir, cfg, shards, mode, topo.world_size, batch_size, part_every, data_cfg)
    check_parts(out_dir, fingerprint, restart)
    made = missing_top(out_dir)  # before any rank creates it
    model_fp = request["model"]
    if topo.world_size > 1:
        # The shared start-up (the trainer's): under NCCL the rank's CUDA device is set before the group
        # starts, before anything below touches CUDA; DeepSpeed's comm layer is not needed here.
        distributed.init_distributed(topo, timeout_s=EMBED_COLLECTIVE_TIMEOUT_S, deepspeed_comm=False)
    note_model, tower, prompter, image_size, source = load_embedder(model_dir, cfg, config_path, torch_device,
                                                                    trust_code=trust_code, tower_path=tower_path)
    source = {**source, "fingerprint": model_fp}  # launcher/eval/provenance.py
    check_embed_cache(data_cfg.vision_cache, tower, "--vision-cache" if vision_cache else "data.vision_cache")
    source = {**source, "request": request, **({"shards_differing_from_manifest": differ} if differ else {})}
    rc = run_embed(note_model, tower, prompter, shards, out_dir, data_cfg, batch_size, mode,
                   topo.rank, topo.world_size, image_size, source, part_every=part_every,
                   fingerprint=fingerprint, restart=restart, dtype=dtype, made=made)
    return rc  # the process group ends in notellm2.launcher.cli.main (notellm2.launcher.distributed.shutdown)
