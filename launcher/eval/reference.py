"""Reference rows for `notellm2 eval --reference`: rankings that need no training, scored by the same
evaluation as the embedding runs (ties, subsets, intervals, paired tests; docs/evaluation.md).

    bm25        BM25 over the note text (title + topics + content) through `bm25s`: the query note's
                words against each pool note (asymmetric, so a score function rather than a vector per note)
    category    the category oracle: 1 for a pool note of the query's category, else 0 (the ceiling of
                category-level relevance under fair ties)
    tower:DIR   the frozen vision tower's own pooled feature from a `notellm2 data cache-vision` folder,
                L2-normalised, ranked by cosine; notes without a (good) image have no vector and are
                handled like the image probe's

A spec is `[NAME=]KIND[:ARG]`; the default name is `bm25`, `category` or `tower`.

A score-function reference gives `ScoreReference.block(rows, pool_rows)`, which `rank_scores` feeds to
notellm2.launcher.eval.search.score_counts: the same greater / equal counting as the embeddings.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from notellm2.errors import UserError, require
from notellm2.launcher.eval.subsets import note_text

KINDS = ("bm25", "category", "tower")


class ReferenceError(UserError, ValueError):
    """A reference row that cannot be built from what was given (names the option and the file)."""


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    kind: str
    arg: Optional[str] = None


def parse_reference(spec: str) -> ReferenceSpec:
    """`[NAME=]KIND[:ARG]` -> ReferenceSpec (a one-line ReferenceError naming the spec otherwise)."""
    name, sep, rest = spec.partition("=")
    if not sep:
        name, rest = "", spec
    kind, _, arg = rest.partition(":")
    if kind not in KINDS:
        raise ReferenceError(f"--reference {spec!r}: unknown kind {kind!r}; allowed: bm25, category, tower:CACHE_DIR")
    if kind == "tower" and not arg:
        raise ReferenceError(f"--reference {spec!r}: the tower reference needs its vision cache: tower:CACHE_DIR "
                             "(written by `notellm2 data cache-vision`)")
    if kind != "tower" and arg:
        raise ReferenceError(f"--reference {spec!r}: {kind} takes no argument")
    if sep and not name:
        raise ReferenceError(f"--reference {spec!r}: an empty name")
    return ReferenceSpec(name or kind, kind, arg or None)


# ------------------------------------------------------------------------- score references
class ScoreReference:
    """A ranking by a score function over (query note, pool note). `block(rows, pool_rows)` returns
    the float32 scores [len(rows), len(pool_rows)] of the query notes `rows` (indices into `ids`)."""

    ids: list[str]

    def block(self, rows: np.ndarray, pool_rows: np.ndarray) -> torch.Tensor:
        raise NotImplementedError


class CategoryOracle(ScoreReference):
    """1 for the same category, 0 otherwise; a note without a category matches nothing."""

    def __init__(self, notes: list, catalog: str):
        if not any(n.category for n in notes):
            raise ReferenceError(f"--reference category: the catalog {catalog} gives no note a category")
        self.ids = [n.note_id for n in notes]
        names = {c: i for i, c in enumerate(sorted({n.category for n in notes if n.category}))}
        # -1 - row: a note without a category gets a code no other note has
        self.codes = torch.tensor([names[n.category] if n.category else -1 - i for i, n in enumerate(notes)])

    def block(self, rows, pool_rows):
        q, p = self.codes[torch.as_tensor(rows)], self.codes[torch.as_tensor(pool_rows)]
        return (q[:, None] == p[None, :]).float()


class BM25Reference(ScoreReference):
    """BM25 (bm25s: Lucene's variant, k1 1.5, b 0.75) of the query note's words against each pool
    note's; words: lowercased runs of 2+ word characters, English stop words removed, no stemming.
    The corpus (document frequencies, lengths) is the pool. A note without words scores 0 against
    every note, and every note scores 0 against it."""

    def __init__(self, notes: list, pool_ids: list[str]):
        bm25s = require("bm25s", "bench", "the BM25 reference row (eval --reference bm25)")
        self.ids = [n.note_id for n in notes]
        index = {n: i for i, n in enumerate(self.ids)}
        self.pool_rows = np.array([index[n] for n in pool_ids], dtype=np.int64)
        self.pool_at = np.full(len(self.ids), -1, dtype=np.int64)  # note row -> column of the corpus
        self.pool_at[self.pool_rows] = np.arange(len(self.pool_rows))
        words = bm25s.tokenize([note_text(n) for n in notes], stopwords="en", return_ids=False, show_progress=False)
        self.words = [list(w) for w in words]
        corpus = [self.words[r] for r in self.pool_rows]
        self.retriever = None
        if any(corpus):  # bm25s cannot index a corpus without a single word: then every score is 0
            self.retriever = bm25s.BM25()
            self.retriever.index(corpus, show_progress=False)
            self.vocab = {w for w in self.retriever.vocab_dict if w}
        self._last = threading.local()

    def _scores(self, row: int) -> np.ndarray:
        """The query note's scores against the whole pool, in pool order."""
        known = [w for w in self.words[row] if w in self.vocab] if self.retriever is not None else []
        if not known:
            return np.zeros(len(self.pool_rows), np.float32)
        return np.asarray(self.retriever.get_scores(known), dtype=np.float32)

    def block(self, rows, pool_rows):
        rows = np.asarray(rows)
        key = rows.tobytes()
        if getattr(self._last, "key", None) != key:  # several pool blocks per query chunk: score once
            self._last.key, self._last.scores = key, np.stack([self._scores(int(r)) for r in rows])
        cols = self.pool_at[np.asarray(pool_rows)]
        if (cols < 0).any():
            raise ValueError("BM25Reference: a pool note outside the corpus it was indexed on")
        return torch.from_numpy(np.ascontiguousarray(self._last.scores[:, cols]))


def build_score_reference(spec: ReferenceSpec, notes: list, catalog: str, pool_ids: list[str]) -> ScoreReference:
    if spec.kind == "category":
        return CategoryOracle(notes, catalog)
    if spec.kind == "bm25":
        return BM25Reference(notes, pool_ids)
    raise ValueError(f"{spec.kind} is not a score reference")


# -------------------------------------------------------------------------- the tower's features
def tower_vectors(cache_dir: str, name: str) -> tuple[list[str], torch.Tensor, dict]:
    """(note ids, L2-normalised float32 [N, Dp], info) of a vision cache's plain-orientation pooled
    features, for every note it holds a good image of (bad images are left out and counted)."""
    from notellm2.data_shards.vision_cache import VisionCache, VisionCacheError

    try:
        cache = VisionCache(cache_dir)
    except VisionCacheError as e:
        raise ReferenceError(f"--reference {name}: {e}") from None
    ids = [n for n, _ in sorted(cache.rows.items(), key=lambda kv: kv[1]) if n not in cache.bad]
    pooled = np.asarray(cache.arrays[1][0, [cache.rows[n] for n in ids]], dtype=np.float32)
    vectors = torch.nn.functional.normalize(torch.from_numpy(pooled), dim=1)
    info = {"cache": os.path.abspath(cache_dir), "tower_key": cache.key, "tower": cache.meta.get("tower"),
            "notes": len(ids), "bad_images_left_out": len(cache.bad)}
    return ids, vectors, info
