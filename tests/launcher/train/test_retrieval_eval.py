"""Retrieval evaluation during training (eval.notes_shards / eval.pairs) and checkpoint.keep_best."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from notellm2.launcher.train.checkpoint import BEST, MANIFEST, best_checkpoint, prune
from notellm2.launcher.config import ConfigError, load_config
from tests.helpers.paths import REPO
from tests.helpers.runs import metrics_by_step


def _fake_checkpoint(root, step, metrics=None):
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"step": step, "metrics": metrics or {}}))
    return path


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    paths = [_fake_checkpoint(tmp_path, s) for s in (2, 4, 6, 8)]
    (tmp_path / BEST).write_text(paths[1].name)
    removed = prune(str(tmp_path), keep_last=1)
    assert sorted(os.listdir(tmp_path)) == sorted([BEST, paths[1].name, paths[3].name])
    assert [os.path.basename(p) for p in removed] == [paths[0].name, paths[2].name]
    assert best_checkpoint(str(tmp_path)) == str(paths[1])
    (tmp_path / BEST).write_text("step_99999999")  # a pointer to nothing protects nothing
    assert best_checkpoint(str(tmp_path)) is None


def test_improves_higher_for_recall_lower_for_loss(tmp_path):
    from notellm2.launcher.train.checkpoint import Checkpointer

    cfg = load_config(os.path.join(REPO, "configs", "tiny_cpu.yaml"),
                      [f"train.output_dir={tmp_path}", "eval.every_steps=2", "checkpoint.keep_best=eval/recall@10"])
    c = Checkpointer(cfg, 0, 1)
    assert not c.improves({"loss/total": 1.0})  # the metric is not logged at this step
    assert c.improves({"eval/recall@10": 0.1})
    c.best_value = 0.1
    assert not c.improves({"eval/recall@10": 0.1}) and c.improves({"eval/recall@10": 0.2})
    c.best_metric, c.best_value = "eval/val_loss", 2.0
    assert c.improves({"eval/val_loss": 1.5}) and not c.improves({"eval/val_loss": 2.5})


def test_config_rules(tmp_path):
    tiny = os.path.join(REPO, "configs", "tiny_cpu.yaml")
    with pytest.raises(ConfigError, match="eval.notes_shards and eval.pairs"):
        load_config(tiny, ["eval.notes_shards=x-*.tar"])
    with pytest.raises(ConfigError, match="eval.probes"):
        load_config(tiny, ["eval.probes=[both, sound]"])
    with pytest.raises(ConfigError, match="checkpoint.keep_best.*eval.every_steps"):
        load_config(tiny, ["checkpoint.keep_best=eval/recall@10"])


@pytest.mark.slow
def test_two_ranks_log_recall_of_both_probes_equal_to_an_offline_eval_and_keep_the_best(tmp_path):
    """2 gloo ranks, ZeRO-3, fp32: eval/recall@K and eval/image_recall@K every 2 steps; the figure at
    step 4 equals what the exported step-4 model gives in one process on the same slice and pairs; the
    `best` pointer names the step with the best eval/recall@10 and that checkpoint is kept beside the last 2
    (test_prune_keeps_the_last_k_and_the_best covers a best older than the kept ones)."""
    from notellm2.launcher.eval.embed import embed_notes
    from notellm2.launcher.eval.evaluate import recall_at_k
    from notellm2.modeling.pretrained import NoteEncoder
    from notellm2.launcher.train.validation import read_val_pairs
    from tests.helpers.multirank import run_command
    from tests.helpers.real_setup import build_inputs, write_config

    inputs = build_inputs(str(tmp_path / "in"))
    shard_dir = os.path.dirname(inputs["train_shards"])
    notes = os.path.join(shard_dir, "notes-val-*.tar")
    pairs = str(tmp_path / "in" / "data" / "pairs")
    run = str(tmp_path / "run")
    cfg_path = write_config(str(tmp_path / "run.yaml"), inputs, run, precision="fp32")
    ov = [f"eval.notes_shards={notes}", f"eval.pairs={pairs}", "eval.max_notes=40", "eval.k_values=[5, 10]",
          "eval.batch_size=8", "checkpoint.keep_best=eval/recall@10", "checkpoint.keep_last=2",
          "checkpoint.every_steps=4", "train.max_steps=6"]
    res = run_command(["-m", "notellm2.launcher", "train", "--config", cfg_path, *ov], nproc=2, timeout=400)
    m = metrics_by_step(run)
    evals = {s: {k: v for k, v in r.items() if k.startswith("eval/")} for s, r in m.items() if "eval/recall@10" in r}
    assert sorted(evals) == [2, 4, 6], res.output[-2000:]
    # the frozen tower's outputs of the first evaluation are reused by the later ones (TowerMemo), and
    # the figures below still equal an offline evaluation of the model
    reused = [int(x) for x in re.findall(r"tower outputs reused for (\d+) batches", res.output)]
    assert len(reused) == 3 and reused[0] < reused[1] < reused[2], res.output[-2000:]  # the image probe reuses
    # the full input's batches already in the first evaluation
    for s, r in evals.items():
        assert {"eval/recall@5", "eval/recall@10", "eval/image_recall@5", "eval/image_recall@10",
                "eval/val_loss"} <= set(r), r
        assert r["eval/retrieval_pairs"] > 0 and 0 <= r["eval/recall@5"] <= r["eval/recall@10"] <= 1
        assert "perf/eval_s" in m[s]
    # the logged figure is the model's: export step 4 and evaluate it in one process
    out = subprocess.run([sys.executable, "-m", "notellm2.launcher", "export", "--run-dir", run, "--step", "4", "--out",
                          str(tmp_path / "exp4")], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    enc = NoteEncoder.from_pretrained(str(tmp_path / "exp4"))
    cfg = load_config(cfg_path, ov)
    val_pairs = read_val_pairs(cfg)
    for probe, prefix in (("both", ""), ("image", "image_")):
        ids, vecs = embed_notes(enc.note_model, enc.vision_tower, enc.prompter, notes, cfg.data, 8, probe,
                                image_size=enc.image_size, progress=False, max_notes=40)
        report = recall_at_k(torch.from_numpy(vecs), ids, val_pairs, [5, 10])
        assert report.num_pairs == evals[4][f"eval/{prefix}retrieval_pairs"]
        for k in (5, 10):
            assert report.recall[k] == pytest.approx(evals[4][f"eval/{prefix}recall@{k}"], abs=1e-12), (probe, k)
    # keep_best: the pointer names the first step with the highest recall@10, whose checkpoint is kept
    best_step = max(evals, key=lambda s: (evals[s]["eval/recall@10"], -s))
    root = os.path.join(run, "checkpoints")
    best = best_checkpoint(root)
    assert best is not None and os.path.basename(best) == f"step_{best_step:08d}"
    manifest = json.load(open(os.path.join(best, MANIFEST)))
    assert manifest["metrics"]["eval/recall@10"] == evals[best_step]["eval/recall@10"]
    kept = sorted(d for d in os.listdir(root) if d.startswith("step_") and "." not in d)
    assert kept == sorted({f"step_{best_step:08d}", "step_00000004", "step_00000006"})  # a superseded best is pruned


def test_tower_memo_reuses_only_the_exact_same_pixels():
    """TowerMemo serves stored tower outputs only for a batch with the same note ids and the same
    uint8 pixels; a changed pixel, another note list, or a memo with no room runs the tower again."""
    from notellm2.launcher.train.validation import TowerMemo

    calls = []

    class Tower(torch.nn.Module):
        def forward(self, px):
            calls.append(px.shape[0])
            return px.mean(dim=(2, 3), keepdim=False)[:, None, :].repeat(1, 2, 1), px.mean(dim=(1, 2, 3))[:, None]

    def batch(ids, px):
        cpu = {"note_id_strs": ids, "pixel_values": px}
        return cpu, {"note_id_strs": ids, "pixel_values": px.float() / 255}

    g = torch.Generator().manual_seed(0)
    px = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, generator=g)
    memo = TowerMemo(Tower(), max_mb=1)
    first = memo(*batch(["a", "b"], px))
    again = memo(*batch(["a", "b"], px.clone()))
    assert calls == [2] and memo.hits == 1 and all(torch.equal(x, y) for x, y in zip(first, again))
    flipped = px.clone()
    flipped[0, 0, 0, 0] ^= 1
    memo(*batch(["a", "b"], flipped))
    memo(*batch(["b", "a"], px))
    assert calls == [2, 2, 2] and memo.misses == 3
    cast = memo(*batch(["a", "b"], px), cast=torch.float64)
    assert cast[0].dtype == torch.float64 and memo.hits == 2
    full = TowerMemo(Tower(), max_mb=0)
    full(*batch(["a", "b"], px)), full(*batch(["a", "b"], px))
    assert calls == [2, 2, 2, 2, 2] and not full.store
