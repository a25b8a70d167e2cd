"""`notellm2 analyze attention`: the saliency flows of the contrastive loss, checked by hand.

The reference below never asks transformers for attention: it runs the tiny Llama's two layers itself
(projections, rotary, causal + padding mask, softmax, GQA), keeps each layer's probabilities A as
tensors of its own, takes dL/dA with autograd through the model's own head and loss, and averages
|sum_h A * dL/dA| with plain loops over spans read off each prompt's token list. The library's flows
(eager attention, output_attentions, spans from marker positions) must match it.
"""
import csv
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from notellm2.launcher.eval.attention import FLOWS, analyze_batches, load_model, pair_batches
from notellm2.launcher.config import config_from_dict
from notellm2.modeling.encoder import build_all
from tests.helpers.models import context_reading_llm_dir, make_tiny_clip_dir
from tests.helpers.data import synthetic_shards
from tests.helpers.multirank import REPO, base_env

VARIANTS = ("notellm2", "basic_mm", "text_only")


def _llm_that_reads_context(root) -> str:
    """make_tiny_llm_dir's 2-layer Llama with its decoder matrices redrawn from N(0, 0.1): at the
    initializer's 0.02 every attention row is nearly uniform, and a mix-up of rows or spans would
    change the flows too little to see."""
    return context_reading_llm_dir(root, seed=1)


def _model_cfg(variant: str, llm: str, clip: str) -> dict:
    return {"variant": variant, "llm": {"path": llm, "attn_implementation": "sdpa"},
            "vision": {"kind": "hf", "path": clip, "image_size": 32},
            "connector": {"kind": "qformer", "num_query_tokens": 2, "num_layers": 1, "hidden_size": 32, "num_heads": 2},
            "max_text_tokens": 16, "embed_dim": 8}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {"root": root, "llm": _llm_that_reads_context(root), "clip": make_tiny_clip_dir(str(root), hidden=32, layers=1)}


def _build(dirs, variant: str, seed: int = 0):
    cfg = config_from_dict({"model": _model_cfg(variant, dirs["llm"], dirs["clip"])})
    torch.manual_seed(seed)
    note_model, tower, prompter = build_all(cfg.model, cfg.loss)
    return cfg, note_model.eval(), tower, prompter


NOTES = [
    {"note_id": "a", "title": "cat photos", "content": "cute kitten on the beach", "topics": ["cat"], "has_image": True},
    {"note_id": "b", "title": "pasta", "content": "tomato sauce recipe", "topics": ["cooking"], "has_image": True},
    {"note_id": "c", "title": "mountains", "content": "lakes", "topics": ["travel", "summer"], "has_image": False},
    {"note_id": "d", "title": "lipstick review", "content": "matte red color", "topics": [], "has_image": True},
    {"note_id": "e", "title": "coffee", "content": "garden flowers city night", "topics": ["city"], "has_image": True},
    {"note_id": "f", "title": "dog", "content": "quick brown fox", "topics": ["dog"], "has_image": True},
]


