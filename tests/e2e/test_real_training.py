"""The engine driving the real pieces: NoteModel (tiny Llama + tiny CLIP + Q-Former + gate) trained
on real WebDataset shards through the `notellm2 train` CLI on 2 CPU ranks (ZeRO-3): TensorBoard
scalars, exact resume after kill -9, ZeRO-3 partitioning, checkpoints without the vision tower,
and export -> NoteEncoder.from_pretrained giving the live model's embeddings."""
from __future__ import annotations

import os

import pytest
import torch

from notellm2.launcher.train import checkpoint as ckpt
from tests.helpers.multirank import run_command, run_ranks
from tests.helpers.runs import metrics_by_step
from tests.helpers.real_setup import build_inputs, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(str(tmp_path_factory.mktemp("real-inputs")))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-ref")
    run_dir = str(root / "run")
    cfg = write_config(str(root / "run.yaml"), inputs, run_dir)
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg], nproc=2, timeout=300)
    return {"run_dir": run_dir, "config": cfg, "output": r.output}


def test_real_training_logs_tensorboard_and_progress(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert "eta" in reference["output"] and "step 4/4" in reference["output"]
    acc = EventAccumulator(os.path.join(reference["run_dir"], "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"loss/total", "loss/mm", "loss/vis", "lr/llm", "lr/new", "model/logit_scale", "model/gate_mean",
                "model/gate_std", "optim/grad_norm", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/data_wait_frac", "memory/rank0_mb", "memory/rank1_mb", "data/batches", "data/dropped_total"}
    assert expected <= tags, expected - tags
    loss = [e.value for e in acc.Scalars("loss/total")]
    assert len(loss) == 4 and loss[-1] < loss[0], loss  # it learns on this easy synthetic task
    # the mICL total is the weighted mix of its parts (9:1); each rank mixes its fp32 parts, then the
    # three are averaged over ranks in float64, so the identity holds to fp32 rounding (~1e-7)
    m = metrics_by_step(reference["run_dir"])
    assert sorted(m) == [1, 2, 3, 4]
    for s in m:
        assert m[s]["loss/total"] == pytest.approx((9 * m[s]["loss/mm"] + m[s]["loss/vis"]) / 10, rel=1e-6), (s, m[s])
    assert acc.Scalars("lr/llm")[0].value == pytest.approx(1e-3) and acc.Scalars("lr/new")[0].value == pytest.approx(3e-3)
    # the gate is trained: its mean over the image rows moves from step to step
    gate = [e.value for e in acc.Scalars("model/gate_mean")]
    assert len(gate) == 4 and len(set(gate)) == 4, gate
    assert acc.Scalars("data/batches")[-1].value == 8  # 4 steps x 2 ranks
    # validation loss on the val shards every eval.every_steps=2 steps
    val = acc.Scalars("eval/val_loss")
    val_mm, val_vis = acc.Scalars("eval/val_loss_mm"), acc.Scalars("eval/val_loss_vis")
    assert [e.step for e in val] == [e.step for e in val_mm] == [e.step for e in val_vis] == [2, 4]
    for total, mm, vis in zip(val, val_mm, val_vis):  # the same 9:1 mix, summed over the val batches
        assert total.value == pytest.approx((9 * mm.value + vis.value) / 10, rel=1e-6), (total, mm, vis)
    # held-out pairs: the loss falls between the two passes too (the pass reads the trained weights)
    assert val[1].value < val[0].value, [e.value for e in val]


def test_real_checkpoint_has_no_vision_weights(reference):
    path = ckpt.latest_complete(ckpt.checkpoint_root(reference["run_dir"]))
    states = torch.load(os.path.join(path, "zero_pp_rank_0_mp_rank_00_model_states.pt"), weights_only=False)
    names = set().union(*[set(d) for d in states["param_shapes"]])
    assert any(n.startswith("llm.") for n in names) and any(n.startswith("connector.") for n in names)
    # the CLIP tower's own parameters (vision_model.embeddings.patch_embedding.weight, ...) are absent
    tower_like = sorted(n for n in names if "vision_model." in n or "patch_embedding" in n or "encoder.layers" in n)
    assert not tower_like, tower_like
    assert ckpt.read_manifest(path)["step"] == 4


def test_real_exact_resume_after_kill(reference, inputs, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "run.yaml"), inputs, run_dir)
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg], nproc=2, timeout=300,
                    env={"NOTELLM2_TEST_DIE_AT": "1:3"}, check=False)
    assert r.returncode != 0
    assert ckpt.latest_complete(ckpt.checkpoint_root(run_dir)).endswith("step_00000002")
    r = run_command(["-m", "notellm2.launcher", "train", "--config", cfg], nproc=2, timeout=300)
    assert "resumed step 2" in r.output
    ref, got = metrics_by_step(reference["run_dir"]), metrics_by_step(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for s in range(1, 5):
        assert got[s]["loss/total"] == ref[s]["loss/total"], (s, got[s]["loss/total"], ref[s]["loss/total"])
        assert got[s]["optim/grad_norm"] == ref[s]["optim/grad_norm"]


def live_vs_export(config: str, out_dir: str) -> dict:
    """In each of 2 ranks: train 2 fp32 steps, check the ZeRO-3 partition, embed one batch with the
    live (partitioned) model; rank 0 then exports the final checkpoint and embeds the same batch."""
    import torch.distributed as dist

    from notellm2.launcher.config import load_config
    from notellm2.launcher.export import export
    from notellm2.modeling.pretrained import NoteEncoder
    from notellm2.data_shards.batch import to_device as move_batch
    from notellm2.launcher.train.train import train

    cfg = load_config(config, ["train.precision=fp32", "train.max_steps=2"])
    summary = train(cfg)
    engine, comps = summary["engine"], summary["components"]
    held = sum(p.ds_tensor.numel() for p in engine.module.parameters())
    total = sum(p.ds_numel for p in engine.module.parameters())
    n_params = sum(1 for _ in engine.module.parameters())
    full_now = sum(p.numel() for p in engine.module.parameters())  # 0: gathered only inside forward
    batch = move_batch(next(iter(comps.make_loader(0))), torch.device("cpu"))  # uint8 pixels -> normalised
    tokens, pooled = comps.vision_tower(batch["pixel_values"])
    engine.module.eval()
    live = engine.module.encode(batch, tokens, pooled)
    dist.barrier()
    out = {"held": held, "total": total, "n_params": n_params, "full_now": full_now}
    if dist.get_rank() == 0:
        export(cfg.train.output_dir, out_dir)
        enc = NoteEncoder.from_pretrained(out_dir)
        model, tower, prompter = enc.note_model, enc.vision_tower, enc.prompter
        t2, p2 = tower(batch["pixel_values"])
        exported = model.encode(batch, t2, p2)
        out["max_diff"] = (exported - live).abs().max().item()
        out["norm"] = live.norm(dim=-1).mean().item()
        # the prompter rebuilt from the export encodes notes exactly like the training one
        note = {"note_id": "x", "title": "coffee garden", "content": "city night", "topics": ["summer"],
                "has_image": True}
        out["same_prompt"] = prompter.encode(note) == comps.prompter.encode(note)
    dist.barrier()
    return out


def test_zero3_partition_and_export_matches_live_model(inputs, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "run.yaml"), inputs, run_dir)
    r = run_ranks("tests.e2e.test_real_training:live_vs_export", nproc=2, timeout=300,
                  kwargs={"config": cfg, "out_dir": str(tmp_path / "export")})
    a, b = r.returns[0], r.returns[1]
    assert a["total"] == b["total"] > 100_000
    # each rank holds about half of every parameter (at most one padding element per parameter)
    for x in (a, b):
        assert abs(x["held"] - x["total"] / 2) <= x["n_params"], x
        assert x["full_now"] == 0
    assert a["norm"] == pytest.approx(1.0, abs=1e-4)
    assert a["max_diff"] < 1e-5, a
    assert a["same_prompt"]
