import math

import pytest
import torch

from modeling.config import LossConfig
from modeling.loss import GatheredContrastiveLoss, gather_with_grad


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
    with torch.no_grad():
        loss.log_scale.fill_(math.log(500.0))
    assert loss.scale().item() == pytest.approx(100.0)  # clamped at max_scale
    frozen = GatheredContrastiveLoss(LossConfig(learnable_temperature=False))
    assert not frozen.log_scale.requires_grad
    with pytest.raises(ValueError, match="loss.init_scale"):
        GatheredContrastiveLoss(LossConfig(init_scale=200, max_scale=100))


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


def test_duplicate_note_is_masked():
    """Injecting a duplicate pair leaves every original anchor's loss as in the de-duplicated batch."""
    emb = unit(6, seed=1)  # pairs (0,3), (1,4), (2,5)
    ids = torch.tensor([100, 101, 102, 200, 201, 202])
    loss = GatheredContrastiveLoss(LossConfig())
    base = loss(emb, ids)["per_anchor"]
    # Inject a copy of pair (q0, t0) as a 4th pair: queries [0,1,2,0'], targets [3,4,5,3'].
    q = torch.cat([emb[:3], emb[:1]])
    t = torch.cat([emb[3:], emb[3:4]])
    dup_emb = torch.cat([q, t])
    dup_ids = torch.tensor([100, 101, 102, 100, 200, 201, 202, 200])
    dup = loss(dup_emb, dup_ids)["per_anchor"]
    torch.testing.assert_close(dup[[0, 1, 2, 4, 5, 6]], base, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dup[3], base[0])  # the copy behaves like the original
    torch.testing.assert_close(dup[7], base[3])
    torch.testing.assert_close(dup, reference_per_anchor(dup_emb, dup_ids.tolist(), 20.0), atol=1e-5, rtol=1e-5)
    # The mean over the injected batch's distinct anchors is the de-duplicated loss.
    torch.testing.assert_close(dup[[0, 1, 2, 4, 5, 6]].mean(), loss(emb, ids)["loss"])
    # Negative control: the same batch with distinct ids changes the originals' losses.
    distinct = loss(dup_emb, torch.arange(8))["per_anchor"]
    assert not torch.allclose(distinct[[0, 1, 2, 4, 5, 6]], base, atol=1e-3)


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
    import modeling.loss as loss_mod

    emb, ids = unit(8, seed=3), torch.arange(8)
    plain = GatheredContrastiveLoss(LossConfig(), gather_fn=lambda x: x)
    scaled = GatheredContrastiveLoss(LossConfig(scale_by_world_size=True), gather_fn=lambda x: x)
    monkeypatch.setattr(loss_mod, "_world", lambda: 4)
    a, b = plain(emb, ids), scaled(emb, ids)
    torch.testing.assert_close(b["loss"], a["loss"] / 4)
    torch.testing.assert_close(b["per_anchor"], a["per_anchor"])
