"""`notellm2 neighbors`: the related-notes table (each note's top-k nearest notes), the I2I recall
list a recommender serves, on one process or several ranks (docs/evaluation.md, docs/new_notes.md)."""
from __future__ import annotations

# Mirror of notellm2.launcher.eval.index.NEIGHBOR_BACKENDS (that module imports torch; tests/launcher/eval/
# test_index.py checks they agree).
BACKENDS = ("exact", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw")


def _run(args) -> int:
    from notellm2.launcher.eval.index import neighbors_command

    return neighbors_command(args.embeddings, args.out, args.k, backend=args.backend, chunk=args.chunk,
                             restart=getattr(args, "restart", False))


def register(sub) -> None:
    p = sub.add_parser("neighbors", help="each note's top-k related notes by cosine, as a parquet table "
                                         "(one process or several ranks)")
    p.add_argument("--embeddings", required=True, help="folder written by `notellm2 embed`")
    p.add_argument("--k", type=int, default=100, help="neighbours per note")
    p.add_argument("--out", required=True, help="parquet file: note_id, neighbor_id, rank (1 = nearest), score")
    p.add_argument("--backend", default="exact", choices=BACKENDS)
    p.add_argument("--chunk", type=int, default=4096,
                   help="notes searched per part (OUT.parts/neighbors-<C>.npz); chunks go to the ranks in turn")
    p.add_argument("--restart", action="store_true", help="discard the parts a killed run left in OUT.parts")
    p.set_defaults(handler=_run)