def _batch(prompter, padding_side="right"):
    """Three pairs ([queries; targets]: a-d, b-e, c-f) with pixels; note c has no image."""
    encs = [prompter.encode(n) for n in NOTES[:3] + NOTES[3:]]
    batch = prompter.collate(encs, padding_side=padding_side)
    batch["note_ids"] = torch.arange(len(encs), dtype=torch.long) + 100
    batch["pixel_values"] = torch.randn(len(encs), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return batch, encs


# ----------------------------------------------------------------------------- the hand computation

def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class ManualLlama(nn.Module):
    """The Llama decoder computed step by step; `probs` holds each layer's softmax output (in the graph)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf
        self.probs = []

    def get_input_embeddings(self):
        return self.hf.get_input_embeddings()

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache=False, **_):
        cfg = self.hf.config
        n, length, _ = inputs_embeds.shape
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        d = cfg.hidden_size // heads
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        allowed = causal.view(1, 1, length, length) & attention_mask.bool().view(n, 1, 1, length)
        cos, sin = self.hf.rotary_emb(inputs_embeds, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        h = inputs_embeds
        self.probs = []
        for layer in self.hf.layers:
            att = layer.self_attn
            x = layer.input_layernorm(h)
            q = att.q_proj(x).view(n, length, heads, d).transpose(1, 2)
            k = att.k_proj(x).view(n, length, kv_heads, d).transpose(1, 2)
            v = att.v_proj(x).view(n, length, kv_heads, d).transpose(1, 2)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
            a = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
            self.probs.append(a)
            out = (a @ v).transpose(1, 2).reshape(n, length, heads * d)
            h = h + att.o_proj(out)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return SimpleNamespace(last_hidden_state=self.hf.norm(h))


def _hand_spans(variant, prompter, encs, length, padding_side):
    """Per row (rep, image keys or None, text keys, real keys), read off each prompt's own id list."""
    rows = []
    for e in encs:
        ids = list(e["input_ids"])
        off = length - len(ids) if padding_side == "left" else 0
        rep = off + len(ids) - 1
        real = list(range(off, off + len(ids)))
        if variant == "text_only":
            image, text = None, [j for j in real if j < rep]
        elif variant == "notellm2" and prompter.img_emb_id in ids:
            marker = off + ids.index(prompter.img_emb_id)
            image = [j for j in real if j < marker]
            text = [j for j in real if marker < j < rep]
        else:
            image = [off + i for i, t in enumerate(ids) if t == prompter.img_id]
            text = [j for j in real if j < rep and j not in image]
        rows.append((rep, image, text, real))
    return rows


def _hand_flows(saliency, spans):
    """{flow: [layers] mean over rows of row means} with loops; image None where no row has an image span."""
    out = {f: [] for f in FLOWS}
    for s in saliency:
        per = {f: [] for f in FLOWS}
        for n, (rep, image, text, real) in enumerate(spans):
            if image:
                per["image"].append(sum(float(s[n, rep, j]) for j in image) / len(image))
            per["text"].append(sum(float(s[n, rep, j]) for j in text) / len(text))
            counted = set(text) | set(image or [])
            other = [float(s[n, i, j]) for i in real for j in real if j < i and not (i == rep and j in counted)]
            per["other"].append(sum(other) / len(other))
        for f in FLOWS:
            out[f].append(sum(per[f]) / len(per[f]) if per[f] else None)
    return out


def _reference(note_model, tower, batch):
    hf = note_model.llm
    manual = ManualLlama(hf)
    with torch.no_grad():
        tokens, pooled = tower(batch["pixel_values"]) if tower is not None else (None, None)
    note_model.llm = manual
    try:
        loss = note_model(batch, tokens, pooled)["loss"]
    finally:
        note_model.llm = hf
    grads = torch.autograd.grad(loss, manual.probs)
    return [(a * g).sum(dim=1).abs().detach() for a, g in zip(manual.probs, grads)], tokens


@pytest.mark.parametrize("variant,padding_side", [("notellm2", "right"), ("notellm2", "left"),
                                                  ("basic_mm", "right"), ("text_only", "right")])
def test_flows_match_a_hand_computation_on_a_two_layer_model(dirs, variant, padding_side):
    _, note_model, tower, prompter = _build(dirs, variant)
    batch, encs = _batch(prompter, padding_side)
    saliency, tokens = _reference(note_model, tower, batch)
    # the manual forward is the model's forward: same hidden states at every real position
    embeds = note_model._embed_inputs(batch["input_ids"], batch["attention_mask"], tokens)
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = ManualLlama(note_model.llm)(embeds, batch["attention_mask"], pos).last_hidden_state
        theirs = note_model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], position_ids=pos).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], theirs[real], atol=1e-5), (ours[real] - theirs[real]).abs().max()

    hand = _hand_flows(saliency, _hand_spans(variant, prompter, encs, batch["input_ids"].shape[1], padding_side))
    report = analyze_batches(note_model, tower, [batch], variant, max_batches=1)
    assert note_model.llm.config._attn_implementation == "sdpa"  # eager was for the analysis only
    assert report.num_layers == 2 and report.batches == 1 and report.rows == 6
    for f in FLOWS:
        got = report.raw(f)
        if hand[f][0] is None:
            assert f == "image" and variant == "text_only" and got == [None, None]
            continue
        assert all(h > 0 for h in hand[f][:1]), (f, hand[f])  # layer 0: every flow is there
        assert got == pytest.approx(hand[f], rel=1e-4, abs=1e-12), (f, got, hand[f])
    for layer in range(2):
        present = {f: hand[f][layer] for f in FLOWS if hand[f][layer] is not None}
        total = sum(present.values())
        for f, v in present.items():
            assert report.normalised(f)[layer] == pytest.approx(v / total, rel=1e-4)
        assert sum(report.normalised(f)[layer] for f in present) == pytest.approx(1.0)
    if variant == "notellm2":
        # note c (no image) counts for text and other, not for image
        assert report.counts["image"] == [5, 5] and report.counts["text"] == [6, 6]


