"""model.connector.input_norm / model.fusion.input_norm: a trainable LayerNorm on the frozen tower's
features, so a feature's shared offset (EfficientNet's ReLU6 maps) no longer dominates what follows."""
from __future__ import annotations

import torch

from notellm2.modeling.config import ConnectorConfig
from notellm2.modeling.connector import MLPConnector, QFormerConnector
from notellm2.modeling.fusion import LateFusionGate


def _offset_pair(n=3, t=5, d=16):
    torch.manual_seed(0)
    x = torch.rand(n, t, d)
    return x, x + 7.0  # the same features with a large common offset


def test_connectors_with_input_norm_ignore_a_common_offset_and_without_do_not():
    x, shifted = _offset_pair()
    for cls in (MLPConnector, QFormerConnector):
        torch.manual_seed(1)
        on = cls(ConnectorConfig(num_query_tokens=2, num_layers=1, hidden_size=8, num_heads=2, input_norm=True), 16, 12, 5)
        torch.manual_seed(1)
        off = cls(ConnectorConfig(num_query_tokens=2, num_layers=1, hidden_size=8, num_heads=2), 16, 12, 5)
        assert torch.allclose(on(x), on(shifted), atol=1e-5), cls.__name__
        assert (off(x) - off(shifted)).abs().max() > 1e-3, cls.__name__  # the Q-Former's own LayerNorms damp it, not remove it
        assert sum(p.numel() for p in on.parameters()) == sum(p.numel() for p in off.parameters()) + 32  # weight + bias
        assert on.input_norm.weight.requires_grad


def test_gate_input_norm_runs_in_fp32_with_bf16_weights_and_ignores_a_common_offset():
    x, shifted = _offset_pair()
    pooled, pooled_shift = x[:, 0], shifted[:, 0]
    h = torch.randn(3, 12)
    gate = LateFusionGate(12, 16, input_norm=True).to(torch.bfloat16)
    fused, _ = gate(h.bfloat16(), pooled.bfloat16())
    fused_shift, _ = gate(h.bfloat16(), pooled_shift.bfloat16())
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, fused_shift, atol=0.05)  # bf16 inputs: the offset is only rounded, not seen
    plain = LateFusionGate(12, 16)
    assert (plain(h, pooled)[0] - plain(h, pooled_shift)[0]).abs().max() > 1e-2
