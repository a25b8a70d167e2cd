"""The loss's recommendation-aware negative options (modeling/loss.py): the logQ correction and
known-positive masking, checked against hand-written definitions; the 2-rank gathered versions
against one process on the concatenated batch (real gloo processes)."""
from __future__ import annotations

import math

import pytest
import torch

from notellm2.modeling.config import LossConfig
from notellm2.modeling.loss import GatheredContrastiveLoss
from tests.helpers.multirank import run_ranks

PAD = -2  # notellm2.data_shards.writing.note_stats.KNOWN_PAD


def unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def local(**kw):
    return GatheredContrastiveLoss(LossConfig(init_scale=10, **kw), gather_fn=lambda x: x)


def ce(logits: list[float], pos: int) -> float:
    """-log softmax(logits)[pos], written out."""
    return -(logits[pos] - math.log(sum(math.exp(v) for v in logits)))


def test_logq_subtracts_each_columns_log_frequency_from_its_logit():
    """Per anchor a (partner p; no duplicates): CE over the columns j != a of 10 * <e_a, e_j> - log q_j."""
    n, scale = 8, 10.0
    emb, ids = unit(n, seed=1), torch.arange(100, 100 + n)
    logq = torch.log(torch.tensor([0.30, 0.05, 0.10, 0.05, 0.20, 0.10, 0.15, 0.05]))
    out = local(logq_correction=True)(emb, ids, logq=logq)
    for a in range(n):
        p = (a + n // 2) % n
        cols = [j for j in range(n) if j != a]
        logits = [scale * float(emb[a] @ emb[j]) - float(logq[j]) for j in cols]
        assert out["per_anchor"][a].item() == pytest.approx(ce(logits, cols.index(p)), rel=1e-5, abs=1e-6)
    # without the option the same inputs give the plain loss, which differs
    plain = local()(emb, ids, logq=logq)
    assert abs(plain["loss"].item() - out["loss"].item()) > 1e-2
    # a uniform q shifts every logit by the same constant: the loss is the plain one
    flat = local(logq_correction=True)(emb, ids, logq=torch.full((n,), math.log(1 / 16)))
    assert flat["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-6)


def test_a_known_positive_column_is_deleted_but_the_partner_stays():
    """Two related pairs (A, B) and (C, D) with C a known positive of A (and B, A's partner, listed too):
    A's per-anchor loss equals the CE computed with C's column deleted; the others are unchanged."""
    n, scale = 8, 10.0
    emb = unit(n, seed=2)
    ids = torch.tensor([1, 3, 5, 7, 2, 4, 6, 8])  # queries A=1, C=3, ...; targets B=2, D=4, ...
    known = torch.full((n, 2), PAD, dtype=torch.long)
    known[0] = torch.tensor([2, 3])  # A knows B (its partner) and C
    out = local(mask_known_positives=True)(emb, ids, known=known)
    plain = local()(emb, ids)
    a, p, c = 0, 4, 1
    cols = [j for j in range(n) if j not in (a, c)]  # self and C deleted, B (the partner) kept
    logits = [scale * float(emb[a] @ emb[j]) for j in cols]
    assert out["per_anchor"][a].item() == pytest.approx(ce(logits, cols.index(p)), rel=1e-5, abs=1e-6)
    assert out["per_anchor"][a].item() < plain["per_anchor"][a].item()  # one negative fewer
    torch.testing.assert_close(out["per_anchor"][1:], plain["per_anchor"][1:])
    # padding entries (-2) never match, not even the padding rows' -1
    ids_pad = ids.clone()
    ids_pad[3], ids_pad[7] = -1, -1
    none = local(mask_known_positives=True)(emb, ids_pad, known=torch.full((n, 3), PAD, dtype=torch.long))
    torch.testing.assert_close(none["per_anchor"], local()(emb, ids_pad)["per_anchor"])


def test_both_options_together_and_their_gradients_flow():
    n = 8
    emb = unit(n, seed=3).requires_grad_(True)
    ids = torch.arange(10, 10 + n)
    known = torch.full((n, 1), PAD, dtype=torch.long)
    known[2, 0] = 11
    logq = torch.log(torch.linspace(0.05, 0.2, n))
    out = local(logq_correction=True, mask_known_positives=True)(emb, ids, logq=logq, known=known)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and emb.grad.abs().max() > 1e-3
    # together they are each one's change: neither alone, nor the plain loss
    e = emb.detach()
    for other in (local()(e, ids), local(logq_correction=True)(e, ids, logq=logq),
                  local(mask_known_positives=True)(e, ids, known=known)):
        assert abs(other["loss"].item() - out["loss"].item()) > 1e-4


@pytest.mark.parametrize("key, kwargs", [("sample_logq", {"logq_correction": True}),
                                         ("known_pos", {"mask_known_positives": True})])
def test_an_option_without_its_batch_key_is_refused(key, kwargs):
    with pytest.raises(ValueError, match=rf"^loss\.\w+: the batch needs '{key}'"):
        local(**kwargs)(unit(4), torch.arange(4))


def test_two_ranks_match_one_process_with_both_options():
    """The column frequencies are gathered like the ids; each rank masks its own anchors' known positives:
    2 ranks x 3 pairs give the single-process loss and embedding gradients of the 6 pairs."""
    res = run_ranks("tests.modeling.dist_cases:negative_options_match_one_process", nproc=2, timeout=120)
    for rank in (0, 1):
        r = res.returns[rank]
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=1e-6), r
        assert r["ref_grad_max"] > 1e-2 and r["grad_max_diff"] < 1e-6, r
        assert abs(r["plain_loss"] - r["ref_loss"]) > 1e-3, r  # the options change the loss
