"""`notellm2 plan`: parameter counts from configs alone, model states cross-checked against DeepSpeed's
own ZeRO estimators, the activation formula against what autograd really saves, and the CLI offline."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from notellm2.launcher.config import load_config
from notellm2.launcher.plan import (GiB, LLMArch, PlanError, count_params, format_plan, llm_activation_bytes, llm_arch,
                           make_plan)
from tests.helpers.multirank import base_env
from tests.helpers.paths import REPO

PAPER = os.path.join(REPO, "configs", "paper_scale.yaml")
QWEN_SMALL = dict(model_type="qwen2", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=False)


def _arch_dir(tmp_path, name: str, cfg: dict) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _qwen_expected(h, f, layers, heads, kv_heads, vocab):
    kv = kv_heads * (h // heads)
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * f + 2 * h  # q(+bias), k/v(+bias), o, SwiGLU, 2 norms
    return vocab * h + layers * per_layer + h


def _ds_table(fn, *args, **kwargs) -> dict:
    """Run a DeepSpeed *_all_live / *_all_cold estimator and parse its printed per-GPU GB by options."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn(*args, **kwargs)
    rows = {}
    for line in buf.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if m:
            opts = re.sub(r"\s+,", ",", m.group(3).replace("OffloadDeviceEnum.", "")).strip()
            rows[opts] = float(m.group(2)) * GiB
    assert rows, buf.getvalue()
    return rows


def test_llm_params_from_config_alone_match_the_architecture_formula(tmp_path):
    path = _arch_dir(tmp_path, "qwen", QWEN_SMALL)
    cfg = load_config(None, [f"model.llm.path={path}", "model.variant=text_only"])
    arch = llm_arch(cfg)
    assert arch.params == _qwen_expected(256, 688, 4, 8, 2, 32000)
    assert arch.largest_module == 32000 * 256  # the embedding matrix
    assert (arch.hidden, arch.layers, arch.kv_dim, arch.ffn) == (256, 4, 64, 688)
    # model.llm.num_layers truncates the trunk the way notellm2.modeling.backbone.load_llm does.
    cut = llm_arch(load_config(None, [f"model.llm.path={path}", "model.llm.num_layers=2"]))
    assert cut.params == _qwen_expected(256, 688, 2, 8, 2, 32000)


def test_paper_scale_counts_match_published_architectures():
    plan = make_plan(load_config(PAPER), nodes=2, gpus_per_node=8)
    assert plan.llm.params == _qwen_expected(3584, 18944, 28, 28, 4, 152064)  # 7.07 B without the LM head
    # ViT-bigG/14 at 224 px: 256 patches + CLS, 48 pre-LN blocks of width 1664, MLP 8192.
    h, f, L, tokens = 1664, 8192, 48, 257
    vit = 3 * h * 14 * 14 + h + tokens * h + 2 * h + L * (4 * (h * h + h) + 2 * h * f + f + h + 4 * h) + 2 * h
    assert plan.vision.params == vit
    assert plan.vision.tokens_out == 257 and plan.new.image_tokens == 16  # the recipe feeds CLS + patches
    assert plan.notes_per_micro_batch == 32 and plan.images_per_micro_batch == 32


def test_count_params_equals_deepspeed_model_to_params_on_a_real_model(tmp_path):
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModel

    path = _arch_dir(tmp_path, "qwen", QWEN_SMALL)
    real = AutoModel.from_config(AutoConfig.from_pretrained(path))
    assert count_params(real) == tuple(model_to_params(real))
    arch = llm_arch(load_config(None, [f"model.llm.path={path}"]))
    assert (arch.params, arch.largest_module) == tuple(model_to_params(real))


