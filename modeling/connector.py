"""Connectors: frozen-tower image tokens -> LLM-width image tokens spliced into the prompt.

- ``qformer``: a randomly initialised BLIP-2 Q-Former (transformers' Blip2QFormerModel) whose learned
  query tokens cross-attend to the vision tokens (in layers 0, f, 2f, ... for
  `cross_attention_frequency` f; FFN width `ffn_size`, dropout `dropout`), then a 2-layer GELU MLP to
  the LLM width. It emits `num_query_tokens` tokens per image.
- Both can put a trainable LayerNorm on the tower's tokens first (`input_norm`, BLIP-2's ln_vision).
- ``mlp``: a per-token 2-layer GELU MLP; it emits one token per vision token.

Every connector has `num_output_tokens`, which the prompter uses to size the image slot.
"""
from __future__ import annotations

import torch
from torch import nn

from modeling.config import ConnectorConfig


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
            # Default 0: the contrastive objective already regularises, and identical forwards on every
            # rank keep gathered-gradient checks exact. The paper-scale recipe uses 0.1.
            hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout)
        self.qformer = Blip2QFormerModel(qcfg)
        # Random queries ~ N(0, 0.02), as BLIP-2 initialises them (zeros would make all queries equal).
        self.query_tokens = nn.Parameter(torch.randn(1, cfg.num_query_tokens, cfg.hidden_size) * 0.02)
        self.proj = _mlp(cfg.hidden_size, llm_dim)
        self.num_output_tokens = cfg.num_query_tokens
        self.input_norm = nn.LayerNorm(token_dim) if cfg.input_norm else None

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
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

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
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
