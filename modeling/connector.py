"""Connectors: frozen-tower image tokens -> LLM-width image tokens spliced into the prompt.

- ``qformer``: a randomly initialised BLIP-2 Q-Former (transformers' Blip2QFormerModel) whose learned
  query tokens cross-attend to the vision tokens (in layers 0, f, 2f, ... for
  `cross_attention_frequency` f; FFN width `ffn_size`, dropout `dropout`), then a 2-layer GELU MLP to
  the LLM width. It emits `num_query_tokens` tokens per image.
- Both can put a trainable LayerNorm on the tower's tokens first (`input_norm`, BLIP-2's ln_vision).
- ``mlp``: a per-token 2-layer GELU MLP; it emits one token per vision token.

Every connector has `num_output_tokens`, which the prompter uses to size the image slot, and takes
`forward(image_tokens, row_keys=None)`.

Keyed dropout (the Q-Former with `dropout` > 0). Every dropout mask of the Q-Former (its embedding,
attention-probability, attention-output and FFN-output dropouts) is a function of (a seed, the site,
the row's key, the element's index) through an integer hash, not a stream of the torch generator.
The seed is drawn from the torch generator once per forward (one `torch.randint`); the keys are the
rows' note-id hashes (`row_keys`, NoteModel passes `note_ids`; the row index without them). So a row
gets the same masks whether it is encoded alone, in a chunk or in the whole batch, as long as the
forward starts from the same generator state: this is what lets chunked representation caching
(launcher/train/chunked.py) replay a batch's dropout exactly in its second pass and give the gradient of
the unchunked step. The same note twice in one forward gets the same masks (it is the same input).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from notellm2.modeling.config import ConnectorConfig

_M32 = 0xFFFFFFFF
KEYED_ATTENTION = "notellm2_keyed_eager"


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2^32); wrap-around products are
    masked back to 32 bits, so the result is the same on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


class DropoutKeys:
    """What the keyed dropouts of one connector read during its forward: the seed and the row keys.
    A plain object (not a module): one is shared by all the sites of a connector."""

    def __init__(self):
        self.seed: Optional[int] = None
        self.keys: Optional[torch.Tensor] = None


class KeyedDropout(nn.Dropout):
    """Dropout whose mask for row i, element j is hash(seed, site, key_i, j) < p (see the module docstring).
    An nn.Dropout (same `p`), so that code looking for the model's dropouts finds it."""

    def __init__(self, p: float, source: DropoutKeys, site: int):
        super().__init__(p)
        self.source, self.site = source, int(site)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        seed, keys = self.source.seed, self.source.keys
        if seed is None:
            raise RuntimeError("KeyedDropout: called outside its connector's forward (no seed set)")
        n = x.shape[0]
        if keys is None or keys.shape[0] != n:
            keys = torch.arange(n, device=x.device)
        keys = keys.to(device=x.device, dtype=torch.long)
        base = int(_mix32(torch.tensor([(seed ^ (self.site * 0x9E3779B9)) & _M32]))[0])
        row = _mix32(((keys ^ (keys >> 32)) & _M32) ^ base)  # [n]
        idx = torch.arange(x[0].numel(), device=x.device, dtype=torch.long)
        bits = _mix32(_mix32((row.view(-1, 1) + idx.view(1, -1) * 0x61C88647) & _M32) ^ base)
        keep = (bits >= int(self.p * 2 ** 32)).view(x.shape)
        return x * keep.to(x.dtype) / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def _keyed_eager_attention(module, query, key, value, attention_mask, scaling, dropout: float = 0.0, **kwargs):
    """BLIP-2's eager attention with the probabilities' dropout keyed (module.attn_dropout)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    if dropout > 0:
        attn_weights = module.attn_dropout(attn_weights)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _register_keyed_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KEYED_ATTENTION, _keyed_eager_attention)


def _key_the_dropouts(qformer: nn.Module, p: float, source: DropoutKeys) -> int:
    """Replace every nn.Dropout of `qformer` with a KeyedDropout and key its attention dropouts; returns
    the number of sites."""
    from notellm2.compat import blip2_qformer_attention_class

    attention_class = blip2_qformer_attention_class()
    _register_keyed_attention()
    qformer.set_attn_implementation(KEYED_ATTENTION)  # public since transformers 4.48; checked in tests/test_compat.py
    site = 0
    for name, module in list(qformer.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, child_name, KeyedDropout(p, source, site))
                site += 1
        if isinstance(module, attention_class):
            module.attn_dropout = KeyedDropout(p, source, site)
            site += 1
    return site


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class QFormerConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, token_dim: int, llm_dim: int, num_vision_tokens: int):
        super().__init__()
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"model.connector.hidden_size: {cfg.hidden_size} is not divisible by "
                             f"model.connector.num_heads ({cfg.num_heads})")
        qcfg = Blip2QFormerConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.ffn_size or 4 * cfg.hidden_size, cross_attention_frequency=cfg.cross_attention_frequency,
            encoder_hidden_size=token_dim,
            # Default 0: the contrastive objective already regularises. The paper-scale recipe uses 0.1;
            # then the masks are keyed (module docstring).
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        self.qformer = Blip2QFormerModel(qcfg)
        # Random queries ~ N(0, 0.02), as BLIP-2 initialises them (zeros would make all queries equal).
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.proj = _mlp(cfg.hidden_size, llm_dim)
        self.num_output_tokens = cfg.num_query_tokens
        self.input_norm = nn.LayerNorm(token_dim) if cfg.input_norm else None
        self.dropout = float(cfg.dropout)
        self._dropout_keys = DropoutKeys()
        if self.dropout > 0:
            _key_the_dropouts(self.qformer, self.dropout, self._dropout_keys)

    def forward(self, image_tokens: torch.Tensor, row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training and self.dropout > 0:
            # One draw from the torch generator per forward: the seed of every mask of this forward.
            self._dropout_keys.seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
            self._dropout_keys.keys = row_keys
            try:
                return self._forward(image_tokens)
            finally:
                self._dropout_keys.seed, self._dropout_keys.keys = None, None
        return self._forward(image_tokens)

    def _forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        dtype = self.query_tokens.dtype
        image_tokens = image_tokens.to(dtype)
        if self.input_norm is not None:
            image_tokens = self.input_norm(image_tokens)
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_tokens, encoder_attention_mask=mask)
        return self.proj(out.last_hidden_state)


class MLPConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, token_dim: int, llm_dim: int, num_vision_tokens: int):
        super().__init__()
        self.proj = _mlp(token_dim, llm_dim)
        self.num_output_tokens = num_vision_tokens
        self.input_norm = nn.LayerNorm(token_dim) if cfg.input_norm else None

    def forward(self, image_tokens: torch.Tensor, row_keys: Optional[torch.Tensor] = None) -> torch.Tensor:
        image_tokens = image_tokens.to(self.proj[0].weight.dtype)
        if self.input_norm is not None:
            image_tokens = self.input_norm(image_tokens)
        return self.proj(image_tokens)


# Registry of connectors (looked up by `model.connector.kind`).
CONNECTORS: dict[str, type[nn.Module]] = {"qformer": QFormerConnector, "mlp": MLPConnector}


def build_connector(cfg: ConnectorConfig, token_dim: int, llm_dim: int, num_vision_tokens: int) -> nn.Module:
    cls = CONNECTORS.get(cfg.kind)
    if cls is None:
        raise ValueError(f"model.connector.kind: got {cfg.kind!r}; allowed: {', '.join(CONNECTORS)}")
    return cls(cfg, token_dim, llm_dim, num_vision_tokens)
