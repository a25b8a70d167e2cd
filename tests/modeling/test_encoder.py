import pytest
import torch

from notellm2.modeling.config import ConnectorConfig, LLMConfig, LossConfig, ModelConfig, VisionConfig
from notellm2.modeling.encoder import ModelInputError, build_all, build_note_model
from notellm2.modeling.names import VARIANT_SPECS

NOTES = [
    {"note_id": f"n{i}", "title": ["cooking pasta", "travel diary", "cute kitten", "city night"][i % 4] + f" {i}",
     "content": "tomato sauce recipe " * (1 + i % 3), "topics": ["food", "summer"][: 1 + i % 2], "has_image": i % 3 != 2}
    for i in range(6)
]


def _cfg(tiny, variant, connector="qformer", **kw):
    return ModelConfig(variant=variant, llm=LLMConfig(path=tiny["llama"]), vision=VisionConfig(path=tiny["clip"], image_size=32),
                       connector=ConnectorConfig(kind=connector, num_query_tokens=4, num_layers=2, hidden_size=32, num_heads=4),
                       max_text_tokens=24, embed_dim=16, **kw)


def _inputs(model, tower, prompter, notes=NOTES, mode="both", padding_side="right", seed=0):
    batch = prompter.collate([prompter.encode(n, mode=mode) for n in notes], padding_side=padding_side)
    batch["note_ids"] = torch.arange(len(notes))
    if tower is None:
        return batch, None, None
    g = torch.Generator().manual_seed(seed)
    tokens, pooled = tower(torch.randn(len(notes), 3, 32, 32, generator=g))
    return batch, tokens, pooled


@pytest.fixture(scope="module")
def built(tiny):
    cache = {}

    def get(variant, connector="qformer"):
        if (variant, connector) not in cache:
            torch.manual_seed(0)
            cache[(variant, connector)] = build_all(_cfg(tiny, variant, connector), LossConfig())
        return cache[(variant, connector)]
    return get


def test_every_registered_variant_has_its_prompt_template_in_every_language():
    from notellm2.modeling.prompts import _TEMPLATES
    for language, templates in _TEMPLATES.items():
        for variant, spec in VARIANT_SPECS.items():
            assert spec.prompt in templates, (language, variant, spec.prompt)


@pytest.mark.parametrize("variant", list(VARIANT_SPECS))
def test_every_variant_trains(built, variant):
    model, tower, prompter = built(variant)
    spec = VARIANT_SPECS[variant]
    assert (tower is None) == (not spec.uses_images)
    assert (model.connector is not None) == spec.image_in_prompt
    assert (model.late_fusion is not None) == spec.late_fusion
    model.zero_grad(set_to_none=True)
    batch, tokens, pooled = _inputs(model, tower, prompter)
    out = model(batch, tokens, pooled)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert out["embeddings"].shape == (6, 16) and not out["embeddings"].requires_grad
    torch.testing.assert_close(out["embeddings"].norm(dim=-1), torch.ones(6))
    assert out["logit_scale"].item() == pytest.approx(20.0)
    assert ("loss_mm" in out) == ("loss_vis" in out) == spec.micl
    assert ("gate_mean" in out) == ("gate_std" in out) == spec.late_fusion
    if spec.micl:
        w = (9 * out["loss_mm"] + 1 * out["loss_vis"]) / 10
        torch.testing.assert_close(out["loss"].detach(), w)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []  # connector, gate, head and temperature all take part


