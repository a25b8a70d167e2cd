"""I2I ranking metrics (NoteLLM / NoteLLM-2): the protocols, the runs, the subsets, the bootstrap
intervals and the paired tests (docs/evaluation.md).

Two protocols:

- ``paper`` (the default): the test notes are the notes the split assigned to test
  (note_split.parquet). The test pairs are read in file order; a pair is kept only when both notes
  are test notes and neither was already used as a query or a target of a kept pair, so every
  note plays at most one role. The queries are the kept query notes; the pool is every test note,
  including notes in no pair, minus the queries. Every test note must have an embedding (a missing
  one is an error naming the run and the notes).
- ``all-pairs`` (the cold-start view, the stack's first protocol): every pair of the split whose
  two notes have embeddings counts; the query ranks every embedded note except itself.

Each pair's target is placed by two counts, the pool notes scoring strictly above it and those
scoring exactly the same (notellm2.launcher.eval.search.target_counts); Recall@K, NDCG@K and MRR are
their expectations under random tie-breaking (`fair`, the default; a constant encoder scores chance),
or with every tie counted against the target (`pessimistic`): notellm2.launcher.eval.metrics. K
values above the pool size are not reported (at K = pool size every target is found) and are listed
as capped.

Runs are embedding folders (`notellm2 embed`) and reference rows without training
(notellm2.launcher.eval.reference: BM25, the category oracle, the frozen tower's features). The
subsets (notellm2.launcher.eval.subsets) are model-free, so every run of a table gets the same ones.

Every figure gets a bootstrap interval over query notes (default 1,000 resamples at 95 %, seeded;
the same resamples for every run, so runs are compared on the same draws). A resample draws query
notes with replacement and takes all pairs of each (one pair per note under the paper protocol).
Each run's report entry keeps its per-query counts, so `paired_runs` (eval --baseline) tests the
difference of two runs from the reports alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from notellm2.errors import UserError
from notellm2.files import commit_file
from notellm2.launcher.eval import metrics, search
from notellm2.launcher.eval.metrics import bootstrap_ci
from notellm2.launcher.eval.subsets import (DEFAULT_TEXT_POOR_CHARS, degenerate, length_subsets,  # noqa: F401
                                            popularity_subsets, split_popularity_subsets, text_poor_subsets,
                                            train_pair_counts)

DEFAULT_KS = (1, 5, 10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)
PROTOCOLS = ("paper", "all-pairs")
TIES = metrics.TIES
FAISS_MAX_K = 1000  # an approximate backend reports Recall@K only up to this K

# ---------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """What is ranked. Under the paper protocol it is fixed before any embedding is read."""
    protocol: str
    query_ids: list
    target_ids: list
    pool_ids: Optional[list]  # None: every embedded note of a run (all-pairs)
    stats: dict = field(default_factory=dict)


def paper_task(pairs: list[tuple[str, str]], test_notes: list[str]) -> Task:
    """The paper's protocol over the split's pairs in file order (see the module docstring)."""
    test = set(test_notes)
    if len(test) != len(test_notes):
        raise ValueError("paper_task: the test notes hold duplicate ids")
    used: set = set()
    queries, targets = [], []
    not_test = reused = same = 0
    for q, t in pairs:
        if q == t:
            same += 1
        elif q not in test or t not in test:
            not_test += 1
        elif q in used or t in used:
            reused += 1
        else:
            used.update((q, t))
            queries.append(q)
            targets.append(t)
    if not queries:
        raise ValueError(f"paper protocol: none of the {len(pairs)} pairs has two unused test notes "
                         f"({len(test)} test notes)")
    qset = set(queries)
    pool = [n for n in test_notes if n not in qset]
    stats = {"pairs_read": len(pairs), "pairs_kept": len(queries), "dropped_not_both_test": not_test,
             "dropped_note_reused": reused, "dropped_self_pair": same, "test_notes": len(test),
             "pool_notes_in_no_kept_pair": len(pool) - len(targets)}
    return Task("paper", queries, targets, pool, stats)


def all_pairs_task(pairs: list[tuple[str, str]]) -> Task:
    kept = [(q, t) for q, t in pairs if q != t]
    return Task("all-pairs", [q for q, _ in kept], [t for _, t in kept], None,
                {"pairs_read": len(pairs), "dropped_self_pair": len(pairs) - len(kept)})


# -------------------------------------------------------------------------------------- ranking
def _normalise(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


class EvalInputError(UserError, ValueError):
    """An input of `notellm2 eval` that cannot be scored (names the run, the option or the file)."""


@dataclass
class RunRanks:
    """Where each evaluated pair's target stands: `greater` pool notes score strictly above it,
    `equal` others exactly the same (notellm2.launcher.eval.metrics has the metrics of these counts)."""
    greater: np.ndarray  # [n] int64
    equal: np.ndarray    # [n] int64
    query_ids: list
    target_ids: list
    pool_size: int
    num_skipped: int
    max_k: Optional[int] = None  # approximate backend: positions >= max_k are unknown (greater = max_k)
    faiss_recall: Optional[float] = None
    unknown: Optional[np.ndarray] = None  # approximate backend: the target was not in the returned top max_k


@dataclass
class Layout:
    """Who is ranked against whom, in rows of a run's note list `ids`."""
    query_ids: list
    target_ids: list
    query_rows: torch.Tensor   # [n] rows of the queries
    pool_rows: torch.Tensor    # [P] rows of the pool
    targets: torch.Tensor      # [n] each target's position in the pool
    exclude: Optional[torch.Tensor]  # [n] each query's position in the pool (all-pairs), else None
    num_skipped: int

    @property
    def pool_size(self) -> int:  # candidates per query
        return len(self.pool_rows) - (1 if self.exclude is not None else 0)


