"""The note encoder family: LLM + connector + late-fusion gate + head + contrastive loss.

    note_model, tower, prompter = build_all(cfg.model, cfg.loss)
    batch = prompter.collate([prompter.encode(n) for n in notes])           # + note_ids
    with torch.no_grad():
        image_tokens, image_pooled = tower(pixel_values)                     # frozen, outside the model
    out = note_model(batch, image_tokens, image_pooled)                      # out["loss"].backward()
    embs = note_model(batch, image_tokens, image_pooled, embed_only=True)    # chunked caching's passes:
    out = note_model.loss_from_embeddings(embs, batch["note_ids"], log_scale)  #   launcher/train/chunked.py
    emb = note_model.encode(batch, image_tokens, image_pooled, mode="both")  # [N, embed_dim], L2-normalised

NoteModel holds everything trainable (LLM, connector, gate, head, temperature) and nothing of the
frozen vision tower. image_tokens / image_pooled have one row per batch row (rows whose note has no
image may hold anything, e.g. a blank image's features: they are ignored).

Variants and probes: the registry in `notellm2.modeling.names` (VARIANT_SPECS, PROBES).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from notellm2.modeling.backbone import IMG_EMB_TOKEN, IMG_TOKEN, EmbeddingGrower, load_llm
from notellm2.modeling.config import LossConfig, ModelConfig
from notellm2.modeling.connector import build_connector
from notellm2.modeling.fusion import EmbeddingHead, LateFusionGate
from notellm2.modeling.lora import set_dropout_keys
from notellm2.modeling.loss import GatheredContrastiveLoss, negative_inputs
from notellm2.modeling.names import PROBES, probe_unavailable, variant_spec
from notellm2.modeling.prompts import NotePrompter, marker_positions
from notellm2.modeling.vision import VisionTower, build_vision_tower


class ModelInputError(ValueError):
    """A batch that does not match what the model variant needs."""


def _llm_width(llm) -> int:
    cfg = llm.config
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return int(cfg.hidden_size)


class NoteModel(nn.Module):
    def __init__(self, variant: str, llm: nn.Module, connector: Optional[nn.Module], late_fusion: Optional[LateFusionGate],
                 head: EmbeddingHead, loss_fn: GatheredContrastiveLoss, img_id: int, img_emb_id: int,
                 num_image_tokens: int, micl_weight_mm: float = 9.0, micl_weight_vis: float = 1.0):
        super().__init__()
        self.variant = variant
        self.spec = variant_spec(variant)
        self.llm = llm
        self.connector = connector
        self.late_fusion = late_fusion
        self.head = head
        self.loss_fn = loss_fn
        self.img_id = int(img_id)
        self.img_emb_id = int(img_emb_id)
        self.num_image_tokens = int(num_image_tokens)
        self.micl_weight_mm = float(micl_weight_mm)
        self.micl_weight_vis = float(micl_weight_vis)

    # ------------------------------------------------------------------ representations

    def _embed_inputs(self, input_ids, mask, image_tokens, row_keys=None):
        embeds = self.llm.get_input_embeddings()(input_ids)
        slot = (input_ids == self.img_id) & mask.bool()
        rows = slot.any(dim=1)
        if self.connector is None:
            if rows.any():
                raise ModelInputError(f"variant {self.variant!r} takes no image tokens, but the batch has {IMG_TOKEN} slots")
            return embeds
        if image_tokens is None:
            if rows.any():
                raise ModelInputError(f"the batch has {IMG_TOKEN} slots in {int(rows.sum())} rows but image_tokens is None")
            return embeds
        if image_tokens.shape[0] != input_ids.shape[0]:
            raise ModelInputError(f"image_tokens has {image_tokens.shape[0]} rows for a batch of {input_ids.shape[0]}")
        counts = slot.sum(dim=1)[rows]
        if (counts != self.num_image_tokens).any():
            raise ModelInputError(f"image slots must hold {self.num_image_tokens} {IMG_TOKEN} tokens; found "
                                  f"{sorted(set(counts.tolist()))} (was the prompter built with this model's num_image_tokens?)")
        if rows.any():
            keys = row_keys[rows.to(row_keys.device)] if row_keys is not None else None  # keyed dropout (connector.py)
            proj = self.connector(image_tokens[rows].to(embeds.device), row_keys=keys)  # [n, K, H]
            embeds = embeds.masked_scatter(slot.unsqueeze(-1), proj.to(embeds.dtype))
        else:
            # Keep the connector in the graph (zero contribution) so every rank reduces the same gradients.
            embeds = embeds + 0.0 * self.connector(image_tokens[:1].to(embeds.device)).sum().to(embeds.dtype)
        return embeds

    def represent(self, batch: dict, image_tokens=None, image_pooled=None) -> dict:
        """Hidden-state representations before the head: note [N,H], visual [N,H] (mICL), gate values."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        if input_ids.shape != mask.shape:
            raise ModelInputError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(mask.shape)} differ")
        embeds = self._embed_inputs(input_ids, mask, image_tokens, batch.get("note_ids"))
        # Positions count real tokens only, so left and right padding give the same result.
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        set_dropout_keys(self.llm, batch.get("note_ids"))  # LoRA's keyed dropout, if any (modeling/lora.py)
        out = self.llm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False)
        hs = out.last_hidden_state
        if "last_pos" in batch and "vis_pos" in batch:
            last_pos, vis_pos = batch["last_pos"].to(hs.device), batch["vis_pos"].to(hs.device)
        else:
            last_pos, vis_pos = marker_positions(input_ids, mask, self.img_emb_id)
        rows = torch.arange(hs.shape[0], device=hs.device)
        if self.spec.pooling == "mean":  # text_two_tower: the mean over the real tokens (sentence-transformers' pooling)
            m = mask.to(hs.dtype).unsqueeze(-1)
            note = (hs * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        else:
            note = hs[rows, last_pos]
        result = {"note": note}
        if self.spec.micl:
            vis = hs[rows, vis_pos.clamp(min=0)]
            # A row without the visual marker (a note without an image) uses its note representation.
            result["visual"] = torch.where((vis_pos >= 0).view(-1, 1), vis, note)
        if self.late_fusion is not None:
            has_image = batch.get("has_image")
            has_image = torch.zeros(hs.shape[0], dtype=torch.bool, device=hs.device) if has_image is None else has_image.to(hs.device).bool()
            if image_pooled is None:
                if has_image.any():
                    raise ModelInputError(f"variant {self.variant!r} fuses the pooled image feature, but image_pooled is None "
                                          f"for a batch with {int(has_image.sum())} image rows")
                return result
            if image_pooled.shape[0] != hs.shape[0]:
                raise ModelInputError(f"image_pooled has {image_pooled.shape[0]} rows for a batch of {hs.shape[0]}")
            pooled = image_pooled.to(hs.device)
            result["note"], z = self.late_fusion(note, pooled, has_image)
            if self.spec.micl:
                result["visual"], _ = self.late_fusion(result["visual"], pooled, has_image)
            zi = z[has_image].float()
            result["gate_values"] = zi.detach()  # chunked caching combines the chunks' gate statistics
            result["gate_mean"] = zi.mean().detach() if zi.numel() else torch.tensor(float("nan"))
            result["gate_std"] = zi.std().detach() if zi.numel() > 1 else torch.tensor(float("nan"))
        return result

    # ------------------------------------------------------------------ training and inference

    def forward(self, batch: dict, image_tokens=None, image_pooled=None, embed_only: bool = False,
                cached_grads: Optional[dict] = None) -> dict:
        """The training loss of a batch (default). Chunked representation caching (launcher/train/chunked.py)
        calls it through the engine in two other ways, so that ZeRO-3 gathers the parameters as usual:
        `embed_only=True` returns the representations after the gate and the head ("note", "visual" for
        mICL; "gate_values"), and `cached_grads` ({"note", "visual", "log_scale"}: d loss / d those)
        returns {"surrogate": sum(embedding * its cached gradient) (+ log_scale * its gradient)},
        whose backward is this batch's share of the loss's gradient."""
        if "note_ids" not in batch:
            raise ModelInputError("batch: missing note_ids (int64 hashes of the note ids, used for duplicate masking)")
        reps = self.represent(batch, image_tokens, image_pooled)
        embs = {"note": self.head(reps["note"])}
        if self.spec.micl:
            embs["visual"] = self.head(reps["visual"])
        if "gate_values" in reps:
            embs["gate_values"] = reps["gate_values"]
        if embed_only:
            return embs
        if cached_grads is not None:
            surrogate = (embs["note"] * cached_grads["note"].to(embs["note"])).sum()
            if self.spec.micl:
                surrogate = surrogate + (embs["visual"] * cached_grads["visual"].to(embs["visual"])).sum()
            if cached_grads.get("log_scale") is not None:
                surrogate = surrogate + self.loss_fn(None, log_scale_grad=cached_grads["log_scale"])
            return {"surrogate": surrogate}
        out = self.loss_from_embeddings(embs, batch["note_ids"], negatives=negative_inputs(batch))
        if "gate_mean" in reps:
            out["gate_mean"], out["gate_std"] = reps["gate_mean"], reps["gate_std"]
        return out

    def loss_from_embeddings(self, embs: dict, note_ids: torch.Tensor, log_scale: Optional[torch.Tensor] = None,
                             negatives: Optional[dict] = None) -> dict:
        """The (mICL-mixed) gathered loss of the head's outputs `embs` ({"note", "visual"}); `log_scale`
        replaces the temperature parameter's value (chunked caching's first pass, outside the engine);
        `negatives` ({"logq", "known"}: `notellm2.modeling.loss.negative_inputs(batch)`) feed the loss's negative
        options, the same for both mICL losses."""
        neg = negatives or {}
        if log_scale is None:
            def loss_fn(e, i):
                return self.loss_fn(e, i, **neg)
        else:
            def loss_fn(e, i):
                return self.loss_fn.loss(e, i, log_scale, **neg)
        note_emb = embs["note"]
        mm = loss_fn(note_emb, note_ids)
        out = {"logit_scale": mm["logit_scale"], "embeddings": note_emb.detach()}
        if self.spec.micl:
            vis = loss_fn(embs["visual"], note_ids)
            w_mm, w_vis = self.micl_weight_mm, self.micl_weight_vis
            out["loss"] = (w_mm * mm["loss"] + w_vis * vis["loss"]) / (w_mm + w_vis)
            out["loss_mm"], out["loss_vis"] = mm["loss"].detach(), vis["loss"].detach()
        else:
            out["loss"] = mm["loss"]
        return out

    @torch.no_grad()
    def encode(self, batch: dict, image_tokens=None, image_pooled=None, mode: str = "both") -> torch.Tensor:
        """Normalised embeddings [N, embed_dim] of a batch collated by the prompter with the same `mode`
        (see PROBES)."""
        if mode not in PROBES:
            raise ModelInputError(f"encode: mode {mode!r}; allowed: {', '.join(PROBES)}")
        why = probe_unavailable(self.variant, mode)
        if why:
            raise ModelInputError(f"encode: {why}")
        if mode == "text":
            image_tokens, image_pooled = None, None
            batch = dict(batch, has_image=torch.zeros_like(batch["input_ids"][:, 0], dtype=torch.bool))
        return self.head(self.represent(batch, image_tokens, image_pooled)["note"])

    @torch.no_grad()
    def encode_with_visual(self, batch: dict, image_tokens=None, image_pooled=None):
        """mICL variants: (full-input embeddings, image-probe embeddings) [N, embed_dim] from one forward
        of a `both` batch. The image probe's prompt is the mICL prompt's prefix up to the visual marker,
        so under causal attention its last hidden state is the visual representation read here (fused
        alike); rows without an image get their note embedding (the image probe has none for them)."""
        if not self.spec.micl:
            raise ModelInputError(f"encode_with_visual: variant {self.variant!r} has no visual representation")
        reps = self.represent(batch, image_tokens, image_pooled)
        return self.head(reps["note"]), self.head(reps["visual"])

    def make_prompter(self, tokenizer, language: str = "en", max_text_tokens: int = 96) -> NotePrompter:
        return NotePrompter(tokenizer, self.variant, language=language, max_text_tokens=max_text_tokens,
                            num_image_tokens=self.num_image_tokens if self.spec.image_in_prompt else 0)


def build_note_model(model_cfg: ModelConfig, loss_cfg: LossConfig, vision_tower: Optional[VisionTower] = None,
                     llm=None, tokenizer=None) -> NoteModel:
    """Assemble the trainable model. Loads the LLM (load_llm) unless `llm` and `tokenizer` are given.
    Image variants need `vision_tower` for its widths (token_dim, pooled_dim, num_tokens); the tower
    itself is not kept."""
    spec = variant_spec(model_cfg.variant)
    if (llm is None) != (tokenizer is None):
        raise ValueError("build_note_model: pass both llm and tokenizer (from load_llm), or neither")
    if llm is None:
        llm, tokenizer = load_llm(model_cfg.llm)
    if spec.uses_images and vision_tower is None:
        raise ValueError(f"model.variant: {model_cfg.variant!r} uses images; pass vision_tower=build_vision_tower(cfg.model.vision) "
                         "(its widths size the connector and the gate)")
    llm_dim = _llm_width(llm)
    connector = None
    num_image_tokens = 0
    if spec.image_in_prompt:
        connector = build_connector(model_cfg.connector, vision_tower.token_dim, llm_dim, vision_tower.num_tokens)
        num_image_tokens = connector.num_output_tokens
    fcfg, hcfg = model_cfg.fusion, model_cfg.head
    gate = LateFusionGate(llm_dim, vision_tower.pooled_dim, bias=fcfg.bias, init=fcfg.init,
                          init_std=fcfg.init_std, input_norm=fcfg.input_norm) if spec.late_fusion else None
    if not hcfg.projection and model_cfg.embed_dim != llm_dim:
        raise ValueError(f"model.embed_dim: got {model_cfg.embed_dim}, but model.head.projection is false, so the "
                         f"embedding is the backbone's width; set model.embed_dim: {llm_dim}")
    head = EmbeddingHead(llm_dim, model_cfg.embed_dim, bias=hcfg.bias, init=hcfg.init, init_std=hcfg.init_std,
                         projection=hcfg.projection)
    img_id, img_emb_id = tokenizer.convert_tokens_to_ids([IMG_TOKEN, IMG_EMB_TOKEN])
    if img_id is None or img_id == tokenizer.unk_token_id:
        raise ValueError("build_note_model: the tokenizer lacks the placeholder tokens; load it with notellm2.modeling.backbone.load_llm/load_tokenizer")
    return NoteModel(model_cfg.variant, llm, connector, gate, head, GatheredContrastiveLoss(loss_cfg), img_id, img_emb_id,
                     num_image_tokens, loss_cfg.micl_weight_mm, loss_cfg.micl_weight_vis)


def build_all(model_cfg: ModelConfig, loss_cfg: LossConfig, dtype: Optional[torch.dtype] = None,
              grow_embeddings: Optional[EmbeddingGrower] = None):
    """(note_model, vision_tower or None, prompter): everything for `model_cfg`, loaded from local dirs.
    `dtype` and `grow_embeddings` go to load_llm."""
    llm, tokenizer = load_llm(model_cfg.llm, dtype=dtype, grow_embeddings=grow_embeddings)
    tower = build_vision_tower(model_cfg.vision, variant=model_cfg.variant)
    note_model = build_note_model(model_cfg, loss_cfg, tower, llm=llm, tokenizer=tokenizer)
    prompter = note_model.make_prompter(tokenizer, model_cfg.prompt_language, model_cfg.max_text_tokens)
    return note_model, tower, prompter
