import torch
import torch.nn.functional as F

from launcher.evaluate import recall_at_k, target_ranks


def brute_force_rank(pool, q, t):
    scores = pool @ pool[q]
    return sum(1 for j in range(len(pool)) if j not in (q, t) and scores[j] >= scores[t])


def test_ranks_match_brute_force_and_exclude_the_query():
    g = torch.Generator().manual_seed(0)
    pool = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    q = torch.randint(0, 50, (40,), generator=g)
    t = (q + torch.randint(1, 50, (40,), generator=g)) % 50
    got = target_ranks(pool, q, t, chunk=7)
    want = [brute_force_rank(pool, int(a), int(b)) for a, b in zip(q, t)]
    assert got.tolist() == want


def test_recall_on_a_hand_built_pool():
    # a and b are near each other; c is far; d is between.
    pool = F.normalize(torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [0.5, 0.5]]), dim=1)
    ids = ["a", "b", "c", "d"]
    rep = recall_at_k(pool, ids, [("a", "b"), ("a", "c"), ("c", "d"), ("a", "zzz")], [1, 2, 3])
    # a->b rank 0; a->c: b and d ahead -> rank 2; c->d: ranks of others from c: d(-0.707) vs b(-0.99): d first -> rank 0
    assert rep.recall == {1: 2 / 3, 2: 2 / 3, 3: 1.0}
    assert rep.num_pairs == 3 and rep.num_skipped == 1 and rep.pool_size == 4


def test_constant_embeddings_score_no_better_than_last():
    pool = F.normalize(torch.ones(10, 4), dim=1)
    rep = recall_at_k(pool, [str(i) for i in range(10)], [("0", "1"), ("2", "3")], [1, 8, 9])
    assert rep.recall[1] == 0.0 and rep.recall[8] == 0.0 and rep.recall[9] == 1.0