def layout(task: Task, ids: list[str], name: str, partial: bool = False) -> Layout:
    """The task's queries, targets and pool among the notes `ids` (a run's vectors, a catalog).
    partial: the run has no vector for some notes by design (an image-only probe, the tower's
    features): under the paper protocol its pairs with such a note are skipped (counted) and those
    notes leave its pool, instead of the missing-note error every other run gets."""
    index = {n: i for i, n in enumerate(ids)}
    if len(index) != len(ids):
        raise ValueError(f"{name}: the embeddings hold duplicate note ids")
    if task.pool_ids is not None:  # paper: fixed queries and pool
        missing = [n for n in list(task.pool_ids) + list(task.query_ids) if n not in index]
        if missing and not partial:
            raise ValueError(f"{name}: {len(missing)} test notes have no embedding (first: "
                             f"{', '.join(missing[:5])}); embed every test note (the notes-test shards)")
        pool_ids = [n for n in task.pool_ids if n in index]
        kept = [(q, t) for q, t in zip(task.query_ids, task.target_ids) if q in index and t in index]
        if not kept:
            raise ValueError(f"{name}: no query and target of the task both have an image-probe vector")
        pos = {n: i for i, n in enumerate(pool_ids)}
        qids, tids = [q for q, _ in kept], [t for _, t in kept]
        return Layout(qids, tids, torch.tensor([index[q] for q in qids]), torch.tensor([index[n] for n in pool_ids]),
                      torch.tensor([pos[t] for t in tids]), None, len(task.query_ids) - len(kept))
    keep = [(q, t) for q, t in zip(task.query_ids, task.target_ids) if q in index and t in index]
    if not keep:
        raise ValueError(f"{name}: none of the {len(task.query_ids)} pairs has both notes embedded")
    qids, tids = [q for q, _ in keep], [t for _, t in keep]
    rows = torch.tensor([index[q] for q in qids])
    return Layout(qids, tids, rows, torch.arange(len(ids)), torch.tensor([index[t] for t in tids]), rows,
                  len(task.query_ids) - len(keep))


def check_finite(ids: list[str], emb: torch.Tensor, name: str) -> None:
    bad = (~torch.isfinite(emb).all(1)).nonzero().squeeze(1).tolist()
    if bad:
        raise EvalInputError(f"{name}: {len(bad)} embeddings hold NaN or inf (first: "
                             f"{', '.join(ids[i] for i in bad[:5])}); embed those notes again")


