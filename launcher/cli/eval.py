"""`notellm2 eval`: the I2I Recall@K protocol on exported embeddings and a split of mined pairs."""
from __future__ import annotations

import json
import os


def read_split_pairs(pairs_dir: str, split: str) -> list[tuple[str, str]]:
    import pandas as pd

    path = os.path.join(pairs_dir, "pairs.parquet") if os.path.isdir(pairs_dir) else pairs_dir
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no pairs file (run `notellm2 data mine-pairs` first)")
    df = pd.read_parquet(path, columns=["query_id", "target_id", "split"])
    df = df[df["split"] == split]
    if df.empty:
        raise ValueError(f"{path}: no pairs in split {split!r}")
    return list(zip(df["query_id"].astype(str), df["target_id"].astype(str)))


def _run(args) -> int:
    from launcher.evaluate import load_embeddings, recall_at_k

    ids, emb = load_embeddings(args.embeddings)
    pairs = read_split_pairs(args.pairs, args.split)
    report = recall_at_k(emb, ids, pairs, args.k)
    out = {"split": args.split, "embeddings": os.path.abspath(args.embeddings), **report.as_dict()}
    for k, v in report.recall.items():
        print(f"Recall@{k}: {v:.4f}")
    print(f"pairs evaluated: {report.num_pairs} (skipped {report.num_skipped}), pool: {report.pool_size}, "
          f"mean target rank: {report.mean_rank:.1f}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=2)
        os.replace(tmp, args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="I2I Recall@K of exported embeddings on a split of mined pairs")
    p.add_argument("--embeddings", required=True, help="folder written by `notellm2 embed`")
    p.add_argument("--pairs", required=True, help="folder (or pairs.parquet) written by `notellm2 data mine-pairs`")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--k", type=int, nargs="+", default=[10, 100, 1000], help="Recall@K cut-offs")
    p.add_argument("--out", help="write the report as JSON here")
    p.set_defaults(handler=_run)
