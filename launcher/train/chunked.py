"""One batch's forward and backward through the DeepSpeed engine, whole or in chunks (`train.chunk_pairs`).

Chunked representation caching (GradCache, Gao et al. 2021) for the gathered contrastive loss:
the loss couples every note of the global batch, but it only reads the embeddings, so

    pass 1   every chunk of c pairs runs forward without gradient (the frozen tower too, chunk by
             chunk); its embeddings after the gate and the head (both mICL representations) are kept,
             and so are the tower's outputs (frozen and deterministic: pass 2 reuses them);
    loss     the gathered loss of the whole local batch, computed once on the kept embeddings made
             leaves (outside the engine, with the temperature's value as a leaf too): its gradient
             with respect to every local embedding and to log_scale (the gather's backward brings
             every rank's share, as in the unchunked step, modeling/loss.py);
    pass 2   every chunk runs forward again with gradient, and `engine.backward` of
             surrogate = sum(embedding * cached gradient) (+ log_scale * its gradient in the first
             chunk, + 0 * log_scale in the others, so that every rank reduces the same parameters in
             every backward); the sum of the chunks' parameter gradients is the batch's gradient.

Randomness. Before every chunk's forward, in both passes, the torch generators are put back to their
state at the start of the batch, and after the batch to the state that one forward leaves. The model's
only random draws are keyed dropouts: the Q-Former's and LoRA's adapters' (modeling/connector.py,
modeling/lora.py: a seed drawn once per forward, masks hashed from the seed and each row's note id;
tests/launcher/train/test_lora_exactness.py for LoRA's), so every chunk of both passes draws the
masks that the unchunked forward of the whole batch draws: pass 2 replays pass 1 exactly and the
step equals the unchunked step (tests/launcher/train/test_chunked_gradients.py; without the replay
the gradient is wrong, which that test's negative control shows). Any other source of randomness
would repeat across chunks, so `check_chunkable` refuses any dropout that is not keyed.

DeepSpeed. Each chunk's backward is its own `engine.backward` (its prologue and epilogue): ZeRO-3
reduce-scatters each parameter's gradient once per backward and adds it to the partition (its
micro-step counter moves at the next forward). ZeRO-2 rebuilds its gradient partition from the
parameters' accumulated gradients at every accumulation boundary, and the next forward clears those,
so every chunk's backward but the batch's last is marked as no boundary
(`engine.set_gradient_accumulation_boundary`); without that only the last chunk's gradient reached
the step (the test's rel error was 1.05). The known failure of GradCache under ZeRO ("Gradient computed twice for this partition",
sentence-transformers#3173, tevatron#206) comes from running all chunks' backwards inside ONE
backward call (a hook on the loss), so a parameter's reduce hook fires once per chunk before the
epilogue; here it fires once per engine backward. `engine.step()` stays once per batch in the loop,
so gradient accumulation boundaries, clipping of the full gradient and the optimizer step are the
unchunked ones; `engine.backward` divides each surrogate by the accumulation steps as it does the loss.
Every rank runs the same number of chunks (c divides data.pairs_per_rank, checked in the config):
ZeRO-3 gathers the parameters of each module call on all ranks together.

ZeRO-3's module trace. DeepSpeed's parameter coordinator records the order in which modules fetch
their parameters over one "step" and, once the trace repeats, prefetches and keeps a gathered
parameter until its next use is farther than `stage3_max_reuse_distance`; a step ends at every
forward of the root module (its forward pre-hook calls `reset_step`). The unchunked batch is one
forward and one backward, so its trace repeats and a parameter of the demo model is gathered once per
batch. The chunked batch is 2n engine forwards, forward-only and forward+backward in turn: every
segment differs from the last, the trace never completes, and every module re-gathers its
parameters in each chunk's forward and backward (measured on 2 CPU ranks at P=16, c=8: 362
all-gathers a step against 65). `notellm2.compat.one_zero3_trace_step` makes the whole chunked batch one step of
the trace (only its first forward resets), so it repeats from batch to batch and the coordinator's
own reuse rule applies across chunks as it does between a forward and its backward.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from notellm2 import compat
from notellm2.data_shards.batch import to_device
from notellm2.launcher.config import ConfigError
from notellm2.modeling.loss import negative_inputs


def _null_timer(_name):
    return contextlib.nullcontext()


def forward_backward(engine, comps, batch: dict, device, cast=None, chunk_pairs: int = 0,
                     timer: Optional[Callable] = None, replay_rng: bool = True,
                     on_phase: Optional[Callable[[str], None]] = None) -> dict:
    """Forward and backward of one batch (no optimizer step). Returns the model's outputs (loss, loss_mm,
    loss_vis, logit_scale, embeddings, gate_mean, gate_std), the same with and without chunks.
    `batch` may still be on the host (uint8 pixels): the chunked path moves it chunk by chunk.
    `timer(name)` is a context manager timing "forward" and "backward"; `on_phase(name)` is told when
    each starts (the watchdog). `replay_rng=False` is the tests' negative control (pass 2 without
    restoring the generators)."""
    timer = timer or _null_timer
    on_phase = on_phase or (lambda _name: None)
    if not chunk_pairs:
        batch = to_device(batch, device)  # uint8 pixels are normalised there (data_shards/batch.py)
        with timer("forward"):
            image_tokens, image_pooled = comps.image_features(batch, cast)
            out = engine(batch, image_tokens=image_tokens, image_pooled=image_pooled)
        on_phase("backward")
        with timer("backward"):
            engine.backward(out["loss"])
        return out
    return _chunked(engine, comps, batch, device, cast, chunk_pairs, timer, replay_rng, on_phase)


def pair_count(batch: dict) -> int:
    rows = batch["note_ids"].shape[0]
    if rows % 2:
        raise ValueError(f"a pair batch has an even number of rows ([queries; targets]); got {rows}")
    return rows // 2


def chunk_of(batch: dict, start: int, stop: int) -> dict:
    """Pairs start..stop-1 of a pair batch, itself a pair batch: [their queries; their targets]."""
    b = pair_count(batch)
    rows = torch.cat([torch.arange(start, stop), torch.arange(b + start, b + stop)])
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == 2 * b:
            out[key] = value.index_select(0, rows.to(value.device))
        elif isinstance(value, list) and len(value) == 2 * b:
            out[key] = [value[i] for i in rows.tolist()]
        elif isinstance(value, list) and len(value) == b:
            out[key] = value[start:stop]
        else:
            out[key] = value
    return out


def check_chunkable(model, chunk_pairs: int, zero_stage: int = 3) -> None:
    """Chunked caching replays the batch-start generator state in every chunk, so any dropout drawn from
    the generator (rather than keyed per note, as the Q-Former's) would repeat across chunks: refuse it.
    ZeRO-3 and ZeRO-2, the stages whose chunked step is tested against the unchunked one
    (tests/launcher/train/test_chunked_gradients.py); stages 0 and 1 are not."""
    from notellm2.modeling.connector import KeyedDropout

    if not chunk_pairs:
        return
    if zero_stage not in (2, 3):
        raise ConfigError(f"train.chunk_pairs: {chunk_pairs} is supported with ZeRO-2 and ZeRO-3 (train.ds_config has "
                          f"stage {zero_stage}, whose chunked gradient is not verified); set train.chunk_pairs: 0")
    found = [f"{n} (p={m.p})" for n, m in model.named_modules()
             if isinstance(m, torch.nn.Dropout) and m.p > 0 and not isinstance(m, KeyedDropout)]
    llm = getattr(model, "llm", None)
    cfg = getattr(llm, "config", None)
    if cfg is not None:
        found += [f"llm.config.{k}={v}" for k, v in vars(cfg).items()
                  if "dropout" in k and isinstance(v, float) and v > 0]
    if found:
        raise ConfigError(f"train.chunk_pairs: {chunk_pairs} needs a model whose only dropout is keyed per note "
                          f"(the Q-Former's, LoRA's); found {', '.join(found[:4])}; set train.chunk_pairs: 0")


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _log_scale_value(engine) -> torch.Tensor:
    """The temperature parameter's current value (ZeRO-3: gathered from its partitions, a collective)."""
    param = engine.module.loss_fn.log_scale
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().clone()
    return param.detach().clone()


def _chunked(engine, comps, batch: dict, device, cast, chunk_pairs: int, timer, replay_rng: bool, on_phase) -> dict:
    with compat.one_zero3_trace_step(engine):
        return _chunked_step(engine, comps, batch, device, cast, chunk_pairs, timer, replay_rng, on_phase)


def _chunked_step(engine, comps, batch: dict, device, cast, chunk_pairs: int, timer, replay_rng: bool,
                  on_phase) -> dict:
    model = engine.module
    pairs = pair_count(batch)
    if pairs % chunk_pairs:
        raise ConfigError(f"train.chunk_pairs: {chunk_pairs} does not divide this batch's {pairs} pairs")
    bounds = [(s, s + chunk_pairs) for s in range(0, pairs, chunk_pairs)]
    start_state = _rng_state()
    after_state = None
    chunks, keep = [], []  # per chunk: the model's inputs; its embeddings
    with timer("forward"):
        for s, e in bounds:
            chunk = to_device(chunk_of(batch, s, e), device)  # the pixels of one chunk at a time
            image_tokens, image_pooled = comps.image_features(chunk, cast)
            chunk.pop("pixel_values", None)  # pass 2 reuses the tower's outputs
            _set_rng_state(start_state)
            with torch.no_grad():
                embs = engine(chunk, image_tokens=image_tokens, image_pooled=image_pooled, embed_only=True)
            if after_state is None:
                after_state = _rng_state()
            chunks.append((chunk, image_tokens, image_pooled))
            keep.append({k: v.detach() for k, v in embs.items()})

        # The gathered loss of the whole local batch, [queries; targets] as the loss expects.
        def whole(key):
            q = [k[key][: e - s] for k, (s, e) in zip(keep, bounds)]
            t = [k[key][e - s:] for k, (s, e) in zip(keep, bounds)]
            return torch.cat(q + t)

        micl = "visual" in keep[0]
        leaves = {"note": whole("note").requires_grad_()}
        if micl:
            leaves["visual"] = whole("visual").requires_grad_()
        learnable = model.loss_fn.log_scale.requires_grad
        log_scale = _log_scale_value(engine).requires_grad_(learnable)
        negatives = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in negative_inputs(batch).items()}
        out = model.loss_from_embeddings(leaves, batch["note_ids"].to(device), log_scale=log_scale,
                                         negatives=negatives)
        wrt = list(leaves.values()) + ([log_scale] if learnable else [])
        grads = torch.autograd.grad(out["loss"], wrt)
        cached = dict(zip(leaves, grads))
        g_log_scale = grads[-1] if learnable else None
        out = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
        if "gate_values" in keep[0]:
            z = torch.cat([k["gate_values"] for k in keep])
            out["gate_mean"] = z.mean() if z.numel() else torch.tensor(float("nan"))
            out["gate_std"] = z.std() if z.numel() > 1 else torch.tensor(float("nan"))

    on_phase("backward")
    # ZeRO-2 (and 1): only the batch's last backward may be a gradient-accumulation boundary. At a
    # boundary the optimizer rebuilds its gradient partition from the parameters' accumulated gradients,
    # which the next forward clears, so with every chunk a boundary only the last chunk's gradient would
    # reach the step. ZeRO-3 adds each backward's reduce-scatter into its partition, boundary or not.
    manual_boundary = engine.zero_optimization_stage() in (1, 2)
    boundaries = compat.manual_accumulation_boundaries(engine) if manual_boundary else contextlib.nullcontext(None)
    with timer("backward"), boundaries as at_boundary:
        for i, ((s, e), (chunk, image_tokens, image_pooled)) in enumerate(zip(bounds, chunks)):
            if manual_boundary:
                engine.set_gradient_accumulation_boundary(at_boundary and i == len(bounds) - 1)
            rows = torch.cat([torch.arange(s, e), torch.arange(pairs + s, pairs + e)]).to(device)
            chunk_grads = {k: g.index_select(0, rows) for k, g in cached.items()}
            if learnable:  # exactly once; a zero elsewhere keeps log_scale in every backward's graph
                chunk_grads["log_scale"] = g_log_scale if i == 0 else torch.zeros_like(g_log_scale)
            if replay_rng:
                _set_rng_state(start_state)
            res = engine(chunk, image_tokens=image_tokens, image_pooled=image_pooled, cached_grads=chunk_grads)
            engine.backward(res["surrogate"])
            chunks[i] = None  # free the chunk's inputs and tower outputs as we go
    # (leaving the block put the engine back on its own micro-step count, which engine.step reads)
    if replay_rng:
        _set_rng_state(after_state)
    return out
