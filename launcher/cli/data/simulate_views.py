"""`notellm2 data simulate-views`: a simulated view log for a catalog that has none (demos, tests).

Users browse in sessions that mostly stay inside one of their two favourite categories
(`notellm2.data_shards.catalog.synthetic.make_synthetic_views`), so mined co-occurrence pairs are mostly
same-category: a stand-in for real logs, clearly not one. `--visual-browsing P` makes a session's next
in-category view, with probability P, one of the previous note's nearest notes by colour histogram, so
that relevance has a visual part too (docs/benchmark.md).
"""
from __future__ import annotations


from notellm2.launcher.cli import positive_int, probability


def _run(args) -> int:
    import pandas as pd

    from notellm2.data_shards.catalog.synthetic import make_synthetic_views
    from notellm2.outputs import OutputError

    if not args.out.endswith((".parquet", ".csv")):
        raise OutputError(f"--out {args.out}: the name must end in .parquet or .csv (the format of the view log)")
    path = make_synthetic_views(args.catalog, args.out, n_users=args.users, sessions_per_user=args.sessions_per_user,
                                views_per_session=args.views_per_session, p_in_category=args.p_in_category,
                                seed=args.seed, visual_browsing=args.visual_browsing,
                                visual_neighbours=args.visual_neighbours, progress=not args.no_progress,
                                overwrite=args.overwrite)
    n = len(pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path))
    print(f"wrote {n} simulated view events for {args.users} users to {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("simulate-views", help="simulate a view log (user_id, note_id, timestamp) over a catalog")
    p.add_argument("--catalog", required=True)
    p.add_argument("--out", required=True, help=".parquet or .csv")
    p.add_argument("--users", type=positive_int, default=2000)
    p.add_argument("--sessions-per-user", type=positive_int, default=4)
    p.add_argument("--views-per-session", type=positive_int, default=6)
    p.add_argument("--p-in-category", type=probability, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true",
                   help="replace a view log of other contents at --out (the same contents are left as they are)")
    p.add_argument("--visual-browsing", type=probability, default=0.0,
                   help="probability that a session's next in-category view is one of the previous note's nearest "
                        "notes by colour histogram (default 0: category only)")
    p.add_argument("--visual-neighbours", type=positive_int, default=5,
                   help="how many colour-nearest notes of the category a visual step chooses among (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (colour histograms)")
    p.set_defaults(handler=_run)
