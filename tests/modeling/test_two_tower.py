"""text_two_tower: the text two-tower baseline (all-MiniLM-L6-v2, mean pooling, raw text, one shared
encoder) through the same model code and trainer as the NoteLLM-2 variants."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from notellm2.launcher.config import load_config
from notellm2.modeling.encoder import build_all
from tests.helpers.multirank import REPO
from tests.helpers.paths import pretrained_model

NOTES = [
    {"note_id": "a", "title": "Red apple", "topics": ["fruit", "food"], "content": "A shiny red apple on a table.", "has_image": False},
    {"note_id": "b", "title": "Bicycle", "topics": ["sport"], "content": "", "has_image": True},
]


@pytest.fixture(scope="module")
def minilm_dir():
    return pretrained_model("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def built(minilm_dir):
    cfg = load_config(os.path.join(REPO, "configs", "minilm_two_tower.yaml"), [f"model.llm.path={minilm_dir}"])
    torch.manual_seed(0)
    model, tower, prompter = build_all(cfg.model, cfg.loss)
    return cfg, model.eval(), tower, prompter


def test_raw_text_inside_the_encoders_own_special_tokens(built):
    _, _, tower, prompter = built
    assert tower is None  # no image anywhere, not even for a note that has one
    tok = prompter.tokenizer
    enc = prompter.encode(NOTES[0])
    assert not enc["has_image"] and prompter.encode(NOTES[1])["has_image"] is False
    words = "Red apple fruit, food A shiny red apple on a table."
    assert enc["input_ids"] == tok(words)["input_ids"]  # [CLS] title topics content [SEP], no template
    assert prompter.encode(NOTES[0], mode="text") == enc
    with pytest.raises(ValueError, match="no image probe"):
        prompter.encode(NOTES[1], mode="image")


def test_untrained_two_tower_is_the_zero_shot_sentence_encoder(built, minilm_dir):
    """Our stack's untrained text_two_tower equals all-MiniLM-L6-v2 used directly (mean pooling, L2)."""
    from transformers import AutoModel

    _, model, _, prompter = built
    batch = prompter.collate([prompter.encode(n) for n in NOTES])  # right padding: note b is padded
    ours = model.encode(batch)
    ref_model = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        hs = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((hs * m).sum(1) / m.sum(1), dim=-1)
    assert ours.shape == (2, 384)
    assert (ours - ref).abs().max() <= 1e-5
    alone = model.encode(prompter.collate([prompter.encode(NOTES[1])]))  # padding does not leak into the mean
    assert (alone - ours[1:]).abs().max() <= 1e-5
    left = model.encode(prompter.collate([prompter.encode(n) for n in NOTES], padding_side="left"))
    assert (left - ours).abs().max() <= 1e-5


def test_projection_off_needs_the_backbone_width(minilm_dir):
    cfg = load_config(os.path.join(REPO, "configs", "minilm_two_tower.yaml"),
                      [f"model.llm.path={minilm_dir}", "model.embed_dim=64"])
    with pytest.raises(ValueError, match="model.embed_dim: got 64.*set model.embed_dim: 384"):
        build_all(cfg.model, cfg.loss)


@pytest.mark.slow
def test_the_trainer_trains_it_and_embed_reads_it(minilm_dir, tmp_path):
    """Two real training steps on 2 gloo ranks (ZeRO-3), export, and the exported encoder differs from
    the zero-shot one: the backbone itself was trained, not only a head."""
    from notellm2.modeling.pretrained import NoteEncoder
    from tests.helpers.data import synthetic_shards
    from tests.helpers.multirank import run_command

    shard_dir, manifest = synthetic_shards(str(tmp_path / "data"), n_notes=40, n_categories=4, n_pairs=80,
                                           shard_size=8, image_size=32, splits=("train",))
    run = tmp_path / "run"
    ov = [f"model.llm.path={minilm_dir}", f"data.train_shards={shard_dir}/{manifest['patterns']['pairs-train']}",
          "data.val_shards=", "data.notes_shards=", "data.pairs_per_rank=4", "data.shuffle_buffer=8", f"train.output_dir={run}",
          "train.max_steps=2", "train.warmup_steps=0", "train.lr_llm=1e-3", "checkpoint.every_steps=2",
          "train.collective_timeout_s=120"]
    res = run_command(["-m", "notellm2.launcher", "train", "--config", "configs/minilm_two_tower.yaml", *ov], nproc=2, timeout=300)
    assert res.returncode == 0, res.output[-3000:]
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "export", "--run-dir", str(run), "--out", str(tmp_path / "exp")],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    trained = NoteEncoder.from_pretrained(str(tmp_path / "exp"))
    assert trained.variant == "text_two_tower" and trained.vision_tower is None
    cfg = load_config(os.path.join(REPO, "configs", "minilm_two_tower.yaml"), [f"model.llm.path={minilm_dir}"])
    zero, _, prompter = build_all(cfg.model, cfg.loss)
    batch = prompter.collate([prompter.encode(n) for n in NOTES])
    a, b = trained.note_model.eval().encode(batch), zero.eval().encode(batch)
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(a.norm(dim=-1), torch.ones(2), atol=1e-5)