def test_tower_is_not_part_of_the_trainable_model(built):
    model, tower, _ = built("notellm2")
    tower_params = {id(p) for p in tower.parameters()}
    assert not tower_params & {id(p) for p in model.parameters()}
    assert not any(isinstance(m, type(tower)) for m in model.modules())
    assert not any(k.startswith("vision") or "vision_model" in k for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen inside NoteModel


def test_image_tokens_are_spliced_per_row(built):
    model, tower, prompter = built("basic_mm")
    batch, tokens, pooled = _inputs(model, tower, prompter)
    base = model.encode(batch, tokens, pooled)
    changed = tokens.clone()
    changed[0] = torch.randn_like(changed[0])
    changed[2] = torch.randn_like(changed[2])  # note 2 has no image: its row is ignored
    out = model.encode(batch, changed, pooled)
    assert not torch.allclose(out[0], base[0], atol=1e-4)
    torch.testing.assert_close(out[1:], base[1:])


def test_left_and_right_padding_agree(built):
    model, tower, prompter = built("notellm2")
    right = model.encode(*_inputs(model, tower, prompter, padding_side="right"))
    left = model.encode(*_inputs(model, tower, prompter, padding_side="left"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)
    reps_r = model.represent(*_inputs(model, tower, prompter, padding_side="right"))
    reps_l = model.represent(*_inputs(model, tower, prompter, padding_side="left"))
    torch.testing.assert_close(reps_l["visual"], reps_r["visual"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["micl", "notellm2"])
def test_micl_image_probe_is_the_visual_representation(built, variant):
    model, tower, prompter = built(variant)
    with_image = [n for n in NOTES if n["has_image"]]
    batch, tokens, pooled = _inputs(model, tower, prompter, with_image)
    with torch.no_grad():
        visual = model.head(model.represent(batch, tokens, pooled)["visual"])
    probe = model.encode(*_inputs(model, tower, prompter, with_image, mode="image"), mode="image")
    torch.testing.assert_close(probe, visual, atol=1e-5, rtol=1e-4)
    both = model.encode(batch, tokens, pooled)
    assert not torch.allclose(probe, both, atol=1e-3)
    # the in-training evaluation reads both probes from one forward
    full, vis = model.encode_with_visual(batch, tokens, pooled)
    assert torch.equal(full, both) and torch.equal(vis, visual)


def test_encode_with_visual_needs_a_micl_variant(built):
    model, tower, prompter = built("basic_mm")
    with pytest.raises(ModelInputError, match="no visual representation"):
        model.encode_with_visual(*_inputs(model, tower, prompter))


@pytest.mark.parametrize("variant", list(VARIANT_SPECS))
def test_text_probe_ignores_images(built, variant):
    model, tower, prompter = built(variant)
    batch, tokens, pooled = _inputs(model, tower, prompter, mode="text")
    assert not (batch["input_ids"] == model.img_id).any()
    a = model.encode(batch, tokens, pooled, mode="text")
    b = model.encode(batch, None, None, mode="text")
    torch.testing.assert_close(a, b)
    if VARIANT_SPECS[variant].uses_images:
        img = model.encode(*_inputs(model, tower, prompter, [n for n in NOTES if n["has_image"]], mode="image"), mode="image")
        assert img.shape == (4, 16)
    else:
        with pytest.raises(ModelInputError, match="no image probe"):
            model.encode(batch, None, None, mode="image")


def test_late_fusion_image_probe_uses_the_image(built):
    model, tower, prompter = built("late_fusion")
    notes = [n for n in NOTES if n["has_image"]]
    batch, tokens, pooled = _inputs(model, tower, prompter, notes, mode="image")
    a = model.encode(batch, tokens, pooled, mode="image")
    b = model.encode(batch, tokens, torch.randn_like(pooled), mode="image")
    assert not torch.allclose(a, b, atol=1e-4)


def test_clear_input_errors(built, tiny):
    model, tower, prompter = built("notellm2")
    batch, tokens, pooled = _inputs(model, tower, prompter)
    with pytest.raises(ModelInputError, match="image_tokens is None"):
        model(batch, None, pooled)
    with pytest.raises(ModelInputError, match="image_pooled is None"):
        model(batch, tokens, None)
    with pytest.raises(ModelInputError, match="missing note_ids"):
        model({k: v for k, v in batch.items() if k != "note_ids"}, tokens, pooled)
    with pytest.raises(ModelInputError, match="image_tokens has 2 rows for a batch of 6"):
        model(batch, tokens[:2], pooled)
    other = prompter.__class__(prompter.tokenizer, "notellm2", num_image_tokens=3, max_text_tokens=24)
    bad = other.collate([other.encode(n) for n in NOTES])
    bad["note_ids"] = torch.arange(6)
    with pytest.raises(ModelInputError, match="image slots must hold 4"):
        model(bad, tokens, pooled)
    with pytest.raises(ValueError, match="uses images; pass vision_tower"):
        build_note_model(_cfg(tiny, "micl"), LossConfig(), vision_tower=None, llm=model.llm, tokenizer=prompter.tokenizer)


@pytest.mark.parametrize("connector,expected", [("qformer", 4), ("mlp", 16)])
def test_prompter_slot_size_follows_the_connector(built, connector, expected):
    model, tower, prompter = built("basic_mm", connector)
    assert model.num_image_tokens == prompter.num_image_tokens == expected
    ids = prompter.encode(NOTES[0])["input_ids"]
    assert ids.count(model.img_id) == expected
    batch, tokens, pooled = _inputs(model, tower, prompter)
    assert model(batch, tokens, pooled)["loss"].isfinite()


def test_qwen2_backbone_and_siglip_tower(tiny):
    torch.manual_seed(0)
    cfg = ModelConfig(variant="notellm2", llm=LLMConfig(path=tiny["qwen2"]), vision=VisionConfig(path=tiny["siglip"], image_size=32),
                      connector=ConnectorConfig(kind="mlp"), max_text_tokens=16, embed_dim=8, prompt_language="zh")
    model, tower, prompter = build_all(cfg, LossConfig())
    assert type(model.llm).__name__ == "Qwen2Model" and tower.num_tokens == 16
    batch, tokens, pooled = _inputs(model, tower, prompter)
    out = model(batch, tokens, pooled)
    out["loss"].backward()
    assert out["embeddings"].shape == (6, 8)
