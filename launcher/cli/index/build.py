"""`notellm2 index build`: a search index over an embedding set, saved with its parameters and the model's
fingerprint, and each note's list of k + r nearest notes (docs/new_notes.md)."""
from __future__ import annotations

# Mirror of notellm2.launcher.eval.index.INDEX_BACKENDS (checked by tests/launcher/eval/test_index.py).
BACKENDS = ("exact", "faiss-ivf", "faiss-ivfpq")


def _run(args) -> int:
    from notellm2.launcher.eval.index import TableSettings, build_command, default_reserve

    st = TableSettings(k=args.k, reserve=default_reserve(args.k) if args.reserve is None else args.reserve,
                       drop_duplicates=args.drop_duplicates, backend=args.backend, nlist=args.nlist,
                       nprobe=args.nprobe, pq_m=args.pq_m, seed=args.seed)
    return build_command(args.embeddings, args.out, st, chunk=args.chunk, restart=args.restart)


def add_search_args(p) -> None:
    p.add_argument("--chunk", type=int, default=4096, help="notes searched per part (OUT.parts/*.npz); parts go to "
                                                          "the ranks in turn")
    p.add_argument("--restart", action="store_true", help="discard the parts a killed run left in OUT.parts")


def register(sub) -> None:
    p = sub.add_parser("build", help="build a search index and its related-notes table from an embedding set")
    p.add_argument("--embeddings", required=True, help="folder written by `notellm2 embed`")
    p.add_argument("--out", required=True, help="index folder (must not exist: one folder per version)")
    p.add_argument("--backend", default="exact", choices=BACKENDS,
                   help="exact (vectors), faiss-ivf (IVF-Flat) or faiss-ivfpq (IVF-PQ, for large catalogs); HNSW "
                        "cannot remove vectors, so it is no index backend")
    p.add_argument("--k", type=int, default=100, help="related notes served per note (default 100)")
    p.add_argument("--reserve", type=int, default=None,
                   help="extra entries kept per list, so that a deletion rarely forces a re-search "
                        "(default max(5, ceil(k / 5)))")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="leave a note's exact duplicates (same content hash: re-posts) out of its list")
    p.add_argument("--nlist", type=int, default=None, help="faiss: inverted lists (default min(n/39, 4 sqrt(n)))")
    p.add_argument("--nprobe", type=int, default=16, help="faiss: lists searched per query (default 16)")
    p.add_argument("--pq-m", type=int, default=None, help="faiss-ivfpq: sub-quantisers of 8 bits (default dim/4)")
    p.add_argument("--seed", type=int, default=0, help="faiss: seed of the training sample")
    add_search_args(p)
    p.set_defaults(handler=_run)
