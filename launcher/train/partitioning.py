"""ZeRO-3 pieces that model loading needs (modeling/ never imports deepspeed; the launcher passes these).

Growing the input embedding for the placeholder tokens without making it whole on every rank.

transformers' `resize_token_embeddings` under ZeRO-3 builds the new matrix as a plain nn.Embedding
(transformers 5.23, modeling_utils `_get_resized_embeddings`): the whole matrix sits replicated on
every rank until `deepspeed.initialize` partitions it (for a 7B, vocab x hidden x 4 bytes, e.g.
152k x 3584 fp32 = 2.2 GB, on each rank). Sizing the vocabulary in the config before
`from_pretrained` does not work either (seen on 2 gloo ranks, transformers 5.23): under ZeRO-3 only
rank 0 copies the checkpoint in (`_load_state_dict_into_zero3_model`); it reports a size mismatch and
raises, while the other ranks return a "loaded" model, so the ranks diverge (a hang in a real run).
`ignore_mismatched_sizes` would re-initialise the whole pretrained matrix. So the model loads with
the checkpoint's vocabulary (partitioned while it loads), and `grow_input_embeddings` then:

1. builds the larger nn.Embedding under `deepspeed.zero.Init` with the run's DeepSpeed config (same
   dtype as the loaded weights), so it is partitioned as soon as it is constructed;
2. copies the pretrained rows in inside `GatheredParameters([old, new], modifier_rank=0)`: both are
   gathered for the copy (transiently whole, as in every ZeRO-3 forward), and on exit rank 0's copy is
   re-partitioned onto all ranks;
3. puts it in place of the old module and updates `config.vocab_size`.

The placeholder rows are then set by notellm2.modeling.backbone (mean of the original rows, inside
GatheredParameters with a modifier rank), as on one process.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def grow_input_embeddings(model: torch.nn.Module, rows: int, ds_config: dict) -> None:
    """Replace the input embedding of `model` (a ZeRO-3 partitioned HF model) by a partitioned one
    with `rows` rows whose first rows are the old matrix (see the module docstring)."""
    import deepspeed

    old = model.get_input_embeddings()
    if not isinstance(old, torch.nn.Embedding):
        raise TypeError(f"grow_input_embeddings: the input embedding is a {type(old).__name__}, not an nn.Embedding")
    n_old, dim = getattr(old.weight, "ds_shape", old.weight.shape)  # the full shape, nothing gathered
    if rows <= n_old:
        return
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        new = torch.nn.Embedding(rows, dim, padding_idx=old.padding_idx, dtype=old.weight.dtype,
                                 device=old.weight.device)
    if new.weight.dtype != old.weight.dtype:  # zero.Init casts to the config's dtype
        raise RuntimeError(f"grow_input_embeddings: the new matrix is {new.weight.dtype}, the loaded one "
                           f"{old.weight.dtype}; was the model loaded under the same DeepSpeed config?")
    new.weight.requires_grad_(old.weight.requires_grad)
    with deepspeed.zero.GatheredParameters([old.weight, new.weight], modifier_rank=0), torch.no_grad():
        new.weight[:n_old].copy_(old.weight)
    model.set_input_embeddings(new)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    text_config.vocab_size = rows
    if hasattr(model, "vocab_size"):
        model.vocab_size = rows


def embedding_grower(ds_config: dict) -> Optional[Callable[[torch.nn.Module, int], None]]:
    """The `grow_embeddings` hook for notellm2.modeling.backbone.load_llm under this DeepSpeed config:
    grow_input_embeddings under ZeRO-3, None (transformers' resize on a whole matrix) otherwise."""
    if (ds_config.get("zero_optimization") or {}).get("stage") != 3:
        return None
    return lambda model, rows: grow_input_embeddings(model, rows, ds_config)