def test_left_and_right_padding_give_the_same_flows(dirs):
    _, note_model, tower, prompter = _build(dirs, "notellm2")
    reports = [analyze_batches(note_model, tower, [_batch(prompter, side)[0]], side, max_batches=1)
               for side in ("right", "left")]
    assert reports[0].counts == reports[1].counts
    for f in FLOWS:
        assert reports[1].raw(f) == pytest.approx(reports[0].raw(f), rel=1e-4)


def _cut_image_from_representation(note_model, prompter):
    """A forward pre-hook on the LLM that turns its 2D mask into a 4D additive one in which the
    representation position of each row cannot attend to that row's image tokens (slot tokens, or
    for mICL the whole image note), in every layer."""
    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        if mask.dim() != 2:
            return args, kwargs
        n, length = mask.shape
        allowed = torch.tril(torch.ones(length, length, dtype=torch.bool)).expand(n, length, length).clone()
        allowed &= mask.bool().view(n, 1, length)
        ids = module._cut_ids
        for row in range(n):
            real = [j for j in range(length) if mask[row, j]]
            rep = real[-1]
            row_ids = ids[row].tolist()
            if note_model.spec.micl and prompter.img_emb_id in row_ids:
                image = [j for j in real if j < row_ids.index(prompter.img_emb_id)]
            else:
                image = [j for j in real if row_ids[j] == prompter.img_id]
            allowed[row, rep, image] = False
        additive = torch.zeros(n, 1, length, length).masked_fill(~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
        return args, dict(kwargs, attention_mask=additive)
    return note_model.llm.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("variant", ["notellm2", "basic_mm"])
def test_image_tokens_cut_off_from_the_representation_have_zero_image_flow(dirs, variant):
    _, note_model, tower, prompter = _build(dirs, variant)
    batch, _ = _batch(prompter)
    open_report = analyze_batches(note_model, tower, [batch], "open", max_batches=1)
    assert all(v > 0 for v in open_report.raw("image")[:1])  # the control: the same batch, image flows in
    note_model.llm._cut_ids = batch["input_ids"]
    handle = _cut_image_from_representation(note_model, prompter)
    try:
        cut = analyze_batches(note_model, tower, [batch], "cut", max_batches=1)
    finally:
        handle.remove()
    assert cut.raw("image") == [0.0, 0.0]
    assert cut.normalised("image") == [0.0, 0.0]
    assert all(v > 0 for v in cut.raw("text")) and all(v > 0 for v in cut.raw("other")[:1])


# ----------------------------------------------------------------------------- the command line

def write_tiny_export(out_dir: str, cfg, note_model, prompter) -> str:
    """An export of a built model (no training: the analysis only needs some weights), written by the
    exporter's own `write_export`."""
    from notellm2.launcher.export import write_export

    return write_export(note_model.state_dict(), cfg, out_dir, source={"run_dir": "", "checkpoint": "", "step": 0})


@pytest.fixture(scope="module")
def cli_setup(dirs):
    root = dirs["root"]
    shard_dir, _ = synthetic_shards(str(root / "data"), n_notes=30, n_categories=3, n_pairs=40, shard_size=10,
                                    image_size=32, splits=("test",))
    exports = {}
    for variant in ("notellm2", "text_only"):
        cfg, note_model, _, prompter = _build(dirs, variant, seed=3)
        exports[variant] = write_tiny_export(str(root / f"export-{variant}"), cfg, note_model, prompter)
    return {"root": root, "exports": exports, "pairs": os.path.join(shard_dir, "pairs-test-*.tar"),
            "notes": os.path.join(shard_dir, "notes-test-*.tar")}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "notellm2.launcher", "analyze", "attention", *args], capture_output=True,
                          text=True, cwd=REPO, env=base_env(), timeout=300)


