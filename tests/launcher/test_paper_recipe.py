"""configs/paper_scale.yaml builds what the authors' recipe describes: the YAML with only the sizes and
paths swapped for tiny local models (nothing downloaded) gives a 6-layer Q-Former cross-attending in
layers 0, 2, 4 (the 1st, 3rd and 5th), FFN 3072, dropout 0.1, 16 queries, last-layer CLS + patches, late
fusion on the pre-LayerNorm CLS, a bias-free gate (Xavier-normal) and head (N(0, 0.02)), weight decay
off for norms, biases, the temperature and the query tokens, and warm-up 10 % then linear decay to 0."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from notellm2.launcher.config import load_config
from notellm2.launcher.train.optim import lr_lambda, param_groups
from tests.helpers import models as fixtures
from tests.helpers.paths import repo_path

PAPER = repo_path("configs/paper_scale.yaml")


@pytest.fixture(scope="module")
def paper_model(tmp_path_factory):
    from notellm2.modeling.encoder import build_all

    root = tmp_path_factory.mktemp("paper-recipe")
    llm, clip = fixtures.make_tiny_llm_dir(root), fixtures.make_tiny_clip_dir(root)
    cfg = load_config(PAPER, [f"model.llm.path={llm}", f"model.vision.path={clip}", "model.vision.image_size=32",
                              "model.llm.attn_implementation=sdpa", "model.llm.gradient_checkpointing=false",
                              "model.connector.hidden_size=32", "model.connector.num_heads=4"])
    torch.manual_seed(0)
    model, tower, prompter = build_all(cfg.model, cfg.loss)
    return cfg, model, tower


def test_qformer_structure(paper_model):
    cfg, model, tower = paper_model
    q = model.connector.qformer
    assert len(q.encoder.layer) == 6
    assert [layer.has_cross_attention for layer in q.encoder.layer] == [True, False, True, False, True, False]
    assert q.config.intermediate_size == 3072
    assert {m.p for m in q.modules() if isinstance(m, nn.Dropout)} == {0.1}
    assert model.connector.query_tokens.shape[1] == 16 and model.num_image_tokens == 16
    assert q.config.encoder_hidden_size == tower.token_dim


def test_vision_last_layer_cls_patches_and_pre_layernorm_cls(paper_model):
    _, _, tower = paper_model
    assert tower.num_tokens == 17  # 16 patches + CLS at 32 px, patch 8
    px = torch.randn(2, 3, 32, 32)
    tokens, pooled = tower(px)
    with torch.no_grad():
        out = tower.model(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(tokens, out.hidden_states[-1])
    torch.testing.assert_close(pooled, out.last_hidden_state[:, 0])
    assert not torch.allclose(pooled, out.pooler_output, atol=1e-3)


def test_gate_and_head_have_no_bias_and_the_recipe_init(paper_model):
    _, model, _ = paper_model
    gate, head = model.late_fusion.gate, model.head.linear
    assert gate.bias is None and head.bias is None and model.late_fusion.vision_proj.bias is None
    h = gate.out_features
    # W_z is [H, 2H]: Xavier-normal std sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 3H). The tiny matrices hold a few
    # thousand draws: a 10 % tolerance is several standard errors wide and far from nn.Linear's default.
    assert gate.weight.std().item() == pytest.approx((2 / (3 * h)) ** 0.5, rel=0.1)
    assert head.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(head.weight.std().item() - (1 / (3 * head.in_features)) ** 0.5) > 0.02  # not the default init


def test_weight_decay_spares_norms_biases_temperature_and_query_tokens(paper_model):
    cfg, model, _ = paper_model
    groups = param_groups(model, cfg.train.lr_llm, cfg.train.lr_new, cfg.train.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    decayed = by_group["llm_decay"] + by_group["new_decay"]
    spared = by_group["llm_no_decay"] + by_group["new_no_decay"]
    assert {g["name"]: g["weight_decay"] for g in groups} == {
        "llm_decay": 1e-3, "llm_no_decay": 0.0, "new_decay": 1e-3, "new_no_decay": 0.0}
    assert all(g["lr"] == 3e-6 for g in groups)
    assert "loss_fn.log_scale" in by_group["new_no_decay"] and "connector.query_tokens" in by_group["new_no_decay"]
    params = dict(model.named_parameters())
    for name in decayed:
        low = name.lower()
        assert params[name].dim() >= 2 and "norm" not in low and not low.endswith("bias"), name
    norms = [n for n in params if "norm" in n.lower()]
    biases = [n for n in params if n.endswith("bias")]
    assert norms and biases and set(norms) | set(biases) <= set(spared)
    assert len(decayed) + len(spared) == sum(p.requires_grad for p in params.values())


def test_warmup_ten_percent_then_linear_decay_to_zero():
    cfg = load_config(PAPER)
    t = cfg.train
    f = lr_lambda(t.lr_schedule, t.warmup_steps, t.max_steps, t.min_lr_ratio)
    w = t.warmup_steps
    assert w == t.max_steps // 10
    assert f(0) == pytest.approx(1 / w) and f(w - 1) == pytest.approx(1.0)
    mid = w + (t.max_steps - w) // 2
    assert f(mid) == pytest.approx(0.5, abs=1e-3) and f(t.max_steps) == 0.0
