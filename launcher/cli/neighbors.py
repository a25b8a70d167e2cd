"""`notellm2 neighbors`: the related-notes table (each note's top-k nearest notes), the I2I recall
list a recommender serves (docs/evaluation.md)."""
from __future__ import annotations

import sys


class _Counter:
    """A progress bar: tqdm when installed, else a line on stderr every tenth of the way."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.next = total, 0, max(1, total // 10)
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="note", file=sys.stderr)
        except ImportError:
            self.bar = None
            self.desc = desc

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.done >= self.next or self.done == self.total:
            print(f"{self.desc}: {self.done}/{self.total} notes", file=sys.stderr, flush=True)
            self.next = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(args) -> int:
    from launcher.evaluate import load_embeddings
    from launcher.search import write_related_table

    try:
        ids, emb = load_embeddings(args.embeddings)
        bar = _Counter(len(ids), "neighbors")
        try:
            info = write_related_table(ids, emb, args.out, args.k, backend=args.backend,
                                       query_chunk=args.chunk, progress=bar)
        finally:
            bar.close()
        if "recall_vs_exact" in info:
            print(f"[neighbors] {args.backend} recall@{args.k} against exact search on "
                  f"{min(1000, len(ids))} notes: {info['recall_vs_exact']:.4f}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"notellm2 neighbors: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {info['rows']} rows ({info['notes']} notes x top {info['k']}, {info['backend']})")
    return 0


def register(sub) -> None:
    from launcher.cli.eval import BACKENDS

    p = sub.add_parser("neighbors", help="each note's top-k related notes by cosine, as a parquet table")
    p.add_argument("--embeddings", required=True, help="folder written by `notellm2 embed`")
    p.add_argument("--k", type=int, default=100, help="neighbours per note")
    p.add_argument("--out", required=True, help="parquet file: note_id, neighbor_id, rank (1 = nearest), score")
    p.add_argument("--backend", default="exact", choices=BACKENDS)
    p.add_argument("--chunk", type=int, default=4096, help="notes searched (and written) per step")
    p.set_defaults(handler=_run)
