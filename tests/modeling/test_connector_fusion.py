import pytest
import torch
from torch import nn

from notellm2.modeling.config import ConnectorConfig
from notellm2.modeling.connector import CONNECTORS, MLPConnector, QFormerConnector, build_connector
from notellm2.modeling.fusion import EmbeddingHead, LateFusionGate


def test_qformer_connector_shapes_and_init():
    torch.manual_seed(0)
    cfg = ConnectorConfig(kind="qformer", num_query_tokens=6, num_layers=3, hidden_size=32, num_heads=4,
                          cross_attention_frequency=2)
    conn = build_connector(cfg, token_dim=24, llm_dim=40, num_vision_tokens=17)
    assert isinstance(conn, QFormerConnector) and conn.num_output_tokens == 6
    q = conn.qformer.config
    assert (q.encoder_hidden_size, q.num_hidden_layers, q.hidden_size, q.num_attention_heads,
            q.cross_attention_frequency) == (24, 3, 32, 4, 2)
    cross = [layer.has_cross_attention for layer in conn.qformer.encoder.layer]
    assert cross == [True, False, True]  # every 2nd layer cross-attends, starting with the first
    std = conn.query_tokens.std().item()
    assert 0.01 < std < 0.03  # N(0, 0.02), not zeros
    linears = [m for m in conn.proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 40), (40, 40)]
    assert any(isinstance(m, nn.GELU) for m in conn.proj)
    x = torch.randn(3, 17, 24)
    out = conn(x)
    assert out.shape == (3, 6, 40)
    # The queries read the image: different images give different outputs.
    assert not torch.allclose(conn(torch.randn(3, 17, 24)), out)
    out.sum().backward()
    assert conn.query_tokens.grad is not None and conn.query_tokens.grad.abs().sum() > 0


def test_mlp_connector_is_per_token():
    torch.manual_seed(0)
    conn = build_connector(ConnectorConfig(kind="mlp"), token_dim=24, llm_dim=40, num_vision_tokens=17)
    assert isinstance(conn, MLPConnector) and conn.num_output_tokens == 17
    x = torch.randn(2, 17, 24)
    out = conn(x)
    assert out.shape == (2, 17, 40)
    torch.testing.assert_close(conn(x[:, 3:4]), out[:, 3:4])  # token 3 depends only on token 3


def test_connector_registry():
    assert set(CONNECTORS) == {"qformer", "mlp"}
    cfg = ConnectorConfig()
    object.__setattr__(cfg, "kind", "perceiver")
    with pytest.raises(ValueError, match="model.connector.kind: got 'perceiver'"):
        build_connector(cfg, 8, 8, 4)
    with pytest.raises(ValueError, match="model.connector.hidden_size: 30 is not divisible"):
        build_connector(ConnectorConfig(hidden_size=30, num_heads=4), 8, 8, 4)


def test_late_fusion_gate_math():
    torch.manual_seed(0)
    gate = LateFusionGate(llm_dim=8, pooled_dim=5)
    assert gate.vision_proj.bias is None  # the pooled feature projection has no bias
    h, pooled = torch.randn(4, 8), torch.randn(4, 5)
    has_image = torch.tensor([True, True, False, True])
    fused, z = gate(h, pooled, has_image)
    v = pooled @ gate.vision_proj.weight.t()
    z_ref = torch.sigmoid(torch.cat([h, v], dim=-1) @ gate.gate.weight.t() + gate.gate.bias)
    ref = z_ref * h + (1 - z_ref) * v
    torch.testing.assert_close(fused[has_image], ref[has_image])
    torch.testing.assert_close(fused[2], h[2])  # no image: the LLM representation passes through
    torch.testing.assert_close(z[has_image], z_ref[has_image])
    assert z.shape == (4, 8)
    assert torch.equal(z[2], torch.ones(8))  # no image: the gate is exactly 1 there, not sigmoid of anything


def test_embedding_head_normalises():
    head = EmbeddingHead(8, 3)
    out = head(torch.randn(5, 8, dtype=torch.bfloat16).float())
    assert out.shape == (5, 3) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))


def test_qformer_ffn_size_and_dropout_are_configurable():
    default = build_connector(ConnectorConfig(num_layers=1, hidden_size=32, num_heads=4), 24, 40, 17)
    assert default.qformer.config.intermediate_size == 128  # 4 x hidden_size when ffn_size is null
    assert default.qformer.config.hidden_dropout_prob == 0.0
    cfg = ConnectorConfig(num_layers=2, hidden_size=32, num_heads=4, ffn_size=72, dropout=0.1)
    conn = build_connector(cfg, 24, 40, 17)
    layer = conn.qformer.encoder.layer[0]
    widths = {m.out_features for name, m in layer.named_modules() if isinstance(m, nn.Linear) and "intermediate" in name}
    assert widths == {72}, widths
    drops = {m.p for m in conn.qformer.modules() if isinstance(m, nn.Dropout)}
    assert drops == {0.1}, drops
    # Dropout is live in training (two forwards differ) and off in eval (they agree).
    x = torch.randn(2, 17, 24)
    conn.train()
    assert not torch.allclose(conn(x), conn(x))
    conn.eval()
    torch.testing.assert_close(conn(x), conn(x))