def test_cli_writes_csv_png_json_for_two_variants(cli_setup):
    from PIL import Image

    out = cli_setup["root"] / "analysis"
    r = _cli("--model", f"nl2={cli_setup['exports']['notellm2']}", f"text={cli_setup['exports']['text_only']}",
             "--shards", cli_setup["pairs"], "--out", str(out), "--batches", "2", "--batch-size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "attention_flow.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(x["run"], x["variant"], x["layer"]) for x in rows] == [
        ("nl2", "notellm2", "0"), ("nl2", "notellm2", "1"), ("text", "text_only", "0"), ("text", "text_only", "1")]
    for x in rows:
        flows = [x[f"{f}_flow"] for f in FLOWS]
        if x["variant"] == "text_only":
            assert x["image_flow"] == "" and x["image_flow_raw"] == ""  # absent, not zero
            flows = flows[1:]
        assert sum(float(v) for v in flows) == pytest.approx(1.0)
    # the numbers are the library's on the same batches of the same export, in this process
    note_model, tower, prompter = load_model(cli_setup["exports"]["notellm2"])
    report = analyze_batches(note_model, tower, pair_batches(cli_setup["pairs"], prompter, 4, 32), "nl2", 2)
    assert report.batches == 2 and report.rows == 16
    for x in rows[:2]:
        for f in FLOWS:
            assert float(x[f"{f}_flow_raw"]) == pytest.approx(report.raw(f)[int(x["layer"])], rel=1e-5)
    meta = json.loads((out / "attention_flow.json").read_text())
    assert [m["image_flow"] for m in meta["runs"]] == ["present", "absent"]
    assert meta["runs"][0]["rows"] == 16 and "sum" in meta["normalisation"]
    with Image.open(out / "attention_flow.png") as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100
    assert "text (text_only): 2 batches, 16 notes; image flow share per layer: absent" in r.stdout


def test_cli_bad_inputs_are_one_line_errors(cli_setup):
    out = str(cli_setup["root"] / "bad")
    not_export = str(cli_setup["root"])
    cases = [
        (("--model", not_export, "--shards", cli_setup["pairs"]), [not_export, "notellm2_export.json"]),
        (("--model", cli_setup["exports"]["notellm2"], "--shards", cli_setup["notes"]), ["notes-test-", "no pairs"]),
        (("--model", cli_setup["exports"]["notellm2"], "--shards", "/nonexistent/pairs-*.tar"), ["/nonexistent/pairs-*.tar"]),
        (("--model", cli_setup["exports"]["notellm2"], "--shards", cli_setup["pairs"], "--batches", "0"), ["--batches"]),
    ]
    for args, needles in cases:
        r = _cli(*args, "--out", out)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert all(s in lines[0] for s in needles), (args, lines[0])
    assert not os.path.exists(out)