@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 4), (2, 8)])
def test_model_states_agree_with_deepspeed_estimator_on_a_live_model(tmp_path, nodes, gpus):
    """A real (randomly initialised) 30M model: DeepSpeed sizes it from the live module, we from its config."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live, model_to_params)
    from transformers import AutoConfig, AutoModel

    path = _arch_dir(tmp_path, "qwen", QWEN_SMALL)
    real = AutoModel.from_config(AutoConfig.from_pretrained(path))
    plan = make_plan(load_config(None, [f"model.llm.path={path}", "model.variant=text_only", "model.embed_dim=64",
                                        "train.ds_config=ds_configs/zero3_bf16.json", "train.precision=bf16"]),
                     nodes=nodes, gpus_per_node=gpus)
    ours = plan.model_states()
    total, largest = model_to_params(real)
    _, exact, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=nodes,
                                                        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    # The plan also counts the head and temperature (16K params on top of 30M).
    assert abs(ours / exact - 1) < 0.01, (ours, exact)
    if nodes * gpus == 1:  # large enough for the printed table's 2 decimals to mean something
        printed = _ds_table(estimate_zero3_model_states_mem_needs_all_live, real, num_gpus_per_node=gpus, num_nodes=nodes)
        assert abs(ours / printed["offload_param=none, offload_optimizer=none, zero_init=1"] - 1) < 0.03


@pytest.mark.parametrize("ds_config,option", [
    ("ds_configs/zero3_bf16.json", "offload_param=none, offload_optimizer=none, zero_init=1"),
    ("ds_configs/zero3_offload.json", "offload_param=cpu, offload_optimizer=cpu, zero_init=1"),
])
def test_paper_scale_model_states_agree_with_deepspeed_all_cold(ds_config, option):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    plan = make_plan(load_config(PAPER, [f"train.ds_config={ds_config}"]), nodes=2, gpus_per_node=8)
    ds = _ds_table(estimate_zero3_model_states_mem_needs_all_cold, plan.trainable_params, plan.largest_module,
                   num_gpus_per_node=8, num_nodes=2)
    assert abs(plan.model_states() / ds[option] - 1) < 0.01, (plan.model_states() / GiB, ds)


def test_paper_scale_zero2_agrees_with_deepspeed_zero2_estimator():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    plan = make_plan(load_config(PAPER, ["train.ds_config=ds_configs/zero2_bf16.json"]), nodes=1, gpus_per_node=8)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        estimate_zero2_model_states_mem_needs_all_cold(plan.trainable_params, num_gpus_per_node=8, num_nodes=1)
    m = re.search(r"([\d.]+)GB \|\s*([\d.]+)GB \| offload_optimizer=none", buf.getvalue())
    assert m, buf.getvalue()
    assert abs(plan.model_states() / (float(m.group(2)) * GiB) - 1) < 0.01
    assert plan.row("parameters").bytes == 2 * plan.trainable_params  # ZeRO-2 replicates parameters


def test_partitioned_states_shrink_with_gpus_replicated_parts_do_not():
    cfg = load_config(PAPER)
    one, four = make_plan(cfg, nodes=1, gpus_per_node=8), make_plan(cfg, nodes=4, gpus_per_node=8)
    for key in ("parameters", "gradients", "optimizer"):
        assert four.row(key).bytes == pytest.approx(one.row(key).bytes / 4)
    for key in ("gathered", "vision_weights", "llm_activations", "connector_activations", "vision_forward"):
        assert four.row(key).bytes == one.row(key).bytes
    assert four.row("loss").bytes == 4 * one.row("loss").bytes  # gathered columns grow with the world
    assert four.total() < one.total()


def test_gradient_checkpointing_and_micro_batch_drive_activations():
    on = make_plan(load_config(PAPER), nodes=1, gpus_per_node=8)
    off = make_plan(load_config(PAPER, ["model.llm.gradient_checkpointing=false"]), nodes=1, gpus_per_node=8)
    assert off.row("llm_activations").bytes > 5 * on.row("llm_activations").bytes
    # the table's line for the other choice gives what a plan made with that choice totals
    other = re.search(r"gradient checkpointing off: [\d.]+ GiB \(total would be ([\d.]+) GiB\)", format_plan(on))
    assert other and float(other.group(1)) == pytest.approx(off.total() / GiB, abs=0.006)
    half = make_plan(load_config(PAPER, ["model.llm.gradient_checkpointing=false", "data.pairs_per_rank=8"]), nodes=1, gpus_per_node=8)
    assert half.row("llm_activations").bytes == pytest.approx(off.row("llm_activations").bytes / 2)
    assert half.row("parameters").bytes == off.row("parameters").bytes


def test_chunked_caching_activations_scale_with_the_chunk_not_the_batch():
    """train.chunk_pairs: c: the LLM, connector and tower terms are those of c pairs, whatever
    data.pairs_per_rank; the loss (over the whole batch) and the model states do not change."""
    base = ["model.llm.gradient_checkpointing=false", "data.pairs_per_rank=64"]
    whole = make_plan(load_config(PAPER, base), nodes=1, gpus_per_node=8)
    eight = make_plan(load_config(PAPER, ["model.llm.gradient_checkpointing=false", "data.pairs_per_rank=8"]),
                      nodes=1, gpus_per_node=8)
    chunked = {c: make_plan(load_config(PAPER, [*base, f"train.chunk_pairs={c}"]), nodes=1, gpus_per_node=8)
               for c in (8, 16)}
    for key in ("llm_activations", "connector_activations", "vision_forward"):
        assert chunked[8].row(key).bytes == pytest.approx(eight.row(key).bytes), key
        assert chunked[16].row(key).bytes == pytest.approx(2 * chunked[8].row(key).bytes), key
        assert whole.row(key).bytes == pytest.approx(8 * chunked[8].row(key).bytes), key
    for key in ("loss", "parameters", "gradients", "optimizer"):
        assert chunked[8].row(key).bytes == whole.row(key).bytes, key
    cache = chunked[8].row("tower_cache").bytes  # the tower's outputs of all 128 notes, kept for pass 2
    assert 0 < cache < 0.1 * whole.row("llm_activations").bytes
    assert chunked[8].total() < 0.7 * whole.total()
    assert "chunked representation caching" in format_plan(chunked[8])
    assert chunked[8].to_dict()["micro_batch"]["chunk_pairs"] == 8


@pytest.mark.parametrize("chunk", [0, 8])
def test_vision_cache_takes_the_tower_off_the_gpu(chunk):
    """data.vision_cache: no tower weights and no tower forward on the GPU, the batch's cached features
    instead (those are also the kept outputs of chunked caching); the other rows do not change."""
    base = ["data.pairs_per_rank=64", f"train.chunk_pairs={chunk}"]
    live = make_plan(load_config(PAPER, base), nodes=1, gpus_per_node=8)
    cached = make_plan(load_config(PAPER, [*base, "data.vision_cache=/cache"]), nodes=1, gpus_per_node=8)
    assert live.row("vision_weights").bytes > 1e9 and cached.row("vision_weights").bytes == 0  # ViT-bigG
    keys = {r.key for r in cached.rows}
    assert "vision_forward" not in keys and "tower_cache" not in keys
    # by hand: 128 notes x (256 patches + CLS, + the pooled vector) x width 1664 x 2 bytes (bf16)
    assert cached.row("cached_features").bytes == 128 * 258 * 1664 * 2 == 109_903_872
    if chunk:
        assert cached.row("cached_features").bytes == live.row("tower_cache").bytes
    for r in live.rows:
        if r.key not in ("vision_weights", "vision_forward", "tower_cache"):
            assert cached.row(r.key).bytes == r.bytes, r.key
    assert cached.total() < live.total() - live.row("vision_weights").bytes + 1


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_what_autograd_saves(attn, dtype):
    """Sum the distinct storages autograd keeps for backward in a small Qwen2 trunk (weights excluded),
    without and (sdpa) with gradient checkpointing (as notellm2.modeling.backbone enables it). With it,
    the forward keeps what the checkpointed layers need to restart, and backward recomputes one layer at
    a time: the peak is that plus one layer's share of the full forward's saved tensors (eager differs
    from sdpa only inside that layer's share, checked without checkpointing)."""
    from transformers import AutoModel, Qwen2Config

    h, f, layers, heads, kv_heads, n, s = 64, 176, 3, 4, 2, 4, 48

    def saved_bytes(checkpointing: bool) -> int:
        cfg = Qwen2Config(hidden_size=h, intermediate_size=f, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, vocab_size=128, attn_implementation=attn)
        torch.manual_seed(0)
        model = AutoModel.from_config(cfg).to(dtype).train()
        model.config.use_cache = False
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if t.is_floating_point() and st.data_ptr() not in weights:
                saved[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(0, 128, (n, s))).last_hidden_state.sum().backward()
        return sum(saved.values())

    arch = LLMArch("qwen2", 0, 0, h, layers, heads, kv_heads * (h // heads), f)
    a = 2 if dtype == torch.bfloat16 else 4
    full = saved_bytes(False)
    est = llm_activation_bytes(arch, n, s, a, False, attn)
    assert abs(est / full - 1) < 0.05, (est, full)
    if attn == "sdpa":
        kept = saved_bytes(True)
        assert kept < full / 2  # checkpointing really dropped the layers' activations
        # measured here: 1.01 (fp32), 1.03 (bf16); eager gave 1.00 in both
        est_on = llm_activation_bytes(arch, n, s, a, True, attn)
        assert abs(est_on / (kept + full / layers) - 1) < 0.05, (est_on, kept, full)


def test_plan_cli_on_paper_scale_runs_offline_and_prints_the_table():
    env = base_env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    p = subprocess.run([sys.executable, "-m", "notellm2.launcher", "plan", "--config", "configs/paper_scale.yaml", "--nodes", "2",
                        "--gpus-per-node", "8", "--gpu-memory-gib", "80"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "2 node(s) x 8 GPU(s) = 16 ranks" in out and "ZeRO-3" in out
    for label in ("parameters (bf16, 1/16 partition)", "gradients", "optimizer states", "gathered-module buffer",
                  "frozen vision tower", "LLM activations (gradient checkpointing on", "connector activations", "**total**"):
        assert label in out, (label, out)
    assert "| 7.07 B |" in out and "| 1.84 B |" in out
    ratio = float(re.search(r"DeepSpeed's estimator [\d.]+ GiB \(ratio ([\d.]+)\)", out).group(1))
    assert abs(ratio - 1) < 0.01


@pytest.mark.parametrize("variant,spare", [("notellm2", 8), ("text_only", 8), ("notellm2", 0)])
def test_plan_json_counts_what_the_real_encoder_holds(tmp_path, capsys, variant, spare):
    """The plan sizes the model from its configs alone; here the real encoder is built as training builds
    it (notellm2.modeling.encoder.build_all) from a tiny Qwen2 (with spare embedding rows, as Qwen2
    checkpoints have, or without: then training grows the matrix by the placeholder rows, which the
    plan reads from the tokenizer) and a tiny CLIP, and its parameters counted. The model-state bytes are then worked
    out by hand from those counts: fp32 ZeRO-3 on 8 GPUs keeps 4 (parameters) + 4 (gradients) + 8 (Adam
    m, v) bytes per trainable parameter, an eighth of each on a GPU, and gathers the largest module (the
    embedding) whole in fp32; the frozen tower is replicated in fp32; the loss keeps 3 fp32 copies of
    8 notes x 64 logit columns (8 notes per GPU x 8 GPUs), twice under notellm2's mICL."""
    from notellm2.launcher.cli import main
    from notellm2.modeling.encoder import build_all
    from tests.helpers.models import make_tiny_clip_dir, make_tiny_llm_dir
    from tests.helpers.paths import TINY_CPU

    overrides = [f"model.llm.path={make_tiny_llm_dir(tmp_path, arch='qwen2', spare_rows=spare)}",
                 f"model.vision.path={make_tiny_clip_dir(tmp_path)}", f"model.variant={variant}"]
    cfg = load_config(TINY_CPU, overrides)
    model, tower, _ = build_all(cfg.model, cfg.loss)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters())  # nothing in the note model is frozen
    connector = sum(p.numel() for p in model.connector.parameters()) if model.connector is not None else 0
    frozen = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    embedding = model.llm.get_input_embeddings().weight.numel()
    assert embedding == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

    from deepspeed.accelerator import get_accelerator

    get_accelerator()  # its first call logs a line (in-process, onto the captured stdout): not in the JSON
    capsys.readouterr()
    assert main(["plan", "--config", TINY_CPU, *overrides, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["gpus"], data["zero_stage"], data["precision"]) == (8, 3, "fp32")
    params = data["params"]
    assert (params["trainable"], params["connector"], params["vision_frozen"]) == (trainable, connector, frozen)
    assert params["largest_module"] == embedding
    assert (connector > 0, frozen > 0) == ((True, True) if variant == "notellm2" else (False, False))
    rows = data["bytes_per_gpu"]
    assert rows["parameters"] == 4 * trainable / 8 and rows["gradients"] == 4 * trainable / 8
    assert rows["optimizer"] == 8 * trainable / 8 and rows["gathered"] == 4 * embedding
    assert data["model_states_bytes_per_gpu"] == 16 * trainable / 8 + 4 * embedding
    assert rows.get("vision_weights", 0) == 4 * frozen
    assert rows["loss"] == 3 * 4 * 8 * 64 * (2 if variant == "notellm2" else 1)


def test_plan_errors_name_the_key_or_file(tmp_path, capsys):
    empty = tmp_path / "nollm"
    empty.mkdir()
    with pytest.raises(PlanError, match=r"model\.llm\.path: .* has no config\.json"):
        make_plan(load_config(PAPER, [f"model.llm.path={empty}"]))
    ds = tmp_path / "stage1.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    with pytest.raises(PlanError, match=r"stage1\.json: zero_optimization\.stage is 1"):
        make_plan(load_config(PAPER, [f"train.ds_config={ds}"]))
    with pytest.raises(PlanError, match=r"train\.ds_config: .*missing\.json.* does not exist"):
        make_plan(load_config(PAPER, ["train.ds_config=missing.json"]))
    from notellm2.launcher.cli import main

    assert main(["plan", "--config", PAPER, f"model.vision.path={empty}"]) == 2
    assert "model.vision.path" in capsys.readouterr().err


def test_format_mentions_fit_and_offload_cpu_memory():
    plan = make_plan(load_config(PAPER, ["train.ds_config=ds_configs/zero3_offload.json"]), nodes=1, gpus_per_node=8)
    text = format_plan(plan, gpu_memory_gib=24)
    assert "ZeRO-3, optimizer + parameters offloaded to CPU" in text
    assert plan.row("optimizer").bytes == 0 and plan.row("parameters").bytes == 0
    # 8 GPUs x (4 + 12 + 2) B x P / 8, P from the published architectures plus the connector and head
    p = _qwen_expected(3584, 18944, 28, 28, 4, 152064) + plan.new.connector_params + plan.new.other_params
    assert plan.cpu_bytes_per_node == pytest.approx(18 * p)
    cpu = re.search(r"CPU memory per node for offloaded states: ([\d.]+) GiB", text)
    assert cpu and float(cpu.group(1)) == pytest.approx(18 * p / GiB, abs=0.05)
    total = plan.total() / GiB
    for gib, verdict in ((total - 1, "DOES NOT FIT"), (total + 1, "fits")):
        line = [ln for ln in format_plan(plan, gpu_memory_gib=gib).splitlines() if ln.startswith("GPU memory")]
        assert len(line) == 1 and f": {verdict}, headroom {gib - total:.1f} GiB" in line[0], (line, gib, total)