def rank_run(task: Task, ids: list[str], emb: torch.Tensor, backend: str = "exact", name: str = "",
             image_probe: bool = False, **search_kw) -> RunRanks:
    """Rank one embedding set on `task` by cosine. `image_probe`: the run has no vector for a note
    without an image (see `layout`)."""
    lay = layout(task, ids, name, partial=image_probe)
    emb = _normalise(emb)
    pool, queries = emb[lay.pool_rows], emb[lay.query_rows]
    if backend == "exact":
        greater, equal = search.target_counts(queries, pool, lay.targets, exclude=lay.exclude, **search_kw)
        return RunRanks(greater.numpy(), equal.numpy(), lay.query_ids, lay.target_ids, lay.pool_size, lay.num_skipped)
    # approximate: the target's position in the returned top k (ties as the index returns them)
    k = min(FAISS_MAX_K, lay.pool_size)
    _, got = search.search_topk(queries, pool, k, backend=backend, exclude=lay.exclude)
    hit = got == lay.targets[:, None]
    found = hit.any(1).numpy()
    greater = np.where(found, hit.float().argmax(1).numpy(), k).astype(np.int64)
    sample = torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:1000]
    _, exact = search.exact_topk(queries[sample], pool, k, exclude=None if lay.exclude is None else lay.exclude[sample])
    return RunRanks(greater, np.zeros_like(greater), lay.query_ids, lay.target_ids, lay.pool_size, lay.num_skipped,
                    max_k=k, faiss_recall=search.overlap_recall(got[sample], exact), unknown=~found)


def rank_scores(task: Task, ref, name: str, **search_kw) -> RunRanks:
    """Rank a score-function reference (notellm2.launcher.eval.reference.ScoreReference) on the
    paper protocol's task: the same greater / equal counting as the embeddings."""
    lay = layout(task, ref.ids, name)
    qrows, prows = lay.query_rows.numpy(), lay.pool_rows.numpy()

    def block(rows, p0, p1, out):
        return ref.block(qrows[rows.numpy()], prows[p0:p1]).float()

    greater, equal = search.score_counts(block, len(qrows), len(prows), lay.targets, lay.exclude, **search_kw)
    return RunRanks(greater.numpy(), equal.numpy(), lay.query_ids, lay.target_ids, lay.pool_size, lay.num_skipped)


# ------------------------------------------------------------------------------------ summaries
def _columns(ks) -> list[str]:
    return [f"R@{k}" for k in ks] + [f"NDCG@{k}" for k in ks] + ["MRR"]


def query_metrics(q: dict, ks, ties: str, rows=None) -> np.ndarray:
    """[n, 2 len(ks) + 1]: each query's expected Recall@K, NDCG@K and reciprocal rank from a run's
    per-query record (`queries` of its report entry), optionally only `rows`."""
    g, e = np.asarray(q["greater"], np.int64), np.asarray(q["equal"], np.int64)
    unknown = np.asarray(q["unknown"], bool) if "unknown" in q else None
    if rows is not None:
        g, e = g[rows], e[rows]
        unknown = None if unknown is None else unknown[rows]
    recall, ndcg, rr = metrics.tie_metrics(g, e, ks, ties, unknown)
    return np.concatenate([recall, ndcg, rr[:, None]], axis=1)


def _figures(vals: np.ndarray, ci: np.ndarray, ks) -> dict:
    nk = len(ks)
    pair = lambda j: [float(ci[j, 0]), float(ci[j, 1])]  # noqa: E731
    return {"recall": {str(k): float(vals[:, j].mean()) for j, k in enumerate(ks)},
            "ci": {str(k): pair(j) for j, k in enumerate(ks)},
            "ndcg": {str(k): float(vals[:, nk + j].mean()) for j, k in enumerate(ks)},
            "ndcg_ci": {str(k): pair(nk + j) for j, k in enumerate(ks)},
            "mrr": float(vals[:, 2 * nk].mean()), "mrr_ci": pair(2 * nk)}


