"""`notellm2 eval`: I2I Recall@K of one or more embedding sets on a split of mined pairs
(docs/evaluation.md)."""
from __future__ import annotations

import os
import sys

# The choices, spelled here so that building the CLI imports no torch (tests/launcher/eval/test_eval_cli.py
# checks they equal notellm2.launcher.eval.evaluate's and notellm2.launcher.eval.search's).
PROTOCOLS = ("paper", "all-pairs")
BACKENDS = ("exact", "faiss-ivf", "faiss-hnsw")
DEFAULT_KS = (10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """`name=dir` or a bare `dir` (named by its folder); names must be distinct."""
    from notellm2.launcher.cli import parse_named_dirs

    return parse_named_dirs(specs, "--embeddings")


def catalog_lengths(path: str) -> dict:
    """note_id -> characters of title + content."""
    from notellm2.data_shards.catalog.notes import load_catalog

    return {n.note_id: len(n.title) + len(n.content) for n in load_catalog(path)}


def build_task(args):
    from notellm2.data_shards.mining.pairs_file import read_note_split, read_pairs
    from notellm2.launcher.eval.evaluate import all_pairs_task, paper_task

    df = read_pairs(args.pairs, split=args.split, columns=["query_id", "target_id"])
    if df.empty:
        raise ValueError(f"{args.pairs}: no pairs in split {args.split!r}")
    pairs = list(zip(df["query_id"], df["target_id"]))
    if args.protocol == "all-pairs":
        return all_pairs_task(pairs)
    notes = read_note_split(args.pairs)
    test_notes = notes.loc[notes["split"] == args.split, "note_id"].tolist()
    if not test_notes:
        raise ValueError(f"{args.pairs}: note_split.parquet assigns no note to {args.split!r}")
    return paper_task(pairs, test_notes)


def _run(args) -> int:
    from notellm2.data_shards.mining.pairs_file import read_pairs
    from notellm2.launcher.eval import report as rep
    from notellm2.launcher.eval.evaluate import evaluate_runs, train_pair_counts

    try:
        runs = parse_runs(args.embeddings)
        if not 0.0 < args.length_quantile < 1.0:
            raise ValueError(f"--length-quantile {args.length_quantile}: must be strictly between 0 and 1")
        for _, emb_dir in runs:  # the user's paths first, before any pairs file is read
            if not os.path.exists(os.path.join(emb_dir, "embeddings.npy")):
                raise FileNotFoundError(f"{os.path.join(emb_dir, 'embeddings.npy')}: no embeddings "
                                        f"(run `notellm2 embed --out {emb_dir}` first)")
        task = build_task(args)
        lengths = catalog_lengths(args.catalog) if args.catalog else None
        try:
            train = read_pairs(args.pairs, split="train", columns=["query_id", "target_id"])
            counts = train_pair_counts(zip(train["query_id"], train["target_id"]))
        except ValueError:  # no training pairs in the file: no cold-start/head/tail subsets
            counts = None
        report = evaluate_runs(runs, task, ks=args.k, lengths=lengths, length_quantile=args.length_quantile,
                               train_counts=counts, backend=args.backend, resamples=args.bootstrap,
                               seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"notellm2 eval: {e}", file=sys.stderr)
        return 2
    report.update(split=args.split, pairs=os.path.abspath(args.pairs))
    print(rep.format_table(report))
    for line in rep.notes_lines(report):
        print(line)
    if args.out:
        rep.write_json(report, args.out)
    if args.out_dir:
        rep.write_json(report, os.path.join(args.out_dir, "eval.json"))
        rep.write_markdown(report, os.path.join(args.out_dir, "eval.md"))
        rep.plot_recall(report, os.path.join(args.out_dir, "recall.png"))
        rep.write_tensorboard(report, os.path.join(args.out_dir, "tensorboard"))
        print(f"wrote {args.out_dir}/eval.json, eval.md, recall.png, tensorboard/")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="I2I Recall@K of one or more embedding sets on a split of mined pairs")
    p.add_argument("--embeddings", required=True, nargs="+", metavar="[NAME=]DIR",
                   help="folders written by `notellm2 embed`, each optionally named (default: the folder name)")
    p.add_argument("--pairs", required=True, help="folder (or pairs.parquet) written by `notellm2 data mine-pairs`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS,
                   help="paper: test notes only, each note in one pair, pool = test notes minus queries; "
                        "all-pairs: every pair, pool = every embedded note (the cold-start view)")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="Recall@K cut-offs")
    p.add_argument("--catalog", help="the catalog, for the short/long subsets (characters of title + content)")
    p.add_argument("--length-quantile", type=float, default=0.5,
                   help="short/long threshold: this quantile of the evaluated notes' lengths")
    p.add_argument("--backend", default="exact", choices=BACKENDS,
                   help="search; the faiss ones report K <= 1000 only, with their recall against exact search")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over queries")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--out-dir", help="write eval.json, eval.md, recall.png and tensorboard/ here")
    p.set_defaults(handler=_run)
