"""`notellm2 neighbors`: the related-notes table (each note's top-k nearest notes), the I2I recall
list a recommender serves (docs/evaluation.md)."""
from __future__ import annotations

import sys


def _run(args) -> int:
    from tqdm import tqdm

    from notellm2.launcher.eval.evaluate import load_embeddings
    from notellm2.launcher.eval.search import write_related_table

    try:
        ids, emb = load_embeddings(args.embeddings)
        with tqdm(total=len(ids), desc="neighbors", unit="note", file=sys.stderr) as bar:
            info = write_related_table(ids, emb, args.out, args.k, backend=args.backend,
                                       query_chunk=args.chunk, progress=bar.update)
        if "recall_vs_exact" in info:
            print(f"[neighbors] {args.backend} recall@{args.k} against exact search on "
                  f"{min(1000, len(ids))} notes: {info['recall_vs_exact']:.4f}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"notellm2 neighbors: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {info['rows']} rows ({info['notes']} notes x top {info['k']}, {info['backend']})")
    return 0


def register(sub) -> None:
    from notellm2.launcher.cli.eval import BACKENDS

    p = sub.add_parser("neighbors", help="each note's top-k related notes by cosine, as a parquet table")
    p.add_argument("--embeddings", required=True, help="folder written by `notellm2 embed`")
    p.add_argument("--k", type=int, default=100, help="neighbours per note")
    p.add_argument("--out", required=True, help="parquet file: note_id, neighbor_id, rank (1 = nearest), score")
    p.add_argument("--backend", default="exact", choices=BACKENDS)
    p.add_argument("--chunk", type=int, default=4096, help="notes searched (and written) per step")
    p.set_defaults(handler=_run)
