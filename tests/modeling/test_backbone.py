import pytest
import torch
from safetensors.torch import load_file

from notellm2.modeling import backbone
from notellm2.modeling.backbone import IMG_EMB_TOKEN, IMG_TOKEN, BackboneError, load_llm, resolve_attn_implementation
from notellm2.modeling.config import LLMConfig


def _saved_weights(path):
    import os
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("arch,cls_name", [("llama", "LlamaModel"), ("qwen2", "Qwen2Model")])
def test_loads_base_model_and_tokenizer_with_placeholders(tiny, arch, cls_name):
    model, tok = load_llm(LLMConfig(path=tiny[arch]))
    assert type(model).__name__ == cls_name  # the base model: no LM head
    assert not any("lm_head" in n for n, _ in model.named_parameters())
    img, emb = tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    assert img != emb and img >= 300 and emb >= 300  # new ids past the trained vocabulary
    assert tok.added_tokens_decoder[img].special and tok.added_tokens_decoder[emb].special
    assert tok.pad_token_id is not None
    w = model.get_input_embeddings().weight
    assert w.shape[0] >= max(img, emb) + 1
    saved = _saved_weights(tiny[arch])["model.embed_tokens.weight"]
    mean = saved.mean(dim=0)
    torch.testing.assert_close(w[img], mean)
    torch.testing.assert_close(w[emb], mean)
    torch.testing.assert_close(w[: saved.shape[0]], saved)  # old rows untouched
    assert model.config._attn_implementation == "sdpa"  # auto on a machine without flash-attn


def test_num_layers_keeps_first_pretrained_layers(tiny, monkeypatch):
    from transformers import AutoModel

    calls = []
    real = AutoModel.from_pretrained

    def spy(path, *args, **kwargs):
        calls.append((path, kwargs.get("config")))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", spy)
    model, _ = load_llm(LLMConfig(path=tiny["llama"], num_layers=1))
    # Loading went through from_pretrained with a config already cut to 1 layer.
    assert calls and calls[0][0] == tiny["llama"] and calls[0][1].num_hidden_layers == 1
    assert len(model.layers) == 1 and model.config.num_hidden_layers == 1
    saved = _saved_weights(tiny["llama"])
    torch.testing.assert_close(model.layers[0].input_layernorm.weight, saved["model.layers.0.input_layernorm.weight"])
    torch.testing.assert_close(model.layers[0].self_attn.q_proj.weight, saved["model.layers.0.self_attn.q_proj.weight"])
    assert not any(n.startswith("layers.1.") for n, _ in model.named_parameters())


