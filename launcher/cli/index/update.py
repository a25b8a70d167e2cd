"""`notellm2 index update`: a new version of an index and its related-notes table from a day's embedding
set: new and changed notes added, deleted ones removed, lists updated rather than rebuilt
(docs/new_notes.md)."""
from __future__ import annotations

from notellm2.launcher.cli.index.build import add_search_args


def _run(args) -> int:
    from notellm2.launcher.eval.index import update_command

    return update_command(args.index, args.embeddings, args.out, chunk=args.chunk, restart=args.restart)


def register(sub) -> None:
    p = sub.add_parser("update", help="update an index and its related-notes table to a new embedding set")
    p.add_argument("--index", required=True, help="the current index folder (left as it is)")
    p.add_argument("--embeddings", required=True, help="today's embedding set (`notellm2 embed --base`), same model")
    p.add_argument("--out", required=True, help="the new version's folder (must not exist)")
    add_search_args(p)
    p.set_defaults(handler=_run)
