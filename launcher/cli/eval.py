"""`notellm2 eval`: I2I Recall@K, NDCG@K and MRR of one or more embedding sets and reference rows on a
split of mined pairs, with subsets, intervals and paired tests (docs/evaluation.md)."""
from __future__ import annotations

import os
import sys

# The choices, spelled here so that building the CLI imports no torch (tests/launcher/eval/test_eval_cli.py
# checks they equal notellm2.launcher.eval.evaluate's, .search's and .subsets').
PROTOCOLS = ("paper", "all-pairs")
BACKENDS = ("exact", "faiss-ivf", "faiss-hnsw")
DEFAULT_KS = (1, 5, 10, 20, 50, 100, 1000, 10_000, 100_000, 1_000_000)
TIES = ("fair", "pessimistic")
DEFAULT_TEXT_POOR_CHARS = 20


def parse_runs(specs: list[str]) -> list[tuple[str, str]]:
    """`name=dir` or a bare `dir` (named by its folder); names must be distinct."""
    from notellm2.launcher.cli import parse_named_dirs

    return parse_named_dirs(specs, "--embeddings")


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


def check_options(args) -> list:
    """The options alone (before any file is read): one-line errors naming the option."""
    from notellm2.launcher.eval.evaluate import EvalInputError
    from notellm2.launcher.eval.reference import parse_reference

    if not args.embeddings and not args.reference:
        raise EvalInputError("nothing to evaluate: give --embeddings, --reference or both")
    bad_k = [k for k in args.k if k < 1]
    if bad_k:
        raise EvalInputError(f"--k {bad_k[0]}: every K must be at least 1")
    if args.bootstrap < 1:
        raise EvalInputError(f"--bootstrap {args.bootstrap}: the intervals need at least 1 resample (default 1000)")
    if not 0.0 < args.length_quantile < 1.0:
        raise EvalInputError(f"--length-quantile {args.length_quantile}: must be strictly between 0 and 1")
    if args.text_poor_chars < 1:
        raise EvalInputError(f"--text-poor-chars {args.text_poor_chars}: must be at least 1")
    refs = [parse_reference(s) for s in args.reference or []]
    names = [n for n, _ in parse_runs(args.embeddings or [])] + [r.name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalInputError(f"run name {dup[0]!r} given twice (name them: name=dir, NAME=KIND)")
    if args.baseline is not None and args.baseline not in names:
        raise EvalInputError(f"--baseline {args.baseline!r}: no run of that name (runs: {', '.join(names)})")
    if args.baseline is not None and len(names) < 2:
        raise EvalInputError(f"--baseline {args.baseline!r}: a paired test needs a second run")
    return refs


def _run(args) -> int:
    from notellm2.data_shards.catalog.notes import load_catalog
    from notellm2.data_shards.mining.pairs_file import read_pairs
    from notellm2.launcher.eval import report as rep
    from notellm2.launcher.eval.evaluate import evaluate_runs, train_pair_counts
    from notellm2.launcher.eval.subsets import exact_duplicate_stats, text_chars

    try:
        refs = check_options(args)
        runs = parse_runs(args.embeddings or [])
        for _, emb_dir in runs:  # the user's paths first, before any pairs file is read
            if not os.path.exists(os.path.join(emb_dir, "embeddings.npy")):
                raise FileNotFoundError(f"{os.path.join(emb_dir, 'embeddings.npy')}: no embeddings "
                                        f"(run `notellm2 embed --out {emb_dir}` first)")
        task = build_task(args)
        notes = load_catalog(args.catalog) if args.catalog else None
        catalog = {n.note_id: n for n in notes} if notes is not None else None
        lengths = {nid: text_chars(n) for nid, n in catalog.items()} if catalog is not None else None
        try:
            train = read_pairs(args.pairs, split="train", columns=["query_id", "target_id"])
            counts = train_pair_counts(zip(train["query_id"], train["target_id"]))
        except ValueError:  # no training pairs in the file: no cold-start/head/tail subsets
            counts = None
        if catalog is not None and counts is not None:
            test_notes = task.pool_ids + task.query_ids if task.pool_ids is not None else \
                sorted(set(task.query_ids) | set(task.target_ids))
            task.stats.update(exact_duplicate_stats(test_notes, counts, catalog), training_notes=len(counts))
        report = evaluate_runs(runs, task, ks=args.k, lengths=lengths, length_quantile=args.length_quantile,
                               train_counts=counts, backend=args.backend, resamples=args.bootstrap,
                               seed=args.seed, log=lambda m: print(m, file=sys.stderr), ties=args.ties,
                               text_poor_chars=args.text_poor_chars, references=refs, catalog_notes=notes,
                               catalog_path=args.catalog or "", baseline=args.baseline)
    except (ValueError, FileNotFoundError) as e:
        print(f"notellm2 eval: {e}", file=sys.stderr)
        return 2
    report.update(split=args.split, pairs=os.path.abspath(args.pairs))
    print(rep.format_table(report))
    for line in rep.notes_lines(report):
        print(line)
    if report.get("paired"):
        print(rep.format_paired(report))
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
    p = sub.add_parser("eval", help="I2I Recall@K, NDCG@K and MRR of embedding sets and reference rows on a split "
                                    "of mined pairs")
    p.add_argument("--embeddings", nargs="+", default=[], metavar="[NAME=]DIR",
                   help="folders written by `notellm2 embed`, each optionally named (default: the folder name)")
    p.add_argument("--reference", nargs="+", default=[], metavar="[NAME=]KIND[:ARG]",
                   help="rows without training: bm25 (needs --catalog), category (the category oracle, needs "
                        "--catalog), tower:CACHE_DIR (the frozen tower's pooled features from `notellm2 data "
                        "cache-vision`); paper protocol only")
    p.add_argument("--pairs", required=True, help="folder (or pairs.parquet) written by `notellm2 data mine-pairs`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--protocol", default="paper", choices=PROTOCOLS,
                   help="paper: test notes only, each note in one pair, pool = test notes minus queries; "
                        "all-pairs: every pair, pool = every embedded note (the cold-start view)")
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_KS), help="Recall@K and NDCG@K cut-offs")
    p.add_argument("--ties", default="fair", choices=TIES,
                   help="fair (default): the expectation under random tie-breaking (a constant encoder scores "
                        "chance); pessimistic: every tie counted against the target")
    p.add_argument("--catalog", help="the catalog: the short/long and text_poor/text_rich subsets, the duplicate "
                                     "count, and the bm25 and category references")
    p.add_argument("--length-quantile", type=float, default=0.5,
                   help="short/long threshold: this quantile of the evaluated notes' lengths (title + topics + content)")
    p.add_argument("--text-poor-chars", type=int, default=DEFAULT_TEXT_POOR_CHARS,
                   help=f"text_poor: the query or the target has fewer characters of title + topics + content "
                        f"(default {DEFAULT_TEXT_POOR_CHARS})")
    p.add_argument("--baseline", metavar="NAME",
                   help="print (and report) the paired bootstrap of every other run minus this one, per subset and K")
    p.add_argument("--backend", default="exact", choices=BACKENDS,
                   help="search; the faiss ones report K <= 1000 only, with their recall against exact search "
                        "(ties as the index returns them)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over queries")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--out-dir", help="write eval.json, eval.md, recall.png and tensorboard/ here")
    p.set_defaults(handler=_run)
