"""Rank functions for the multi-rank modeling tests (run by tests.helpers.multirank.run_ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from notellm2.data_shards.ids import note_id_hash  # the ids the reader gives the loss
from notellm2.modeling.config import ConnectorConfig, LLMConfig, LossConfig, ModelConfig, VisionConfig
from notellm2.modeling.encoder import build_all


def _note(k: int, role: str, has_image: bool = True) -> dict:
    words = ["cooking pasta", "travel diary", "lipstick review", "cute kitten", "coffee garden", "city night"]
    return {"note_id": f"{role}{k}", "title": f"{words[k % 6]} {k}", "content": f"{words[(k + 2) % 6]} " * (1 + k % 3),
            "topics": [words[(k + 4) % 6]], "has_image": has_image}


def _pairs(num_pairs: int):
    pairs = []
    for k in range(num_pairs):
        q, t = _note(k, "q"), _note(k, "t", has_image=k % 4 != 2)
        pairs.append((q, t))
    # The last pair's target is the same note as the first pair's query (it lands on another rank).
    pairs[-1] = (pairs[-1][0], pairs[0][0])
    return pairs


def _pixels(note_id: str, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(ord(c) * 31 ** i for i, c in enumerate(note_id)) % (2 ** 31))
    return torch.randn(3, size, size, generator=g)


def _batch(prompter, tower, pairs):
    notes = [q for q, _ in pairs] + [t for _, t in pairs]
    batch = prompter.collate([prompter.encode(n) for n in notes])
    batch["note_ids"] = torch.tensor([note_id_hash(n["note_id"]) for n in notes], dtype=torch.long)
    px = torch.stack([_pixels(n["note_id"], tower.image_size) for n in notes])
    tokens, pooled = tower(px)
    return batch, tokens, pooled


def _detached_gather(x):
    """The classic bug: remote parts come back without gradient."""
    full = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(full, x.detach().contiguous())
    if not x.is_floating_point():
        return full
    parts = list(full.chunk(dist.get_world_size()))
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def gathered_gradients(llm_dir: str, clip_dir: str, variant: str = "notellm2", pairs_per_rank: int = 2,
                       scale_by_world_size: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    cfg = ModelConfig(variant=variant, llm=LLMConfig(path=llm_dir), vision=VisionConfig(path=clip_dir, image_size=32),
                      connector=ConnectorConfig(num_query_tokens=4, num_layers=2, hidden_size=32, num_heads=4),
                      max_text_tokens=24, embed_dim=16)
    model, tower, prompter = build_all(cfg, LossConfig(scale_by_world_size=scale_by_world_size))
    model.train()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    pairs = _pairs(world * pairs_per_rank)
    local = pairs[rank * pairs_per_rank:(rank + 1) * pairs_per_rank]

    def grads(gather_fn, which_pairs, reduce: bool):
        model.zero_grad(set_to_none=True)
        model.loss_fn.gather_fn = gather_fn
        batch, tokens, pooled = _batch(prompter, tower, which_pairs)
        out = model(batch, tokens, pooled)
        out["loss"].backward()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for _, p in params])
        loss = out["loss"].detach().clone()
        if reduce:  # what DeepSpeed does: average gradients over ranks
            dist.all_reduce(flat)
            flat /= world
            dist.all_reduce(loss)
            loss /= world
        missing = [n for n, p in params if p.grad is None]
        return flat, loss.item(), missing

    good, good_loss, missing = grads(None, local, reduce=True)
    bad, _, _ = grads(_detached_gather, local, reduce=True)
    ref, ref_loss, _ = grads(lambda x: x, pairs, reduce=False)
    return {
        "rank": rank, "world": world, "n_params": int(ref.numel()),
        "good_max_diff": (good - ref).abs().max().item(),
        "bad_max_diff": (bad - ref).abs().max().item(),
        "ref_grad_max": ref.abs().max().item(),
        "good_loss": good_loss, "ref_loss": ref_loss, "missing_grads": missing,
    }


def zero3_load_and_step(llm_dir: str, clip_dir: str) -> dict:
    """Load the encoder under DeepSpeed ZeRO-3 (HfDeepSpeedConfig kept alive and the embedding grown by
    the launcher's hook, as the launcher does), check the embedding is partitioned before
    deepspeed.initialize, check the placeholder and pretrained rows, and run one training step."""
    from notellm2.compat import skip_deepspeed_shm_build

    skip_deepspeed_shm_build()  # FACTS: skip the ~90 s shm compile
    import deepspeed
    from safetensors.torch import load_file
    from transformers.integrations import HfDeepSpeedConfig
    import os

    from notellm2.launcher.train.partitioning import embedding_grower
    from notellm2.modeling.backbone import IMG_EMB_TOKEN, IMG_TOKEN, load_llm

    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                 "train_batch_size": 2 * dist.get_world_size(), "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True}
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841  (must stay alive while loading)
    torch.manual_seed(0)
    cfg = ModelConfig(variant="notellm2", llm=LLMConfig(path=llm_dir), vision=VisionConfig(path=clip_dir, image_size=32),
                      connector=ConnectorConfig(num_query_tokens=4, num_layers=1, hidden_size=32, num_heads=4),
                      max_text_tokens=16, embed_dim=8)
    model, tower, prompter = build_all(cfg, LossConfig(), grow_embeddings=embedding_grower(ds_config))
    emb = model.llm.get_input_embeddings().weight
    # Grown by notellm2.launcher.train.partitioning: partitioned from the start, each rank holding its share, nothing
    # materialised outside a gather. The decoder layers are partitioned while they load.
    world = dist.get_world_size()
    emb_before_engine = {"has_ds": hasattr(emb, "ds_numel"), "held": int(emb.ds_tensor.numel()) if hasattr(emb, "ds_tensor") else -1,
                         "total": int(emb.ds_numel) if hasattr(emb, "ds_numel") else -1, "world": world,
                         "materialised": int(emb.numel()), "shape": list(getattr(emb, "ds_shape", emb.shape)),
                         "vocab": len(prompter.tokenizer), "config_vocab": int(model.llm.config.vocab_size)}
    # Negative control: transformers' own resize (no hook) hands back a whole matrix on every rank.
    plain_llm, _ = load_llm(LLMConfig(path=llm_dir))
    plain_emb = plain_llm.get_input_embeddings().weight
    emb_before_engine["plain_replicated"] = (not hasattr(plain_emb, "ds_numel")) and plain_emb.numel() == emb_before_engine["total"]
    del plain_llm, plain_emb
    q = model.llm.layers[0].self_attn.q_proj.weight
    layer_partitioned = hasattr(q, "ds_numel") and q.numel() < q.ds_numel
    img, img_emb = prompter.tokenizer.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    saved = load_file(os.path.join(llm_dir, "model.safetensors"))["model.embed_tokens.weight"]
    with deepspeed.zero.GatheredParameters([emb]):
        full = emb.detach().clone()
    mean_err = max((full[img] - saved.mean(0)).abs().max().item(), (full[img_emb] - saved.mean(0)).abs().max().item())
    old_err = (full[: saved.shape[0]] - saved).abs().max().item()
    # A padded vocabulary (Qwen2-like): the placeholder rows are written in place in the partitioned matrix.
    spare_dir = os.path.join(os.path.dirname(llm_dir), "spare")
    from tests.helpers import models as fixtures
    spare_dir = fixtures.make_tiny_llm_dir(spare_dir, arch="qwen2", spare_rows=8) if dist.get_rank() == 0 else None
    holder = [spare_dir]
    dist.broadcast_object_list(holder, src=0)
    spare_llm, spare_tok = load_llm(LLMConfig(path=holder[0]))
    spare_emb = spare_llm.get_input_embeddings().weight
    spare_partitioned = hasattr(spare_emb, "ds_numel") and spare_emb.numel() < spare_emb.ds_numel
    spare_saved = load_file(os.path.join(holder[0], "model.safetensors"))["model.embed_tokens.weight"]
    s_img, s_emb = spare_tok.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    n_vocab = min(s_img, s_emb)
    with deepspeed.zero.GatheredParameters([spare_emb]):
        spare_full = spare_emb.detach().clone()
    spare_mean_err = max((spare_full[i] - spare_saved[:n_vocab].mean(0)).abs().max().item() for i in (s_img, s_emb))
    spare_rows_ok = spare_full.shape[0] == spare_saved.shape[0] and max(s_img, s_emb) < spare_full.shape[0]

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           config=ds_config)
    assert engine.module.llm.get_input_embeddings().weight is emb  # the grown module is what the engine trains
    pairs = _pairs(2 * dist.get_world_size())
    local = pairs[2 * dist.get_rank(): 2 * dist.get_rank() + 2]
    batch, tokens, pooled = _batch(prompter, tower, local)
    out = engine(batch, tokens, pooled)
    engine.backward(out["loss"])
    engine.step()
    emb = engine.module.llm.get_input_embeddings().weight
    emb_partitioned = hasattr(emb, "ds_numel") and emb.numel() < emb.ds_numel
    with deepspeed.zero.GatheredParameters([emb]):
        after = emb.detach().clone()
    # The mICL marker is in every prompt: its (grown) row takes a gradient and the optimizer moves it.
    img_emb_row_moved = (after[img_emb] - full[img_emb]).abs().max().item()
    return {"emb_before_engine": emb_before_engine, "img_emb_row_moved": img_emb_row_moved,
            "spare_partitioned": bool(spare_partitioned), "spare_mean_err": spare_mean_err,
            "spare_rows_ok": bool(spare_rows_ok),
            "partitioned": bool(layer_partitioned), "emb_partitioned_by_engine": bool(emb_partitioned), "mean_err": mean_err, "old_err": old_err,
            "loss": float(out["loss"].item()), "logit_scale": float(out["logit_scale"].item())}


def gradients_and_zero3(llm_dir: str, clip_dir: str) -> dict:
    """Both checks in one launch (saves a torchrun start): plain gathered gradients first, then ZeRO-3."""
    return {"gradients": gathered_gradients(llm_dir, clip_dir, variant="notellm2", pairs_per_rank=2),
            "zero3": zero3_load_and_step(llm_dir, clip_dir)}


def duplicate_pairs_match_deduplicated_batch() -> dict:
    """2 ranks x 4 pairs with two injected duplicate pairs (A twice on rank 0, B on both ranks) against the
    single-process loss on the 6 distinct pairs. Gradients are w.r.t. the embeddings: DeepSpeed averages
    parameter gradients over ranks, so a rank's embedding gradient / world must equal the reference's."""
    from notellm2.modeling.loss import GatheredContrastiveLoss

    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    g = torch.Generator().manual_seed(7)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)  # pairs A..F
    t = torch.nn.functional.normalize(q + 0.8 * torch.randn(6, 8, generator=g), dim=-1)
    q_ids, t_ids = torch.arange(100, 106), torch.arange(200, 206)
    layout = {0: [0, 1, 2, 0], 1: [3, 1, 4, 5]}[rank]  # A, B, C, A' | D, B', E, F
    first_copy = {0: [True, True, True, False], 1: [True, False, True, True]}[rank]
    idx = torch.tensor(layout)
    emb = torch.cat([q[idx], t[idx]]).requires_grad_(True)
    ids = torch.cat([q_ids[idx], t_ids[idx]])
    loss_fn = GatheredContrastiveLoss(LossConfig())
    out = loss_fn(emb, ids)
    out["loss"].backward()
    grad = emb.grad / world
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    loss /= world
    # The old convention (plain mean of every local anchor) as the negative control.
    plain = out["per_anchor"].detach().mean()
    dist.all_reduce(plain)
    plain /= world

    ref_fn = GatheredContrastiveLoss(LossConfig(), gather_fn=lambda x: x)
    ref_emb = torch.cat([q, t]).requires_grad_(True)
    ref = ref_fn(ref_emb, torch.cat([q_ids, t_ids]))
    ref["loss"].backward()
    rows = layout + [6 + k for k in layout]
    kept_expected = first_copy + first_copy
    expected = torch.stack([ref_emb.grad[r] if k else torch.zeros(8) for r, k in zip(rows, kept_expected)])
    return {"rank": rank, "loss": loss.item(), "ref_loss": ref["loss"].item(), "plain_loss": plain.item(),
            "num_kept": int(out["num_kept"]), "kept": out["kept"].tolist(), "kept_expected": kept_expected,
            "grad_max_diff": (grad - expected).abs().max().item(), "ref_grad_max": ref_emb.grad.abs().max().item(),
            "dropped_grad_max": grad[[not k for k in kept_expected]].abs().max().item()}


def negative_options_match_one_process() -> dict:
    """2 ranks x 3 pairs with loss.logq_correction and loss.mask_known_positives against the single-process
    loss on the 6 pairs (same per-note log q and known positives). Embedding gradients: a rank's / world
    must equal the reference's rows (DeepSpeed averages parameter gradients over ranks)."""
    from notellm2.modeling.loss import GatheredContrastiveLoss

    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    g = torch.Generator().manual_seed(11)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    t = torch.nn.functional.normalize(q + 0.8 * torch.randn(6, 8, generator=g), dim=-1)
    q_ids, t_ids = torch.arange(100, 106), torch.arange(200, 206)
    all_ids = torch.cat([q_ids, t_ids])
    logq = torch.log(torch.linspace(0.02, 0.3, 12))  # per note, in the reference's row order
    known = torch.full((12, 2), -2, dtype=torch.long)
    known[0] = torch.tensor([103, 204])  # pair 0's query knows notes on the other rank
    known[9] = torch.tensor([101, -2])   # pair 3's target (rank 1) knows pair 1's query (rank 0)
    cfg = LossConfig(logq_correction=True, mask_known_positives=True)
    layout = [0, 1, 2] if rank == 0 else [3, 4, 5]
    rows = layout + [6 + k for k in layout]
    emb = torch.cat([q, t])[rows].clone().requires_grad_(True)
    out = GatheredContrastiveLoss(cfg)(emb, all_ids[rows], logq=logq[rows], known=known[rows])
    out["loss"].backward()
    loss = out["loss"].detach().clone()
    dist.all_reduce(loss)
    loss /= world
    ref_emb = torch.cat([q, t]).requires_grad_(True)
    ref = GatheredContrastiveLoss(cfg, gather_fn=lambda x: x)(ref_emb, all_ids, logq=logq, known=known)
    ref["loss"].backward()
    plain = GatheredContrastiveLoss(LossConfig(), gather_fn=lambda x: x)(torch.cat([q, t]), all_ids)
    return {"rank": rank, "loss": loss.item(), "ref_loss": ref["loss"].item(), "plain_loss": plain["loss"].item(),
            "grad_max_diff": (emb.grad / world - ref_emb.grad[rows]).abs().max().item(),
            "ref_grad_max": ref_emb.grad.abs().max().item()}