def summarise(rr: RunRanks, ks, subsets: dict, resamples: int, seed: int, level: float,
              ties: str = "fair") -> dict:
    """A run's report entry: figures with intervals per subset (degenerate subsets as n/a with the
    reason), and the per-query record (ids, greater, equal, subset rows) that paired tests read."""
    report_ks = [k for k in sorted(set(ks)) if k <= rr.pool_size and (rr.max_k is None or k <= rr.max_k)]
    capped = [k for k in sorted(set(ks)) if k > rr.pool_size]
    approx_dropped = [k for k in sorted(set(ks)) if k <= rr.pool_size and k not in report_ks]
    queries = {"query_id": list(rr.query_ids), "target_id": list(rr.target_ids),
               "greater": rr.greater.tolist(), "equal": rr.equal.tolist()}
    if rr.unknown is not None:
        queries["unknown"] = rr.unknown.tolist()
    vals = query_metrics(queries, report_ks, ties)
    groups_all = np.asarray(rr.query_ids, dtype=object)
    out, rows_of = {}, {}
    for name, mask in {"all": np.ones(len(rr.greater), dtype=bool), **subsets}.items():
        why = None if name == "all" else degenerate(mask)
        if why is not None:
            out[name] = {"n": int(mask.sum()), "na": why}
            continue
        ci = bootstrap_ci(vals[mask], resamples, seed, level, groups=groups_all[mask])
        out[name] = {"n": int(mask.sum()), **_figures(vals[mask], ci, report_ks)}
        if name != "all":
            rows_of[name] = np.flatnonzero(mask).tolist()
    queries["subset_rows"] = rows_of
    mean_place = rr.greater + (rr.equal / 2.0 if ties == "fair" else rr.equal) + 1
    res = {"ks": report_ks, "capped": capped, "subsets": out, "pool_size": rr.pool_size,
           "num_queries": len(rr.greater), "num_skipped": rr.num_skipped,
           "mean_rank": float(mean_place.mean()) if rr.max_k is None else None,
           "tied_queries": int((rr.equal > 0).sum()), "queries": queries}
    if approx_dropped:
        res["not_reported_approximate"] = approx_dropped
    if rr.faiss_recall is not None:
        res["faiss_recall_vs_exact"] = rr.faiss_recall
        res["mrr_truncated_at"] = rr.max_k
    return res


# --------------------------------------------------------------------------------- paired tests
def _pair_keys(q: dict) -> list:
    """(query, target, occurrence) of each row: a pair listed twice stays two rows."""
    seen: dict = {}
    keys = []
    for pair in zip(q["query_id"], q["target_id"]):
        seen[pair] = seen.get(pair, -1) + 1
        keys.append((*pair, seen[pair]))
    return keys


def paired_runs(report: dict, baseline: str) -> dict:
    """The paired bootstrap of every other run minus `baseline`, from the report's per-query records
    alone: over the pairs both runs scored, per subset of the baseline (the subsets are model-free)
    and K both report, the same draws (the report's resamples and seed) for both runs."""
    runs = {r["name"]: r for r in report["runs"]}
    if baseline not in runs:
        raise EvalInputError(f"--baseline {baseline!r}: no run of that name (runs: {', '.join(runs)})")
    b = report["bootstrap"]
    ties = report.get("ties", "fair")
    base = runs[baseline]
    base_q = base["queries"]
    base_index = {k: i for i, k in enumerate(_pair_keys(base_q))}
    out = {"baseline": baseline, "ties": ties, "runs": []}
    for name, run in runs.items():
        if name == baseline:
            continue
        keys = _pair_keys(run["queries"])
        common = [(base_index[k], i) for i, k in enumerate(keys) if k in base_index]
        ks = [k for k in base["ks"] if k in run["ks"]]
        entry = {"name": name, "n": len(common), "only_in_run": len(keys) - len(common),
                 "only_in_baseline": len(base_index) - len(common), "ks": ks, "subsets": {}}
        if common:
            bi = np.array([c[0] for c in common])
            ri = np.array([c[1] for c in common])
            bv = query_metrics(base_q, ks, ties, bi)
            rv = query_metrics(run["queries"], ks, ties, ri)
            groups = np.asarray(base_q["query_id"], dtype=object)[bi]
            subsets = {"all": np.ones(len(bi), dtype=bool)}
            for s, rows in base_q.get("subset_rows", {}).items():
                member = np.zeros(len(base_q["query_id"]), dtype=bool)
                member[rows] = True
                subsets[s] = member[bi]
            for s, mask in subsets.items():
                if not mask.any():
                    continue
                diff, ci = metrics.paired(bv[mask], rv[mask], groups[mask], b["resamples"], b["seed"], b["level"])
                cell = lambda j: {"diff": float(diff[j]), "ci": [float(ci[j, 0]), float(ci[j, 1])]}  # noqa: E731
                nk = len(ks)
                entry["subsets"][s] = {"n": int(mask.sum()),
                                       "recall": {str(k): cell(j) for j, k in enumerate(ks)},
                                       "ndcg": {str(k): cell(nk + j) for j, k in enumerate(ks)},
                                       "mrr": cell(2 * nk)}
        out["runs"].append(entry)
    return out


