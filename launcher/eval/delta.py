"""Delta embedding (`notellm2 embed --base SET`): embed only the notes that are new or whose content
changed since the embedding set SET, drop the deleted ones, reuse every other vector as it is.

The input is a notes shard set: a `notellm2 data write-notes` folder (new and edited notes, with its
deletions: a list of ids, or today's full catalog whose difference with SET is deleted) or any notes
shard pattern (no deletions). Each note's content hash (notellm2.data_shards.reader.content_hash) is
compared with the one SET recorded:

- a note of SET listed as deleted (or absent from the full catalog) is dropped;
- a note of SET whose hash changed is embedded again and keeps its row;
- a note that is not in SET is embedded and appended, in shard order;
- every other note of SET is reused: its vector is copied, bit for bit.

SET must come from the same model (fingerprint) and the same probe mode; the refusal is one line.
The new set is written to `--out`, which may not be SET: SET stays whole and readable while the new
set is written and afterwards (roll back by using it again). In `--out`, each file is written whole
and `embeddings.json` last, as for every embed.

The work goes through OUT/.delta: `plan.json` (what is reused, embedded and dropped, and the inputs it
was planned from), `shards/` (the notes to embed, copied from the input shards byte for byte) and
`embedded/` (their vectors, written by the ordinary embed path with its parts, so a killed run
resumes from its finished parts). A rerun with the same inputs resumes; other inputs are refused
(add --restart to discard the work). OUT/.delta is removed once the new set is complete.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from notellm2.data_shards.reader.content_hash import HASH_BYTES, hash_keys
from notellm2.errors import UserError
from notellm2.files import atomic_write_json, sha256_file

DELTA_DIR = ".delta"
PLAN = "plan.json"
SUBSET_SPLIT = "delta"
COPY_SHARD_SIZE = 1000
MERGE_ROWS = 65536  # rows per chunk streamed into the new embeddings.npy


class DeltaError(UserError, ValueError):
    """Inputs of `embed --base` that do not fit together (one line)."""


@dataclass
class DeltaPlan:
    out_ids: list  # the new set's notes, in its row order
    from_base: np.ndarray  # int64 [len(out_ids)]: the row of the base set reused, or -1 (embedded now)
    embed: list  # indices (into the input shards' notes) of the notes to embed, in shard order
    counts: dict


def plan_delta(base_ids: list[str], base_hashes: np.ndarray, note_ids: list[str], note_hashes: np.ndarray,
               deletion_kind: str = "none", listed: Optional[list[str]] = None, where: str = "notes") -> DeltaPlan:
    """What to reuse, embed and drop (the rules in the module docstring)."""
    notes = {n: i for i, n in enumerate(note_ids)}
    if len(notes) != len(note_ids):
        seen: set[str] = set()
        dup = next(n for n in note_ids if n in seen or seen.add(n))
        raise DeltaError(f"{where}: note {dup!r} appears twice in the notes shards")
    listed = listed or []
    if deletion_kind == "list":
        deleted = set(listed)
    elif deletion_kind == "full_catalog":
        alive = set(listed)
        deleted = {b for b in base_ids if b not in alive}
    else:
        deleted = set()
    base_keys, note_keys = hash_keys(base_hashes), hash_keys(note_hashes)
    out_ids: list[str] = []
    from_base: list[int] = []
    embed: list[int] = []
    c = dict(reused=0, reused_listed_unchanged=0, changed=0, new=0, dropped=0, deleted_not_in_base=0)
    for r, b in enumerate(base_ids):
        if b in deleted:
            c["dropped"] += 1
            continue
        i = notes.get(b)
        out_ids.append(b)
        if i is None or note_keys[i] == base_keys[r]:
            from_base.append(r)
            c["reused"] += 1
            c["reused_listed_unchanged"] += i is not None
        else:
            from_base.append(-1)
            embed.append(i)
            c["changed"] += 1
    in_base = set(base_ids)
    fresh = [i for i, n in enumerate(note_ids) if n not in in_base]
    out_ids.extend(note_ids[i] for i in fresh)
    from_base.extend([-1] * len(fresh))
    embed.extend(fresh)
    c["new"] = len(fresh)
    if deletion_kind == "list":
        c["deleted_not_in_base"] = len(deleted - in_base)
    return DeltaPlan(out_ids, np.asarray(from_base, np.int64), embed, c)


def notes_input(shards: str):
    """A `write-notes` folder (its shards and deletions) or a shard pattern (no deletions)."""
    from notellm2.data_shards.reader.shard_index import expand_shards
    from notellm2.data_shards.writing.notes_only import NotesSet, read_notes_set

    if os.path.isdir(shards):
        return read_notes_set(shards)
    return NotesSet(shards, expand_shards(shards), "none", [])


def _inputs_fingerprint(base: str, notes, model_fp: str, mode: str) -> dict:
    """What decides the plan: the base set (its embeddings.json), the notes shards (paths, sizes,
    mtimes), the deletions, the model and the mode."""
    ids_blob = hashlib.sha256("\n".join(notes.ids).encode()).hexdigest()
    return {"base": [os.path.abspath(base), sha256_file(os.path.join(base, "embeddings.json"))],
            "shards": [[os.path.abspath(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in notes.shards],
            "deletions": [notes.deletion_kind, ids_blob], "model": model_fp, "mode": mode}


def _read_plan(work: str) -> Optional[dict]:
    from notellm2.launcher.eval.provenance import read_json

    path = os.path.join(work, PLAN)
    return read_json(path, "", DeltaError) if os.path.exists(path) else None


def make_plan(work: str, base: str, notes, inputs: dict) -> None:
    """Rank 0: hash the input notes, plan against the base set, copy the notes to embed into
    work/shards, then write work/plan.json (last: its presence marks a whole plan)."""
    from notellm2.data_shards.reader.content_hash import shard_content_hashes
    from notellm2.data_shards.writing.notes_only import copy_notes
    from notellm2.launcher.eval.provenance import read_set_source

    source = read_set_source(base, need_hashes=True)
    with open(os.path.join(base, "ids.txt")) as fh:
        base_ids = [line.rstrip("\n") for line in fh if line.strip()]
    if len(base_ids) != source.count:
        raise DeltaError(f"{base}: {len(base_ids)} ids in ids.txt but count {source.count} in embeddings.json")
    note_ids, note_hashes, locations = shard_content_hashes(notes.shards, with_locations=True)
    plan = plan_delta(base_ids, source.hashes, note_ids, note_hashes, notes.deletion_kind, notes.ids, notes.folder)
    if os.path.isdir(work):
        shutil.rmtree(work)
    subset = os.path.join(work, "shards")
    copy_notes([locations[i] for i in plan.embed], subset, COPY_SHARD_SIZE, SUBSET_SPLIT)
    _write_lines(os.path.join(work, "out_ids.txt"), plan.out_ids)
    _write_lines(os.path.join(work, "embed_ids.txt"), [note_ids[i] for i in plan.embed])
    np.save(os.path.join(work, "from_base.npy"), plan.from_base)
    np.save(os.path.join(work, "embed_hashes.npy"), note_hashes[plan.embed])
    atomic_write_json(os.path.join(work, PLAN), {"inputs": inputs, "counts": plan.counts})


def _write_lines(path: str, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(f"{n}\n" for n in lines))


def _read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh]


def load_plan(work: str) -> dict:
    """The plan make_plan wrote (plan.json, written last, names a whole plan)."""
    plan = _read_plan(work)
    plan.update(out_ids=_read_lines(os.path.join(work, "out_ids.txt")),
                embed_ids=_read_lines(os.path.join(work, "embed_ids.txt")),
                from_base=np.load(os.path.join(work, "from_base.npy")),
                embed_hashes=np.load(os.path.join(work, "embed_hashes.npy")))
    return plan


def _is_finished(emb_dir: str) -> bool:
    return os.path.isfile(os.path.join(emb_dir, "embeddings.json"))


def merge_sets(out_dir: str, base: str, embedded: Optional[str], plan: dict, meta: dict, dtype: str) -> dict:
    """Rank 0: the new set from the base's reused rows and the newly embedded ones, streamed in chunks
    (the base is read through a memory map); returns the counts it logs."""
    from notellm2.launcher.eval.evaluate import load_embeddings, save_embedding_chunks
    from notellm2.launcher.eval.provenance import read_set_source, write_content_hashes

    base_vecs = np.load(os.path.join(base, "embeddings.npy"), mmap_mode="r", allow_pickle=False)
    base_hashes = read_set_source(base, need_hashes=True).hashes
    emb_pos: dict = {}
    emb_vecs = np.zeros((0, base_vecs.shape[1]), np.float32)
    if embedded is not None:
        emb_ids, emb = load_embeddings(embedded)
        emb_vecs = emb.numpy()
        if emb_vecs.shape[1] != base_vecs.shape[1]:
            raise DeltaError(f"{embedded}: vectors of {emb_vecs.shape[1]} dims, the base {base} has "
                             f"{base_vecs.shape[1]}")
        emb_pos = {n: i for i, n in enumerate(emb_ids)}
    embed_row = {n: i for i, n in enumerate(plan["embed_ids"])}
    from_base = plan["from_base"]
    keep = [r for r, (n, b) in enumerate(zip(plan["out_ids"], from_base)) if b >= 0 or n in emb_pos]
    left_out = len(plan["out_ids"]) - len(keep)  # image probe: embedded notes without an image
    ids = [plan["out_ids"][r] for r in keep]
    src = from_base[keep]
    hashes = np.zeros((len(ids), HASH_BYTES), np.uint8)
    old = src >= 0
    hashes[old] = base_hashes[src[old]]
    new_rows = np.flatnonzero(~old)
    hashes[new_rows] = plan["embed_hashes"][[embed_row[ids[r]] for r in new_rows]]
    emb_rows = np.array([emb_pos.get(n, -1) for n in ids], np.int64)

    def chunks():
        for s in range(0, len(ids), MERGE_ROWS):
            part = np.empty((min(len(ids), s + MERGE_ROWS) - s, base_vecs.shape[1]), np.float32)
            b, e = src[s:s + len(part)], emb_rows[s:s + len(part)]
            if (b >= 0).any():
                part[b >= 0] = base_vecs[b[b >= 0]]
            if (b < 0).any():
                part[b < 0] = emb_vecs[e[b < 0]]
            yield part

    counts = {**plan["counts"], "embedded": int((~old).sum()), "left_out_no_image": left_out, "count": len(ids)}
    meta = {**meta, "delta": {"base": os.path.abspath(base), **counts}, **write_content_hashes(out_dir, hashes)}
    save_embedding_chunks(out_dir, ids, int(base_vecs.shape[1]), chunks(), meta, dtype)
    return counts


def delta_embed(model_dir: Optional[str], cfg, config_path: Optional[str], shards: str, base: str, out_dir: str,
                data_cfg, topo, device, mode: str, batch_size: int, part_every: int, restart: bool,
                dtype: str) -> int:
    """`notellm2 embed --base`: every rank runs it (see the module docstring)."""
    from notellm2.launcher import distributed
    from notellm2.launcher.eval.embed import (EMBED_COLLECTIVE_TIMEOUT_S, load_embedder, parts_fingerprint,
                                              run_embed)
    from notellm2.launcher.eval.provenance import model_fingerprint, read_set_source, require_same_source

    if data_cfg.vision_cache:
        raise DeltaError("--base with a vision cache: the cache covers the shards it was written for, not the "
                         "subset --base embeds; embed without it")
    if os.path.realpath(out_dir) == os.path.realpath(base):
        raise DeltaError(f"--out {out_dir} is the --base set: write the new set to another folder (the base stays "
                         "whole, to roll back to)")
    source = read_set_source(base, need_hashes=True)
    model_fp = model_fingerprint(model_dir, cfg)
    label = f"the model {model_dir}" if model_dir else f"the untrained model of {config_path}"
    require_same_source([(f"--base {base}", source.fingerprint, source.mode), (label, model_fp, mode)])
    notes = notes_input(shards)
    work = os.path.join(out_dir, DELTA_DIR)
    inputs = _inputs_fingerprint(base, notes, model_fp, mode)
    old = None if restart else _read_plan(work)
    if old is not None and old.get("inputs") != inputs:
        raise DeltaError(f"{work}: the work of an embed --base with other inputs (base, notes, deletions, model or "
                         "mode differ); rerun with those to resume, or add --restart to discard it")
    if topo.world_size > 1:
        distributed.init_distributed(topo, timeout_s=EMBED_COLLECTIVE_TIMEOUT_S, deepspeed_comm=False)
    t0 = time.time()
    if topo.rank == 0 and old is None:
        make_plan(work, base, notes, inputs)
    distributed.barrier()  # the plan and the subset shards are in place
    plan = load_plan(work)
    embedded = os.path.join(work, "embedded")
    model_source = ({"model": os.path.abspath(model_dir)} if model_dir else
                    {"model": "untrained", "config": os.path.abspath(config_path) if config_path else None})
    meta = {"mode": mode, "world_size": topo.world_size, **model_source, "fingerprint": model_fp}
    if plan["embed_ids"] and not _is_finished(embedded):
        note_model, tower, prompter, image_size, _ = load_embedder(model_dir, cfg, config_path, device)
        subset = os.path.join(work, "shards", f"notes-{SUBSET_SPLIT}-*.tar")
        fp = parts_fingerprint(model_dir, cfg, subset, mode, topo.world_size, batch_size, part_every, data_cfg)
        run_embed(note_model, tower, prompter, subset, embedded, data_cfg, batch_size, mode, topo.rank,
                  topo.world_size, image_size, meta, part_every=part_every, fingerprint=fp, dtype="float32")
    if topo.rank == 0:
        c = merge_sets(out_dir, base, embedded if plan["embed_ids"] else None, plan, meta, dtype)
        shutil.rmtree(work)
        print(f"embed --base: {c['count']} notes: {c['reused']} reused from {base}, {c['embedded']} embedded "
              f"({c['new']} new, {c['changed']} changed), {c['dropped']} dropped (deleted)"
              + (f", {c['left_out_no_image']} left out (no image)" if c["left_out_no_image"] else "")
              + f" in {time.time() - t0:.1f} s -> {os.path.abspath(out_dir)}", flush=True)
    return 0  # the process group ends in notellm2.launcher.cli.main (notellm2.launcher.distributed.shutdown)
