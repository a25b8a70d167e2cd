import math

import pytest
import torch

from notellm2.modeling.config import LossConfig
from notellm2.modeling.loss import GatheredContrastiveLoss, gather_with_grad


def reference_per_anchor(emb, ids, scale):
    """Loops, no vectorisation: the definition written out."""
    n = emb.shape[0]
    b = n // 2
    out = []
    for a in range(n):
        p = (a + b) % n
        terms, pos = [], None
        for j in range(n):
            if j == a:
                continue
            if j != p and ids[j] in (ids[a], ids[p]):
                continue
            if j != p and ids[j] in ids[:j]:  # a later copy of a note counts once
                continue
            s = scale * float(emb[a] @ emb[j])
            terms.append(s)
            if j == p:
                pos = s
        out.append(-(pos - math.log(sum(math.exp(t) for t in terms))))
    return torch.tensor(out)


def unit(n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_temperature_parameter():
    loss = GatheredContrastiveLoss(LossConfig(init_scale=20, max_scale=100))
    assert isinstance(loss.log_scale, torch.nn.Parameter) and loss.log_scale.shape == (1,)
    assert loss.log_scale.requires_grad
    assert loss.scale().item() == pytest.approx(20.0)
    frozen = GatheredContrastiveLoss(LossConfig(learnable_temperature=False))
    assert not frozen.log_scale.requires_grad
    with pytest.raises(ValueError, match="loss.init_scale"):
        GatheredContrastiveLoss(LossConfig(init_scale=200, max_scale=100))


def test_forward_does_not_clamp_the_scale_so_its_gradient_survives_past_the_bound():
    """The bound is applied to the parameter after the optimizer step (notellm2.launcher.train.optim.clamp_temperature);
    a clamp inside forward would zero the gradient there and the scale could never come back."""
    loss = GatheredContrastiveLoss(LossConfig(init_scale=20, max_scale=100))
    with torch.no_grad():
        loss.log_scale.fill_(math.log(500.0))
    assert loss.scale().item() == pytest.approx(500.0, rel=1e-5)
    # Positives less similar than the negatives: a larger scale raises the loss, the gradient pushes it down.
    q = unit(4, seed=5)
    emb = torch.cat([q, -q])
    out = loss(emb, torch.arange(8))
    assert out["logit_scale"].item() == pytest.approx(500.0, rel=1e-5)
    out["loss"].backward()
    assert loss.log_scale.grad.item() > 1.0  # far from zero, and it points down (descent lowers log_scale)


def test_loss_matches_the_written_out_definition():
    emb = unit(8)
    ids = torch.tensor([10, 11, 12, 13, 20, 21, 22, 23])
    loss = GatheredContrastiveLoss(LossConfig(init_scale=20))
    out = loss(emb, ids)
    ref = reference_per_anchor(emb, ids.tolist(), 20.0)
    torch.testing.assert_close(out["per_anchor"], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], ref.mean(), atol=1e-5, rtol=1e-5)
    assert out["loss"].dtype == torch.float32
    # bf16 inputs: similarities and loss still in fp32.
    out16 = loss(emb.bfloat16(), ids)
    assert out16["loss"].dtype == torch.float32
    out["loss"].backward()
    assert loss.log_scale.grad is not None and loss.log_scale.grad.shape == (1,)


def _loss_and_grad(loss, emb, ids):
    emb = emb.clone().requires_grad_(True)
    out = loss(emb, ids)
    out["loss"].backward()
    return out, emb.grad


def test_duplicate_pair_gives_exactly_the_deduplicated_batch_loss_and_gradients():
    """Injecting a copy of a pair: the loss value and the gradients w.r.t. every embedding equal the
    de-duplicated batch's; the copy's rows get weight 0 (zero gradient)."""
    emb = unit(6, seed=1)  # pairs (0,3), (1,4), (2,5)
    ids = torch.tensor([100, 101, 102, 200, 201, 202])
    loss = GatheredContrastiveLoss(LossConfig())
    base, base_grad = _loss_and_grad(loss, emb, ids)
    assert base["kept"].all() and int(base["num_kept"]) == 6
    # Inject a copy of pair (q0, t0) as a 4th pair: queries [0,1,2,0'], targets [3,4,5,3'].
    dup_emb = torch.cat([emb[:3], emb[:1], emb[3:], emb[3:4]])
    dup_ids = torch.tensor([100, 101, 102, 100, 200, 201, 202, 200])
    dup, dup_grad = _loss_and_grad(loss, dup_emb, dup_ids)
    assert dup["kept"].tolist() == [True, True, True, False, True, True, True, False]
    assert int(dup["num_kept"]) == 6
    torch.testing.assert_close(dup["loss"], base["loss"], atol=1e-6, rtol=1e-6)
    originals = [0, 1, 2, 4, 5, 6]
    assert base_grad.abs().max() > 1e-2  # real gradients are compared
    torch.testing.assert_close(dup_grad[originals], base_grad, atol=1e-6, rtol=1e-5)
    assert dup_grad[[3, 7]].abs().max() == 0.0
    # The per-anchor CEs still follow the written-out definition (the copy behaves like the original).
    torch.testing.assert_close(dup["per_anchor"], reference_per_anchor(dup_emb, dup_ids.tolist(), 20.0), atol=1e-5, rtol=1e-5)
    # Negative control: the same rows with distinct ids are a different batch with a different loss.
    distinct = loss(dup_emb, torch.arange(8))
    assert abs(distinct["loss"].item() - base["loss"].item()) > 1e-3