# ------------------------------------------------------------------------------------ the report
def _subsets_of(rr: RunRanks, task: Task, lengths, length_quantile, text_poor_chars, train_counts, rules) -> dict:
    subsets: dict = {}
    if lengths is not None:
        notes = sorted(set(rr.query_ids) | set(task.pool_ids if task.pool_ids is not None else rr.target_ids))
        ls, thr = length_subsets(rr.query_ids, rr.target_ids, lengths, length_quantile, notes)
        subsets.update(ls)
        subsets.update(text_poor_subsets(rr.query_ids, rr.target_ids, lengths, text_poor_chars))
        rules["length_threshold_chars"] = thr
    if train_counts is not None:
        subsets.update(popularity_subsets(rr.target_ids, train_counts))
    subsets.update(split_popularity_subsets(rr.query_ids, rr.target_ids))
    return subsets


def evaluate_runs(runs: list[tuple[str, str]], task: Task, ks=DEFAULT_KS, lengths: Optional[dict] = None,
                  length_quantile: float = 0.5, train_counts: Optional[dict] = None, backend: str = "exact",
                  resamples: int = 1000, seed: int = 0, level: float = 0.95, log=print, ties: str = "fair",
                  text_poor_chars: int = DEFAULT_TEXT_POOR_CHARS, references: Sequence = (),
                  catalog_notes: Optional[list] = None, catalog_path: str = "", baseline: Optional[str] = None) -> dict:
    """Rank every run (name, embeddings dir) and every reference row on `task` and summarise all,
    subsets x K, with intervals; with `baseline`, the paired differences against that run.

    lengths: note -> characters of its text fields (subsets.text_chars), for the short/long and
    text_poor/text_rich subsets. references: reference.ReferenceSpec of the rows without training
    (bm25 and category need `catalog_notes`, the catalog's Note list)."""
    from notellm2.launcher.eval import reference as refs

    if ties not in metrics.TIES:
        raise ValueError(f"ties {ties!r}: allowed {', '.join(metrics.TIES)}")
    rules = {"length": "characters of title + topics + content; short: <= the quantile of the evaluated notes' "
                       "lengths" if lengths is not None else None,
             "length_quantile": length_quantile if lengths is not None else None,
             "text_poor": f"the query or the target has fewer than {text_poor_chars} characters of title + topics "
                          "+ content; text_rich: both have at least that many" if lengths is not None else None,
             "text_poor_chars": text_poor_chars if lengths is not None else None,
             "popularity": "training-pair appearances of the target; cold_start: 0; head/tail: top/bottom third "
                           "of the others" if train_counts is not None else None,
             "split_popularity": "appearances of the target among the evaluated pairs; pop_head/pop_tail: "
                                 "top/bottom third of the distinct targets"}
    report = {"protocol": task.protocol, "protocol_stats": task.stats, "backend": backend, "ties": ties,
              "bootstrap": {"resamples": resamples, "seed": seed, "level": level}, "subset_rules": rules,
              "runs": []}

    def add(name: str, rr: RunRanks, extra: dict) -> None:
        subsets = _subsets_of(rr, task, lengths, length_quantile, text_poor_chars, train_counts, rules)
        res = summarise(rr, ks, subsets, resamples, seed, level, ties)
        if rr.faiss_recall is not None:
            log(f"[eval] {name}: {backend} recall@{rr.max_k} against exact search on "
                f"{min(1000, len(rr.greater))} queries: {rr.faiss_recall:.4f}")
        report["runs"].append({"name": name, **extra, **res})

    for name, emb_dir in runs:
        ids, emb = load_embeddings(emb_dir)
        check_finite(ids, emb, f"{name} ({emb_dir})")
        meta_path = os.path.join(emb_dir, "embeddings.json")
        mode = json.load(open(meta_path)).get("mode") if os.path.exists(meta_path) else None
        rr = rank_run(task, ids, emb, backend=backend, name=f"{name} ({emb_dir})", image_probe=mode == "image")
        add(name, rr, {"kind": "embeddings", "embeddings": os.path.abspath(emb_dir)})
    for spec in references:
        if task.pool_ids is None:
            raise EvalInputError(f"--reference {spec.name}: reference rows need --protocol paper (a fixed pool of "
                                 "test notes); under all-pairs the pool is whatever notes a run embedded")
        if spec.kind == "tower":
            ids, emb, info = refs.tower_vectors(spec.arg, spec.name)
            rr = rank_run(task, ids, emb, backend=backend, name=f"{spec.name} ({spec.arg})", image_probe=True)
            add(spec.name, rr, {"kind": "reference", "reference": "tower", **info})
            continue
        if catalog_notes is None:
            raise EvalInputError(f"--reference {spec.name}: needs --catalog (the notes' text and categories)")
        ref = refs.build_score_reference(spec, catalog_notes, catalog_path, task.pool_ids)
        rr = rank_scores(task, ref, f"{spec.name} (catalog {catalog_path})")
        add(spec.name, rr, {"kind": "reference", "reference": spec.kind})
    if len(report["runs"]) == 1:  # the flat keys of the single-run report (scripts read them)
        r = report["runs"][0]
        report.update(recall=r["subsets"]["all"]["recall"], num_pairs=r["num_queries"],
                      num_skipped=r["num_skipped"], pool_size=r["pool_size"], mean_rank=r["mean_rank"])
    if baseline is not None:
        report["paired"] = paired_runs(report, baseline)
    return report


