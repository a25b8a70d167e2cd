"""An honest small stand-in for the NoteModel + PairLoader pair, used to test the training engine
on its own (the engine's behaviour, not the model's): same call signature and output keys, a real
gathered in-batch contrastive loss, an `llm` sub-module and "new" modules, a frozen vision tower
kept outside the engine, and a deterministic resumable loader."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from notellm2.launcher.train.components import Components

VOCAB, HIDDEN, SEQ, VIS_DIM, VIS_TOKENS = 97, 32, 12, 24, 4


class TinyLLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList([nn.Linear(HIDDEN, HIDDEN) for _ in range(2)])
        self.norm = nn.LayerNorm(HIDDEN)

    def forward(self, input_ids, attention_mask, prefix=None):
        h = self.embed(input_ids)
        if prefix is not None:
            h = torch.cat([prefix, h], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        for layer in self.layers:
            h = h + torch.tanh(layer(h))
        h = self.norm(h)
        last = attention_mask.sum(1) - 1
        return h[torch.arange(h.shape[0]), last]


class TinyNoteModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.llm = TinyLLM()
        self.connector = nn.Sequential(nn.Linear(VIS_DIM, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
        self.query_tokens = nn.Parameter(torch.randn(1, 2, HIDDEN) * 0.02)
        self.gate = nn.Linear(2 * HIDDEN, 1)
        self.head = nn.Linear(HIDDEN, 16)
        self.logit_scale = nn.Parameter(torch.full((1,), 2.0))  # (1,), not 0-dim: ZeRO-3 (FACTS)

    def forward(self, batch, image_tokens=None, image_pooled=None):
        dtype = self.head.weight.dtype
        prefix = None
        if image_tokens is not None:
            vis = self.connector(image_tokens.to(dtype))
            prefix = torch.cat([self.query_tokens.expand(vis.shape[0], -1, -1).to(dtype), vis], dim=1)
        text = self.llm(batch["input_ids"], batch["attention_mask"], prefix)
        if image_pooled is not None:
            v = self.connector(image_pooled.to(dtype).unsqueeze(1)).squeeze(1)
            g = torch.sigmoid(self.gate(torch.cat([text, v], dim=-1)))
            fused = g * text + (1 - g) * v
        else:
            g, fused = None, text
        emb = F.normalize(self.head(fused).float(), dim=-1)
        n = emb.shape[0] // 2
        q, t = emb[:n], emb[n:]
        if dist.is_initialized() and dist.get_world_size() > 1:
            from notellm2.modeling.loss import gather_with_grad

            t_all = gather_with_grad(t)
            offset = dist.get_rank() * n
        else:
            t_all, offset = t, 0
        scale = self.logit_scale.float().exp().clamp(max=100)
        logits = scale * q @ t_all.T
        labels = torch.arange(n) + offset
        loss_mm = F.cross_entropy(logits, labels)
        loss_vis = F.cross_entropy(scale * t @ q.T, torch.arange(n))
        loss = (9 * loss_mm + loss_vis) / 10
        out = {"loss": loss, "loss_mm": loss_mm, "loss_vis": loss_vis, "logit_scale": scale.detach(),
               "embeddings": emb}
        if g is not None:
            out["gate_mean"], out["gate_std"] = g.detach().float().mean(), g.detach().float().std()
        return out


class TinyVision(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, VIS_DIM, kernel_size=8, stride=8)

    def forward(self, pixel_values):
        x = self.proj(pixel_values)  # [B, D, 2, 2]
        tokens = x.flatten(2).transpose(1, 2)
        return tokens, tokens.mean(1)


class SyntheticPairLoader:
    """Deterministic batches from (seed, epoch, rank, index); `batches` per epoch; resumable."""

    def __init__(self, pairs_per_rank, rank, world_size, epoch=0, batches=6, seed=0):
        self.n, self.rank, self.world, self.epoch, self.batches, self.seed = pairs_per_rank, rank, world_size, epoch, batches, seed
        self.index = 0
        self.bad = 0

    def __iter__(self):
        while self.index < self.batches:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank, self.index)) % 2**31)
            self.index += 1
            base = torch.randint(1, VOCAB, (self.n, SEQ), generator=g)
            target = base.clone()
            target[:, ::3] = torch.randint(1, VOCAB, (self.n, (SEQ + 2) // 3), generator=g)
            ids = torch.cat([base, target])
            lengths = torch.randint(SEQ // 2, SEQ + 1, (2 * self.n,), generator=g)
            mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
            pix = torch.rand(2 * self.n, 3, 16, 16, generator=g)
            self.bad += 1 if self.index % 4 == 0 else 0
            yield {"input_ids": ids, "attention_mask": mask, "pixel_values": pix,
                   "has_image": torch.ones(2 * self.n, dtype=torch.bool),
                   "note_ids": torch.arange(2 * self.n, dtype=torch.int64) + 1000 * self.index}

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "bad": self.bad}

    def load_state_dict(self, state):
        if isinstance(state, list):  # every old rank's state (another world size): restart that epoch
            self.epoch, self.index, self.bad = state[0]["epoch"], 0, 0
            return
        self.epoch, self.index, self.bad = state["epoch"], state["index"], state["bad"]

    def stats(self):
        return {"bad_samples": self.bad}


def components(cfg, rank, world_size, ds_config):
    # Python's hash of a tuple of ints is stable across processes (no str hashing involved).
    return Components(TinyNoteModel(), TinyVision(), None,
                      lambda epoch: SyntheticPairLoader(cfg.data.pairs_per_rank, rank, world_size, epoch, seed=cfg.data.seed))


def components_with_val(cfg, rank, world_size, ds_config):
    """`components` plus a validation loader (two fixed batches), for the evaluations of eval.every_steps."""
    comps = components(cfg, rank, world_size, ds_config)

    def make_val_loader():
        for batch in SyntheticPairLoader(cfg.data.pairs_per_rank, rank, world_size, epoch=99, batches=2,
                                         seed=cfg.data.seed):
            yield {**batch, "note_id_strs": [str(int(i)) for i in batch["note_ids"]]}

    comps.make_val_loader = make_val_loader
    return comps