def test_flipped_duplicate_pair_is_a_copy_too():
    """(t0, q0) after (q0, t0): both of its anchors already exist with the same partners."""
    emb = unit(6, seed=4)
    ids = torch.tensor([100, 101, 102, 200, 201, 202])
    loss = GatheredContrastiveLoss(LossConfig())
    base, base_grad = _loss_and_grad(loss, emb, ids)
    dup_emb = torch.cat([emb[:3], emb[3:4], emb[3:], emb[:1]])
    dup_ids = torch.tensor([100, 101, 102, 200, 200, 201, 202, 100])
    dup, dup_grad = _loss_and_grad(loss, dup_emb, dup_ids)
    # Column order decides which copy is first: the injected query t0 (column 3) precedes target t0
    # (column 4), so the original target row and the injected target q0 are the copies.
    assert dup["kept"].tolist() == [True, True, True, True, False, True, True, False]
    torch.testing.assert_close(dup["loss"], base["loss"], atol=1e-6, rtol=1e-6)
    # The gradient reaches the same notes (a note's copies are the same input): sum it per note id.
    per_note = torch.zeros(6, emb.shape[1]).index_add_(0, torch.tensor([0, 1, 2, 3, 3, 4, 5, 0]), dup_grad)
    torch.testing.assert_close(per_note, base_grad, atol=1e-6, rtol=1e-5)


def test_a_shared_note_in_two_different_pairs_is_not_a_duplicate_pair():
    """Pair (q0, t0) and (q1, q0): note q0 appears twice but with different partners: both anchors count."""
    emb = unit(4, seed=6)
    out = GatheredContrastiveLoss(LossConfig())(emb, torch.tensor([1, 2, 7, 1]))
    assert out["kept"].all() and int(out["num_kept"]) == 4
    torch.testing.assert_close(out["loss"], out["per_anchor"].mean(), atol=1e-6, rtol=1e-6)


def test_partner_duplicates_are_not_negatives():
    emb = unit(4, seed=2)  # pairs (0,2), (1,3); note 3 is a second copy of note 2
    ids = torch.tensor([1, 2, 7, 7])
    out = GatheredContrastiveLoss(LossConfig())(emb, ids)
    torch.testing.assert_close(out["per_anchor"], reference_per_anchor(emb, ids.tolist(), 20.0), atol=1e-5, rtol=1e-5)
    # Anchor 0: partner 2; column 3 holds the partner's note -> masked: only column 1 competes.
    s = 20.0 * emb[0] @ emb.t()
    expected = -(s[2] - torch.logsumexp(s[[1, 2]], dim=0))
    torch.testing.assert_close(out["per_anchor"][0], expected, atol=1e-5, rtol=1e-5)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_odd_batch_is_rejected():
    with pytest.raises(ValueError, match="even number of rows"):
        GatheredContrastiveLoss(LossConfig())(unit(3), torch.arange(3))


def test_scale_by_world_size_divides_the_per_rank_loss(monkeypatch):
    import notellm2.modeling.loss as loss_mod

    emb, ids = unit(8, seed=3), torch.arange(8)
    plain = GatheredContrastiveLoss(LossConfig(), gather_fn=lambda x: x)
    scaled = GatheredContrastiveLoss(LossConfig(scale_by_world_size=True), gather_fn=lambda x: x)
    monkeypatch.setattr(loss_mod, "_world", lambda: 4)
    a, b = plain(emb, ids), scaled(emb, ids)
    torch.testing.assert_close(b["loss"], a["loss"] / 4)
    torch.testing.assert_close(b["per_anchor"], a["per_anchor"])