@pytest.mark.parametrize("bias", [True, False])
def test_gate_and_head_bias_is_configurable(bias):
    gate = LateFusionGate(llm_dim=8, pooled_dim=5, bias=bias)
    head = EmbeddingHead(8, 3, bias=bias)
    assert (gate.gate.bias is not None) == bias and (head.linear.bias is not None) == bias
    assert gate.vision_proj.bias is None
    h, pooled = torch.randn(4, 8), torch.randn(4, 5)
    fused, z = gate(h, pooled)
    v = pooled @ gate.vision_proj.weight.t()
    pre = torch.cat([h, v], dim=-1) @ gate.gate.weight.t() + (gate.gate.bias if bias else 0)
    torch.testing.assert_close(z, torch.sigmoid(pre))
    assert head(h).shape == (4, 3)


def test_init_choices_draw_the_documented_distributions():
    """On 512x1024 matrices (half a million draws) the sample std is within 1 % of its target."""
    torch.manual_seed(0)
    llm_dim, pooled_dim = 512, 512
    gate = LateFusionGate(llm_dim, pooled_dim, bias=True, init="xavier_normal")
    xavier_gate = (2.0 / (2 * llm_dim + llm_dim)) ** 0.5  # W_z: fan_in 2H, fan_out H
    xavier_proj = (2.0 / (pooled_dim + llm_dim)) ** 0.5
    assert gate.gate.weight.std().item() == pytest.approx(xavier_gate, rel=0.01)
    assert gate.vision_proj.weight.std().item() == pytest.approx(xavier_proj, rel=0.01)
    assert abs(gate.gate.weight.mean().item()) < 1e-3 and gate.gate.bias.abs().max() == 0
    head = EmbeddingHead(1024, 512, bias=False, init="normal", init_std=0.02)
    assert head.linear.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert abs(head.linear.weight.mean().item()) < 1e-4
    # Negative control: nn.Linear's default (Kaiming-uniform, std 1/sqrt(3 fan_in)) is measurably different.
    default = EmbeddingHead(1024, 512)
    assert default.linear.weight.std().item() == pytest.approx((1 / (3 * 1024)) ** 0.5, rel=0.01)
    assert abs(default.linear.weight.std().item() - 0.02) > 0.001


def test_init_error_names_the_key():
    from notellm2.modeling.fusion import init_linear

    with pytest.raises(ValueError, match="model.head.init: got 'orthogonal'; allowed: default, xavier_normal, normal"):
        EmbeddingHead(8, 3, init="orthogonal")
    with pytest.raises(ValueError, match="model.fusion.init: got 'zeros'"):
        LateFusionGate(8, 5, init="zeros")
    with pytest.raises(ValueError, match="my.key: got 'x'"):
        init_linear(nn.Linear(2, 2), "x", key="my.key")


def test_qformer_dropout_is_keyed_per_row_and_chunk_invariant():
    """The masks of a row depend on the generator state at the forward's start and the row's key, not on
    which other rows share the forward (what chunked representation caching relies on)."""
    from notellm2.modeling.connector import KEYED_ATTENTION, KeyedDropout

    cfg = ConnectorConfig(num_layers=2, hidden_size=32, num_heads=4, dropout=0.3)
    conn = build_connector(cfg, 24, 40, 17).train()
    assert conn.qformer.config._attn_implementation == KEYED_ATTENTION
    sites = [m for m in conn.modules() if isinstance(m, KeyedDropout)]
    assert len(sites) >= 6 and len({m.site for m in sites}) == len(sites)
    x, keys = torch.randn(6, 17, 24), torch.tensor([11, 5, 2 ** 40 + 3, -1, 7, 9])
    torch.manual_seed(0)
    whole = conn(x, row_keys=keys)
    after = torch.get_rng_state()
    parts = []
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        torch.manual_seed(0)
        parts.append(conn(x[rows], row_keys=keys[rows]))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.get_rng_state(), after)  # one draw per forward, whatever the rows
    # live: another generator state gives other masks; eval: no dropout
    assert not torch.allclose(conn(x, row_keys=keys), whole)
    conn.eval()
    torch.testing.assert_close(conn(x, row_keys=keys), conn(x, row_keys=keys))


def test_keyed_dropout_rate_and_scale():
    from notellm2.modeling.connector import DropoutKeys, KeyedDropout

    src = DropoutKeys()
    src.seed, src.keys = 123, torch.arange(64)
    drop = KeyedDropout(0.25, src, site=0).train()
    y = drop(torch.ones(64, 1000))
    kept = (y > 0).float().mean().item()
    assert abs(kept - 0.75) < 0.01, kept
    assert torch.allclose(y[y > 0], torch.full_like(y[y > 0], 1 / 0.75))
    src.keys = torch.arange(64) + 1  # other keys, other masks
    assert not torch.equal(drop(torch.ones(64, 1000)) > 0, y > 0)