def test_num_layers_qwen2_layer_types_follow(tiny):
    model, _ = load_llm(LLMConfig(path=tiny["qwen2"], num_layers=1))
    assert len(model.layers) == 1
    types = getattr(model.config, "layer_types", None)
    assert types is None or len(types) == 1
    out = model(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.last_hidden_state.shape == (1, 3, 32)


def test_num_layers_beyond_model_is_a_clear_error(tiny):
    with pytest.raises(BackboneError, match=r"model.llm.num_layers: got 5; .* has only 2 layers"):
        load_llm(LLMConfig(path=tiny["llama"], num_layers=5))


def test_bad_paths_name_the_key(tmp_path):
    with pytest.raises(BackboneError, match="model.llm.path: empty"):
        load_llm(LLMConfig(path=""))
    with pytest.raises(BackboneError, match="model.llm.path: .* is not a directory"):
        load_llm(LLMConfig(path=str(tmp_path / "nope")))
    with pytest.raises(BackboneError, match="has no config.json"):
        load_llm(LLMConfig(path=str(tmp_path)))


@pytest.mark.parametrize("imports,cuda,dtype,expected", [
    (True, True, torch.bfloat16, "flash_attention_2"),
    (True, True, torch.float16, "flash_attention_2"),
    (True, True, torch.float32, "sdpa"),   # flash-attn kernels take bf16/fp16 only
    (False, True, torch.bfloat16, "sdpa"),
    (True, False, torch.bfloat16, "sdpa"),
    (False, False, torch.float32, "sdpa"),
])
def test_auto_picks_flash_only_with_package_cuda_and_half_precision(imports, cuda, dtype, expected):
    assert backbone.select_attn_implementation("auto", dtype, flash_attn_imports=imports, cuda=cuda) == expected


def test_explicit_attn_choices():
    sel = backbone.select_attn_implementation
    assert sel("flash_attention_2", torch.bfloat16, flash_attn_imports=True, cuda=True) == "flash_attention_2"
    assert sel("flash_attention_2", torch.float16, flash_attn_imports=True, cuda=True) == "flash_attention_2"
    for name in ("sdpa", "eager"):  # never depend on the probes or the dtype
        assert sel(name, torch.float32, flash_attn_imports=False, cuda=False) == name
        assert sel(name, torch.bfloat16, flash_attn_imports=True, cuda=True) == name
    with pytest.raises(BackboneError, match=r"model.llm.attn_implementation: got 'flash'; allowed: auto, sdpa"):
        sel("flash", torch.bfloat16, flash_attn_imports=True, cuda=True)


def test_flash_with_fp32_names_the_precision_key():
    with pytest.raises(BackboneError) as e:
        backbone.select_attn_implementation("flash_attention_2", torch.float32, flash_attn_imports=True, cuda=True)
    msg = str(e.value)
    assert msg.startswith("model.llm.attn_implementation: 'flash_attention_2' needs a half-precision dtype (bf16 or fp16)")
    assert "float32" in msg and "train.precision: bf16" in msg and "\n" not in msg


@pytest.mark.parametrize("imports,cuda,why", [
    (True, False, "no CUDA device is present"),
    (False, True, "the flash_attn package does not import"),
])
def test_flash_without_package_or_cuda_says_why(imports, cuda, why):
    with pytest.raises(BackboneError, match=f"'flash_attention_2' was requested but {why}"):
        backbone.select_attn_implementation("flash_attention_2", torch.bfloat16, flash_attn_imports=imports, cuda=cuda)


def test_resolve_passes_the_load_dtype(monkeypatch):
    """resolve_attn_implementation feeds the real probes and the dtype (None: float32) to the rule."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backbone, "_flash_attn_imports", lambda: True)
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto") == "sdpa"  # float32 by default, as load_llm loads
    with pytest.raises(BackboneError, match="needs a half-precision dtype"):
        resolve_attn_implementation("flash_attention_2")


def test_flash_availability_needs_cuda_and_package(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backbone.flash_attention_available() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backbone.importlib.util, "find_spec", lambda name: None)
    assert backbone.flash_attention_available() is False
    with pytest.raises(BackboneError, match="flash_attn package does not import"):
        resolve_attn_implementation("flash_attention_2")


def test_flash_requested_on_this_machine_fails_clearly(tiny):
    with pytest.raises(BackboneError, match="flash_attention_2"):
        load_llm(LLMConfig(path=tiny["llama"], attn_implementation="flash_attention_2"))


def test_gradient_checkpointing_switch(tiny):
    off, _ = load_llm(LLMConfig(path=tiny["llama"]))
    on, _ = load_llm(LLMConfig(path=tiny["llama"], gradient_checkpointing=True))
    assert not any(getattr(m, "gradient_checkpointing", False) for m in off.modules())
    assert any(getattr(m, "gradient_checkpointing", False) for m in on.modules())
    on.train()
    ids = torch.tensor([[3, 4, 5, 6]])
    on(input_ids=ids).last_hidden_state.sum().backward()
    assert on.layers[0].self_attn.q_proj.weight.grad is not None


def test_dtype_argument(tiny, tmp_path):
    model, _ = load_llm(LLMConfig(path=tiny["llama"]), dtype=torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    # A bf16 checkpoint still loads as float32 unless a dtype is asked for.
    from transformers import AutoModelForCausalLM
    bf16_dir = str(tmp_path / "bf16")
    AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.bfloat16).save_pretrained(bf16_dir)
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny['llama']}/{name}", bf16_dir)
    model, _ = load_llm(LLMConfig(path=bf16_dir))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_separate_tokenizer_path(tiny, tmp_path):
    model, tok = load_llm(LLMConfig(path=tiny["llama"], tokenizer_path=tiny["tokenizer"]))
    assert tok.convert_tokens_to_ids(IMG_TOKEN) == len(tok) - 2
    with pytest.raises(BackboneError, match="model.llm.tokenizer_path: .* is not a directory"):
        load_llm(LLMConfig(path=tiny["llama"], tokenizer_path=str(tmp_path / "missing")))


def test_missing_weights_are_an_error_not_random_init(tiny, tmp_path):
    import os
    import shutil

    from safetensors.torch import save_file

    broken = str(tmp_path / "broken-llm")
    shutil.copytree(tiny["llama"], broken)
    state = _saved_weights(broken)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, os.path.join(broken, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BackboneError, match=r"lacks 1 weights of LlamaModel \(e.g. layers.1.mlp.up_proj.weight"):
        load_llm(LLMConfig(path=broken))
    # Truncating to the intact first layer does not need the missing weight.
    model, _ = load_llm(LLMConfig(path=broken, num_layers=1))
    assert len(model.layers) == 1


def test_grow_embeddings_hook_replaces_the_resize(tiny, monkeypatch):
    """A grow_embeddings hook (the launcher's ZeRO-3 one) is used instead of resize_token_embeddings;
    the placeholder rows are still set to the mean afterwards and the pretrained rows kept."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "resize_token_embeddings",
                        lambda *a, **k: pytest.fail("resize_token_embeddings called although a hook was given"))
    calls = []

    def grow(model, rows):
        calls.append(rows)
        old = model.get_input_embeddings()
        new = torch.nn.Embedding(rows, old.weight.shape[1])  # random new rows: the loader must overwrite them
        with torch.no_grad():
            new.weight[: old.weight.shape[0]] = old.weight
        model.set_input_embeddings(new)

    model, tok = load_llm(LLMConfig(path=tiny["llama"]), grow_embeddings=grow)
    img, emb = tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    assert calls == [max(img, emb) + 1]
    w = model.get_input_embeddings().weight
    saved = _saved_weights(tiny["llama"])["model.embed_tokens.weight"]
    torch.testing.assert_close(w[img], saved.mean(dim=0))
    torch.testing.assert_close(w[emb], saved.mean(dim=0))
    assert torch.equal(w[: saved.shape[0]], saved)


def test_grow_embeddings_hook_that_does_not_grow_fails_clearly(tiny):
    with pytest.raises(BackboneError, match=r"input embedding has 300 rows after growing it; the placeholder tokens need 302"):
        load_llm(LLMConfig(path=tiny["llama"]), grow_embeddings=lambda model, rows: None)
