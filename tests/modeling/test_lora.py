"""LoRA on the LLM (`model.llm.lora`, notellm2.modeling.lora) on one process: which modules get adapters per
architecture, what stays trainable (adapters, placeholder rows, configured modules), the placeholder
rows, keyed dropout that gives a note the same masks in any batch, the merge back into a plain LLM, the
resume check, the config keys and hash, and the missing extra."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from notellm2.errors import MissingExtra
from notellm2.modeling.backbone import IMG_EMB_TOKEN, IMG_TOKEN, load_llm
from notellm2.modeling.config import ConnectorConfig, LLMConfig, LoraConfig, LossConfig, ModelConfig, VisionConfig
from notellm2.modeling.encoder import build_note_model
from notellm2.modeling.lora import (PlaceholderRows, adapter_state, apply_lora, merge_lora_state, resume_mismatch,
                                    set_dropout_keys, target_names)
from notellm2.modeling.names import VARIANT_SPECS
from notellm2.schema import ConfigError
from tests.helpers import models as fixtures

LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return fixtures.make_tiny_llm_dir(tmp_path_factory.mktemp("lora"), arch="llama", num_layers=2, hidden=64)


def _lora_llm(path, **lora):
    llm, tok = load_llm(LLMConfig(path=path))
    torch.manual_seed(0)
    return apply_lora(llm, LoraConfig(enabled=True, **lora), tok), tok


def _tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64))


def test_default_targets_per_architecture(llama_dir):
    llm, _ = load_llm(LLMConfig(path=llama_dir))
    names = target_names(llm, LoraConfig(enabled=True))
    assert names == [f"layers.{i}.{part}.{p}" for i in range(2) for part, p in
                     [("self_attn", p) if p in LLAMA_PROJ[:4] else ("mlp", p) for p in LLAMA_PROJ]]
    bert = _tiny_bert()
    names = target_names(bert, LoraConfig(enabled=True))
    assert len(names) == 2 * 6  # query, key, value, attention.output.dense, intermediate.dense, output.dense
    assert all(n.startswith("encoder.layer.") for n in names)
    assert "pooler.dense" not in names  # outside the layer stack (unused by mean pooling)
    assert target_names(llm, LoraConfig(enabled=True, target_modules=["q_proj", "v_proj"])) == \
        [f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_bad_target_and_trainable_modules_name_the_key(llama_dir):
    llm, tok = load_llm(LLMConfig(path=llama_dir))
    with pytest.raises(ConfigError, match=r"model.llm.lora.target_modules: \['qkv'\] name no linear module.*q_proj"):
        target_names(llm, LoraConfig(enabled=True, target_modules=["q_proj", "qkv"]))
    with pytest.raises(ConfigError, match="model.llm.lora.trainable_modules: \\['final_norm'\\]"):
        apply_lora(llm, LoraConfig(enabled=True, trainable_modules=["final_norm"]), tok)
    with pytest.raises(ConfigError, match="model.llm.lora.trainable_modules: \\['q_proj'\\] also get adapters"):
        apply_lora(llm, LoraConfig(enabled=True, trainable_modules=["q_proj"]), tok)
    from transformers import GPT2Config, GPT2Model

    gpt2 = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="no default for model_type 'gpt2'"):
        target_names(gpt2, LoraConfig(enabled=True))


def test_only_adapters_and_placeholder_rows_train(llama_dir):
    llm, tok = _lora_llm(llama_dir, rank=4)
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(llm)) and "embed_tokens.rows" in trainable
    assert len([n for n in trainable if ".lora_A." in n]) == 14
    emb = llm.get_input_embeddings()
    assert isinstance(emb, PlaceholderRows) and not emb.base.weight.requires_grad
    assert not llm.norm.weight.requires_grad  # the final norm is frozen unless configured
    assert sorted(emb.ids.tolist()) == sorted(tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN]))
    torch.testing.assert_close(emb.rows, emb.base.weight[emb.ids], rtol=0, atol=0)  # the mean rows, to start

    llm2, _ = _lora_llm(llama_dir, trainable_modules=["norm", "embed_tokens"])
    trainable = {n for n, p in llm2.named_parameters() if p.requires_grad}
    assert {"norm.weight", "embed_tokens.weight"} <= trainable  # the whole embedding: nothing wrapped
    assert not isinstance(llm2.get_input_embeddings(), PlaceholderRows)
    assert not any("layernorm" in n for n in trainable)


def test_placeholder_rows_replace_only_placeholder_ids_and_get_their_gradient(llama_dir):
    llm, tok = _lora_llm(llama_dir)
    emb = llm.get_input_embeddings()
    fixtures.warm_lora(llm)
    img_emb = tok.convert_tokens_to_ids(IMG_EMB_TOKEN)
    ids = torch.tensor([[5, img_emb, 7], [8, 9, 10]])
    out = emb(ids)
    torch.testing.assert_close(out[1], emb.base.weight[ids[1]], rtol=0, atol=0)
    row = (emb.ids == img_emb).nonzero().item()
    torch.testing.assert_close(out[0, 1], emb.rows[row], rtol=0, atol=0)
    assert not torch.equal(out[0, 1], emb.base.weight[img_emb])  # the trained row, not the frozen one
    out.sum().backward()
    assert emb.rows.grad[row].abs().sum() > 0 and emb.rows.grad[1 - row].abs().sum() == 0
    emb.rows.grad = None
    emb(ids[1:]).sum().backward()
    assert emb.rows.grad is not None and emb.rows.grad.abs().sum() == 0  # in the graph, zero: not missing


def _forward_rows(llm, ids, keys, seed):
    torch.manual_seed(seed)
    set_dropout_keys(llm, keys)
    return llm(input_ids=ids).last_hidden_state


def test_keyed_dropout_gives_a_note_the_same_masks_in_any_batch(llama_dir):
    """Two notes forwarded together or one at a time (from the same generator state, as chunked caching
    replays it) get the same dropout masks: the same hidden states, which no mask at all does not give."""
    llm, tok = _lora_llm(llama_dir, dropout=0.5)
    fixtures.warm_lora(llm, std=0.5)
    llm.train()
    ids = torch.randint(5, 250, (4, 6), generator=torch.Generator().manual_seed(0))
    keys = torch.tensor([11, 22, 33, 44])
    whole = _forward_rows(llm, ids, keys, seed=7)
    pair = _forward_rows(llm, ids[2:], keys[2:], seed=7)
    torch.testing.assert_close(pair, whole[2:], rtol=1e-5, atol=1e-6)
    other_seed = _forward_rows(llm, ids, keys, seed=8)
    assert (other_seed - whole).abs().max() > 1e-3  # dropout is on: another seed, other masks
    llm.eval()
    with torch.no_grad():
        a, b = _forward_rows(llm, ids, keys, 7), _forward_rows(llm, ids, keys, 8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval: no dropout
    state = torch.get_rng_state()
    set_dropout_keys(llm, keys)
    assert torch.equal(state, torch.get_rng_state())  # and no draw from the generator


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v carry a bias, kept through the merge
def test_merged_state_is_a_plain_llm_with_the_same_outputs(llama_dir, tiny, arch):
    llama_dir = llama_dir if arch == "llama" else tiny["qwen2"]
    llm, tok = _lora_llm(llama_dir, rank=4, alpha=8.0, dropout=0.1)
    fixtures.warm_lora(llm)
    llm.eval()
    img_emb = tok.convert_tokens_to_ids(IMG_EMB_TOKEN)
    ids = torch.tensor([[5, 6, img_emb, 7, 8]])
    with torch.no_grad():
        ref = llm(inputs_embeds=llm.get_input_embeddings()(ids)).last_hidden_state
    state = {f"llm.{k}": v for k, v in llm.state_dict().items()}
    merged = merge_lora_state(state, LoraConfig(enabled=True, rank=4, alpha=8.0))
    plain, _ = load_llm(LLMConfig(path=llama_dir))
    plain.load_state_dict({k[len("llm."):]: v for k, v in merged.items()}, strict=True)
    plain.eval()
    with torch.no_grad():
        got = plain(inputs_embeds=plain.get_input_embeddings()(ids)).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the merge really moved the weights (a merge that dropped the adapters would fail the check above)
    base = state["llm.layers.0.self_attn.q_proj.base_layer.weight"]
    assert (merged["llm.layers.0.self_attn.q_proj.weight"] - base).abs().max() > 1e-4
    wrong_scale = merge_lora_state(state, LoraConfig(enabled=True, rank=4, alpha=16.0))
    plain.load_state_dict({k[len("llm."):]: v for k, v in wrong_scale.items()})
    with torch.no_grad():
        bad = plain(inputs_embeds=plain.get_input_embeddings()(ids)).last_hidden_state
    assert (bad - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"holds LoRA adapters \(.*\) but model.llm.lora.enabled is false"):
        merge_lora_state(state, LoraConfig())
    plain_state = {f"llm.{k}": v for k, v in plain.state_dict().items()}
    assert merge_lora_state(plain_state, LoraConfig()) is plain_state
    with pytest.raises(ValueError, match="holds no adapter"):
        merge_lora_state(plain_state, LoraConfig(enabled=True))


def test_resume_mismatch_names_what_differs():
    on = LoraConfig(enabled=True, rank=8)
    saved_plain = {"model": {"llm": {"path": "x"}}}  # a checkpoint from before the key existed
    assert "holds no LoRA adapters" in resume_mismatch(saved_plain, on)
    assert resume_mismatch(saved_plain, LoraConfig()) is None
    saved = {"model": {"llm": {"lora": dataclasses.asdict(on)}}}
    assert resume_mismatch(saved, on) is None
    assert resume_mismatch(saved, dataclasses.replace(on, dropout=0.2)) is None  # same parameters
    assert "holds LoRA adapters" in resume_mismatch(saved, LoraConfig())
    why = resume_mismatch(saved, dataclasses.replace(on, rank=4))
    assert "model.llm.lora.rank is 8 there and 4 here" in why and "\n" not in why


def test_missing_peft_is_a_missing_extra(llama_dir, monkeypatch):
    llm, tok = load_llm(LLMConfig(path=llama_dir))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(MissingExtra, match=r"notellm2\[lora\]"):
        apply_lora(llm, LoraConfig(enabled=True), tok)
    assert apply_lora(llm, LoraConfig(), tok) is llm  # off: peft is not needed


def test_config_keys_and_hash():
    from notellm2.launcher.config import config_hash, load_config

    base = load_config(None)
    assert base.model.llm.lora == LoraConfig() and not base.model.llm.lora.enabled
    # off, whatever its other keys say: the hash of runs from before the key existed
    assert config_hash(load_config(None, ["model.llm.lora.rank=4"])) == config_hash(base)
    on = load_config(None, ["model.llm.lora.enabled=true"])
    assert config_hash(on) != config_hash(base)
    assert config_hash(load_config(None, ["model.llm.lora.enabled=true", "model.llm.lora.rank=4"])) != config_hash(on)
    with pytest.raises(ConfigError, match="model.llm.lora.rank"):
        load_config(None, ["model.llm.lora.rank=0"])
    with pytest.raises(ConfigError, match="model.llm.lora.dropout"):
        load_config(None, ["model.llm.lora.dropout=1.0"])


@pytest.mark.parametrize("variant", list(VARIANT_SPECS))
def test_every_variant_trains_adapters_and_new_modules_only(tiny, variant):
    """One forward and backward of each variant with LoRA (dropout on): every adapter, the placeholder rows
    and every new module (connector, gate, head, temperature) get a gradient; no frozen LLM weight does."""
    from notellm2.modeling.vision import build_vision_tower

    cfg = ModelConfig(variant=variant, llm=LLMConfig(path=tiny["llama"]), vision=VisionConfig(path=tiny["clip"], image_size=32),
                      connector=ConnectorConfig(num_query_tokens=4, num_layers=1, hidden_size=32, num_heads=4),
                      max_text_tokens=24, embed_dim=16)
    torch.manual_seed(0)
    llm, tok = load_llm(cfg.llm)
    llm = apply_lora(llm, LoraConfig(enabled=True, rank=4, dropout=0.1), tok)
    fixtures.warm_lora(llm)
    tower = build_vision_tower(cfg.vision, variant=variant)
    model = build_note_model(cfg, LossConfig(), tower, llm=llm, tokenizer=tok)
    prompter = model.make_prompter(tok, "en", cfg.max_text_tokens)
    notes = [{"note_id": f"n{i}", "title": f"note {i}", "content": "pasta " * (1 + i), "topics": ["food"],
              "has_image": i != 1} for i in range(4)]
    batch = prompter.collate([prompter.encode(n) for n in notes])
    batch["note_ids"] = torch.arange(4)
    tokens = pooled = None
    if tower is not None:
        with torch.no_grad():
            tokens, pooled = tower(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    model.train()
    model(batch, tokens, pooled)["loss"].backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trained if n.startswith("llm.")} == {f"llm.{n}" for n in adapter_state(llm)}
    assert {n for n in trained if not n.startswith("llm.")} == {n for n, _ in model.named_parameters()
                                                                if not n.startswith("llm.")}
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert max(p.grad.abs().max().item() for n, p in model.named_parameters() if ".lora_A." in n) > 0


def test_activation_checkpointing_recomputes_the_same_masks(llama_dir):
    """The seed and keys stay set after the forward: the recomputation inside the backward (activation
    checkpointing) draws the forward's masks, so the gradients equal those without checkpointing."""
    grads = []
    for checkpointing in (False, True):
        llm, tok = load_llm(LLMConfig(path=llama_dir, gradient_checkpointing=checkpointing))
        torch.manual_seed(0)
        llm = apply_lora(llm, LoraConfig(enabled=True, rank=4, dropout=0.5), tok)
        fixtures.warm_lora(llm, std=0.5)
        llm.train()
        ids = torch.randint(5, 250, (2, 6), generator=torch.Generator().manual_seed(0))
        _forward_rows(llm, ids, torch.tensor([3, 4]), seed=7).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad})
    assert any(g.abs().max() > 0 for n, g in grads[0].items() if ".lora_A." in n)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


def test_chunked_caching_takes_lora_dropout_and_refuses_it_unkeyed(llama_dir):
    """check_chunkable accepts LoRA's (keyed) dropout; the same adapters with peft's own nn.Dropout, which
    chunked caching could not replay, are refused in one line."""
    from notellm2.launcher.train.chunked import check_chunkable

    holder = torch.nn.Module()
    holder.llm, _ = _lora_llm(llama_dir, dropout=0.1)
    check_chunkable(holder, 2, zero_stage=3)
    for module in holder.llm.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    with pytest.raises(ConfigError, match=r"train.chunk_pairs: 2 needs a model whose only dropout is keyed per note"):
        check_chunkable(holder, 2, zero_stage=3)
