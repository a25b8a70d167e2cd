"""The I2I Recall@K protocol (NoteLLM / NoteLLM-2).

For every related pair (q, t) of the evaluation split whose two notes are both in the pool, the
query note q ranks every note of the pool except itself by cosine similarity; the pair is a hit at
K when t is among the first K. Recall@K is the fraction of pairs that hit. Ties are broken against
the target (a note scoring exactly as the target counts as ranked before it), so a constant encoder
scores no better than chance.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RecallReport:
    recall: dict  # K -> recall
    num_pairs: int
    num_skipped: int  # pairs with a note missing from the pool
    pool_size: int
    mean_rank: float  # 1-based rank of the target, averaged

    def as_dict(self) -> dict:
        return {"recall": {str(k): v for k, v in self.recall.items()}, "num_pairs": self.num_pairs,
                "num_skipped": self.num_skipped, "pool_size": self.pool_size, "mean_rank": self.mean_rank}


def target_ranks(pool: torch.Tensor, query_idx: torch.Tensor, target_idx: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """0-based rank of each pair's target among the pool minus the query itself.

    pool: [P, d] L2-normalised embeddings. query_idx, target_idx: [M] rows of `pool`.
    """
    pool = pool.float()
    ranks = torch.empty(len(query_idx), dtype=torch.long)
    for s in range(0, len(query_idx), chunk):
        q = query_idx[s:s + chunk]
        t = target_idx[s:s + chunk]
        scores = pool[q] @ pool.T  # [m, P]
        tgt = scores.gather(1, t[:, None])  # [m, 1]
        ahead = scores >= tgt  # ties count against the target
        ahead[torch.arange(len(q)), q] = False  # the query itself is not a candidate
        ahead[torch.arange(len(q)), t] = False  # nor is the target ahead of itself
        ranks[s:s + chunk] = ahead.sum(1)
    return ranks


def recall_at_k(pool: torch.Tensor, pool_ids: list[str], pairs: list[tuple[str, str]], k_values: list[int]) -> RecallReport:
    index = {nid: i for i, nid in enumerate(pool_ids)}
    if len(index) != len(pool_ids):
        raise ValueError("recall_at_k: the pool holds duplicate note ids")
    q_idx, t_idx, skipped = [], [], 0
    for q, t in pairs:
        if q in index and t in index and q != t:
            q_idx.append(index[q])
            t_idx.append(index[t])
        else:
            skipped += 1
    if not q_idx:
        raise ValueError(f"recall_at_k: none of the {len(pairs)} pairs has both notes in the pool of {len(pool_ids)}")
    ranks = target_ranks(pool, torch.tensor(q_idx), torch.tensor(t_idx))
    recall = {k: int((ranks < k).sum()) / len(ranks) for k in sorted(k_values)}
    return RecallReport(recall, len(q_idx), skipped, len(pool_ids), float(ranks.float().mean() + 1))


def save_embeddings(out_dir: str, ids: list[str], emb: np.ndarray, meta: dict | None = None) -> None:
    os.makedirs(out_dir, exist_ok=True)
    np.save(os.path.join(out_dir, "embeddings.npy"), emb.astype(np.float32))
    with open(os.path.join(out_dir, "ids.txt"), "w") as fh:
        fh.write("\n".join(ids) + "\n")
    with open(os.path.join(out_dir, "embeddings.json"), "w") as fh:
        json.dump({"count": len(ids), "dim": int(emb.shape[1]) if emb.ndim == 2 else 0, **(meta or {})}, fh, indent=2)


def load_embeddings(emb_dir: str) -> tuple[list[str], torch.Tensor]:
    emb = np.load(os.path.join(emb_dir, "embeddings.npy"))
    with open(os.path.join(emb_dir, "ids.txt")) as fh:
        ids = [line.rstrip("\n") for line in fh if line.strip()]
    if len(ids) != len(emb):
        raise ValueError(f"{emb_dir}: {len(ids)} ids but {len(emb)} embeddings")
    return ids, torch.from_numpy(emb)
