"""bf16 runs: the trainer casts every parameter to bf16 for ZeRO (launcher/train/engine.py `initialize`, the
`precision == "bf16"` block); the late-fusion gate and the head must still compute in fp32 up to the L2
normalisation, and so must the similarities and the loss (modeling/loss.py upcasts the embeddings).

Reference: the same bf16 weights upcast to fp32, applied in fp32 to the very bf16 hidden states the
LLM handed to the gate (captured by a forward hook), then the same loss on those fp32 embeddings."""
import pytest
import torch
import torch.nn.functional as F

from notellm2.modeling.config import ConnectorConfig, LLMConfig, LossConfig, ModelConfig, VisionConfig
from notellm2.modeling.encoder import build_all

NOTES = [
    {"note_id": f"n{i}", "title": ["cooking pasta", "travel diary", "cute kitten", "city night"][i % 4] + f" {i}",
     "content": "tomato sauce recipe " * (1 + i % 3), "topics": ["food", "summer"][: 1 + i % 2], "has_image": i % 3 != 2}
    for i in range(6)
]


def _cast_like_the_trainer(model):
    """launcher/train/engine.py `initialize` under train.precision: bf16 (no ZeRO here, so no parameter has ds_id)."""
    from notellm2.launcher.train.engine import cast_unpartitioned_to_bf16

    cast_unpartitioned_to_bf16(model)


def _f32(t):
    return None if t is None else t.float()


def _ref_gate(gate, h, pooled, has_image):
    h = h.float()
    v = F.linear(pooled.float(), gate.vision_proj.weight.float(), _f32(gate.vision_proj.bias))
    z = torch.sigmoid(F.linear(torch.cat([h, v], dim=-1), gate.gate.weight.float(), _f32(gate.gate.bias)))
    fused = z * h + (1 - z) * v
    return torch.where(has_image.view(-1, 1), fused, h)


def _ref_head(head, x, dtype=torch.float32):
    lin = head.linear
    out = F.linear(x.to(dtype), lin.weight.to(dtype), None if lin.bias is None else lin.bias.to(dtype))
    return F.normalize(out.float(), dim=-1)


@pytest.fixture(scope="module")
def bf16_model(tiny):
    cfg = ModelConfig(variant="notellm2", llm=LLMConfig(path=tiny["llama"]), vision=VisionConfig(path=tiny["clip"], image_size=32),
                      connector=ConnectorConfig(num_query_tokens=4, num_layers=2, hidden_size=32, num_heads=4),
                      max_text_tokens=24, embed_dim=16)
    torch.manual_seed(0)
    model, tower, prompter = build_all(cfg, LossConfig())
    _cast_like_the_trainer(model)
    with torch.no_grad():
        # A gate that really mixes (not saturated at 0 or 1), so the image path shows in the embeddings.
        model.late_fusion.gate.weight.mul_(4.0)
    batch = prompter.collate([prompter.encode(n) for n in NOTES])
    batch["note_ids"] = torch.arange(len(NOTES))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        tokens, pooled = tower(torch.randn(len(NOTES), 3, 32, 32, generator=g))
    # The trainer feeds the frozen tower's outputs in the training dtype (launcher/train/engine.py `activation_dtype`).
    return model, batch, tokens.to(torch.bfloat16), pooled.to(torch.bfloat16)


def test_gate_head_and_loss_compute_in_fp32_on_bf16_weights(bf16_model):
    model, batch, tokens, pooled = bf16_model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # what ZeRO gets under bf16
    gate_inputs = []
    hook = model.late_fusion.register_forward_hook(lambda m, args, out: gate_inputs.append(args))
    try:
        out = model(batch, tokens, pooled)
    finally:
        hook.remove()
    # notellm2 fuses the note representation, then the visual one; the LLM's hidden states are bf16.
    assert len(gate_inputs) == 2 and gate_inputs[0][0].dtype == torch.bfloat16
    has_image = batch["has_image"].bool()
    assert has_image.any() and not has_image.all()
    ref_note = _ref_head(model.head, _ref_gate(model.late_fusion, *gate_inputs[0]))
    ref_vis = _ref_head(model.head, _ref_gate(model.late_fusion, *gate_inputs[1]))

    assert out["embeddings"].dtype == torch.float32 and out["loss"].dtype == torch.float32
    assert (out["embeddings"] - ref_note).abs().max().item() < 1e-6
    ids = batch["note_ids"]
    ref_mm, ref_v = model.loss_fn(ref_note, ids)["loss"], model.loss_fn(ref_vis, ids)["loss"]
    ref_loss = (9 * ref_mm + 1 * ref_v) / 10
    assert abs(out["loss_mm"].item() - ref_mm.item()) < 1e-6
    assert abs(out["loss_vis"].item() - ref_v.item()) < 1e-6
    assert abs(out["loss"].item() - ref_loss.item()) < 1e-6

    # The tolerance tells the two apart: the same head computed in bf16 misses the reference by far more.
    fused = _ref_gate(model.late_fusion, *gate_inputs[0])
    assert (_ref_head(model.head, fused, dtype=torch.bfloat16) - ref_note).abs().max().item() > 1e-4

    out["loss"].backward()  # gradients reach the bf16 weights through the upcasts
    assert model.head.linear.weight.grad is not None and model.head.linear.weight.grad.dtype == torch.bfloat16
    assert model.late_fusion.gate.weight.grad is not None


def test_encode_gives_fp32_embeddings_matching_the_fp32_reference(bf16_model):
    model, batch, tokens, pooled = bf16_model
    gate_inputs = []
    hook = model.late_fusion.register_forward_hook(lambda m, args, out: gate_inputs.append(args))
    try:
        emb = model.encode(batch, tokens, pooled)
    finally:
        hook.remove()
    assert emb.dtype == torch.float32
    ref = _ref_head(model.head, _ref_gate(model.late_fusion, *gate_inputs[0]))
    assert (emb - ref).abs().max().item() < 1e-6