# ------------------------------------------------------------------------- the single-set API
@dataclass
class RecallReport:
    recall: dict  # K -> recall
    num_pairs: int
    num_skipped: int  # pairs with a note missing from the pool
    pool_size: int
    mean_rank: float  # 1-based rank of the target, averaged (its expectation under fair ties)

    def as_dict(self) -> dict:
        return {"recall": {str(k): v for k, v in self.recall.items()}, "num_pairs": self.num_pairs,
                "num_skipped": self.num_skipped, "pool_size": self.pool_size, "mean_rank": self.mean_rank}


def target_ranks(pool: torch.Tensor, query_idx: torch.Tensor, target_idx: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each pair's target among the pool minus the query itself (all-pairs), every tie
    counted against the target. pool: [P, d] embeddings; query_idx, target_idx: [M] rows of `pool`."""
    q = torch.as_tensor(query_idx, dtype=torch.long)
    return search.target_ranks(pool[q], pool, target_idx, exclude=q, query_chunk=min(chunk, search.QUERY_CHUNK))


def recall_at_k(pool: torch.Tensor, pool_ids: list[str], pairs: list[tuple[str, str]], k_values: list[int],
                ties: str = "fair") -> RecallReport:
    """All-pairs Recall@K of one embedding set (no subsets, no intervals), ties by `ties`."""
    rr = rank_run(all_pairs_task(pairs), pool_ids, pool, name="recall_at_k")
    skipped = rr.num_skipped + sum(1 for q, t in pairs if q == t)
    ks = sorted(k_values)
    recall, _, _ = metrics.tie_metrics(rr.greater, rr.equal, ks, ties)
    place = rr.greater + (rr.equal / 2.0 if ties == "fair" else rr.equal) + 1
    return RecallReport({k: float(recall[:, j].mean()) for j, k in enumerate(ks)}, len(rr.greater), skipped,
                        len(pool_ids), float(place.mean()))


# ----------------------------------------------------------------------------- embedding files
# Storage dtypes of embeddings.npy (`notellm2 embed --dtype`). The vectors are computed in the model's
# dtype and kept as float32 until written; float16 only halves the file (unit vectors, about 3
# significant digits); readers upcast to float32.
EMBEDDING_DTYPES = ("float32", "float16")


class EmbeddingsError(UserError, ValueError):
    """An embeddings folder that cannot be read as one (one line, naming the file)."""


def _replace_all(pairs: list[tuple[str, str]]) -> None:
    for tmp, final in pairs:
        commit_file(tmp, final)


def save_embedding_chunks(out_dir: str, ids: list[str], dim: int, chunks, meta: dict | None = None,
                          dtype: str = "float32") -> None:
    """Write `embeddings.npy` ([len(ids), dim] in `dtype`), `ids.txt` and `embeddings.json` from `chunks`
    (arrays of rows, in `ids` order) without holding all rows at once: the rows stream into a memory
    map of a temporary file. Each file is written to a temporary name beside it and moved into place
    (`os.replace`), `embeddings.json` last, so a killed writer leaves an old file or a whole new one.
    The bytes are those of `np.save` of the same array."""
    if dtype not in EMBEDDING_DTYPES:
        raise EmbeddingsError(f"embeddings dtype {dtype!r}: allowed {', '.join(EMBEDDING_DTYPES)}")
    os.makedirs(out_dir, exist_ok=True)
    npy, ids_txt, info = (os.path.join(out_dir, n) for n in ("embeddings.npy", "ids.txt", "embeddings.json"))
    shape = (len(ids), int(dim))
    if shape[0] * shape[1] == 0:  # a memory map of nothing cannot be opened
        with open(npy + ".tmp", "wb") as fh:
            np.save(fh, np.zeros(shape, dtype))
    else:
        out = np.lib.format.open_memmap(npy + ".tmp", mode="w+", dtype=np.dtype(dtype), shape=shape)
        row = 0
        for chunk in chunks:
            chunk = np.asarray(chunk)
            if chunk.ndim != 2 or chunk.shape[1] != shape[1] or row + len(chunk) > shape[0]:
                raise ValueError(f"save_embedding_chunks: a chunk of shape {chunk.shape} at row {row} does "
                                 f"not fit [{shape[0]}, {shape[1]}]")
            out[row:row + len(chunk)] = chunk.astype(dtype, copy=False)
            row += len(chunk)
        if row != shape[0]:
            raise ValueError(f"save_embedding_chunks: {row} rows for {shape[0]} ids")
        out.flush()
        del out
    with open(ids_txt + ".tmp", "w") as fh:
        fh.write("\n".join(ids) + "\n")
    with open(info + ".tmp", "w") as fh:
        json.dump({"count": len(ids), "dim": shape[1], "dtype": dtype, **(meta or {})}, fh, indent=2)
    _replace_all([(npy + ".tmp", npy), (ids_txt + ".tmp", ids_txt), (info + ".tmp", info)])


def save_embeddings(out_dir: str, ids: list[str], emb: np.ndarray, meta: dict | None = None,
                    dtype: str = "float32") -> None:
    """`embeddings.npy` (`emb` stored as `dtype`: float32, or float16 for half the file), `ids.txt`,
    `embeddings.json`; each file moved into place whole (see save_embedding_chunks)."""
    emb = np.asarray(emb)
    dim = int(emb.shape[1]) if emb.ndim == 2 else 0
    save_embedding_chunks(out_dir, ids, dim, [emb] if emb.ndim == 2 else [], meta, dtype)


def load_embeddings(emb_dir: str) -> tuple[list[str], torch.Tensor]:
    """(ids, float32 [N, dim] tensor) of an embeddings folder; a float16 file is upcast to float32."""
    path = os.path.join(emb_dir, "embeddings.npy")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no embeddings (run `notellm2 embed --out {emb_dir}` first)")
    try:
        emb = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EmbeddingsError(f"{path}: not a readable .npy array ({e})") from None
    if emb.ndim != 2:
        raise EmbeddingsError(f"{path}: expected a 2-D [notes, dim] array, got shape {tuple(emb.shape)}")
    if emb.dtype not in (np.float16, np.float32, np.float64):
        raise EmbeddingsError(f"{path}: dtype {emb.dtype}; embeddings are float32 or float16")
    ids_path = os.path.join(emb_dir, "ids.txt")
    if not os.path.exists(ids_path):
        raise FileNotFoundError(f"{ids_path}: no ids beside embeddings.npy")
    with open(ids_path) as fh:
        ids = [line.rstrip("\n") for line in fh if line.strip()]
    if len(ids) != len(emb):
        raise EmbeddingsError(f"{emb_dir}: {len(ids)} ids in ids.txt but {len(emb)} rows in embeddings.npy")
    return ids, torch.from_numpy(np.asarray(emb, dtype=np.float32))
