"""The visual-neglect diagnosis: where the contrastive loss's attention saliency flows, layer by layer.

For one batch of pairs, with the LLM switched to eager attention (for this analysis only) so that it
hands back its post-softmax attention probabilities A_l [N, heads, L, L] of every layer l, the
saliency of the batch contrastive loss L (the training loss: `note_model(batch, ...)["loss"]`) is

    S_l = | sum over heads of A_l * dL/dA_l |          [N, L, L]; S_l[n, i, j]: key j -> query i

(the "information flow" saliency of Wang et al., "Label Words are Anchors", EMNLP 2023, which the
NoteLLM-2 paper uses to show visual neglect). Per row n with representation position r (the last
real token: its hidden state is the note embedding), per layer:

    image flow  = mean of S_l[n, r, j] over j in the image span
    text flow   = mean of S_l[n, r, j] over j in the text span
    other flow  = mean of S_l[n, i, j] over every other pair j < i of real tokens

Spans come from token ids and marker positions (`notellm2.modeling.prompts.marker_positions`), never from
counting pads:
- mICL prompts (micl, notellm2): the image span is the whole image note, every real token up to and
  including the one before `<IMG_EMB>`; the text span is every real token after `<IMG_EMB>` before r.
- an `<IMG>` slot inside the note (basic_mm, late_early_fusion): the image span is the slot tokens;
  the text span is every other real token before r (template, fields, BOS).
- a text prompt (text_only, late_fusion, and any note without an image): no image span; the text
  span is every real token before r.
A layer's figure is the mean over rows of the row means; rows without an image span are left out of
the image mean; a run with no image span at all has the image flow *absent* (None, an empty CSV cell),
not zero. The normalised flows of a layer are the three means divided by their sum (the two present
ones for a run without image flow), so they sum to 1 in every layer. docs/analysis.md says how to
read them.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from notellm2.modeling.prompts import marker_positions
from notellm2.files import commit_file, temporary_name

FLOWS = ("image", "text", "other")
CSV_NAME, PNG_NAME, JSON_NAME = "attention_flow.csv", "attention_flow.png", "attention_flow.json"
NORMALISATION = ("per layer, each flow is its mean saliency divided by the sum of the layer's present flow "
                 "means (image + text + other; text + other without image flow), so a layer's flows sum to 1")


class AttentionAnalysisError(ValueError):
    """An input the analysis cannot use (a model, shards or batch); the message names it."""


def load_model(export_dir: str, device: str = "cpu", trust_code: bool = False, tower_path: str | None = None):
    """(note_model, vision_tower or None, prompter) of an export directory, fp32 (saliency gradients in
    bf16 would be mostly rounding). The one place the analysis loads a model."""
    from notellm2.modeling.pretrained import NoteEncoder

    enc = NoteEncoder.from_pretrained(export_dir, device=device, trust_code=trust_code,  # the one loader of an export
                                      tower_path=tower_path)
    return enc.note_model, enc.vision_tower, enc.prompter


# ----------------------------------------------------------------------------- attention with gradient

@contextlib.contextmanager
def eager_attention(llm):
    """The LLM runs eager attention inside the block (sdpa and flash-attn never materialise the
    probabilities); its previous implementation is restored on exit."""
    previous = getattr(llm.config, "_attn_implementation", None)
    if previous != "eager":
        llm.set_attn_implementation("eager")
    try:
        yield
    finally:
        if previous not in (None, "eager"):
            llm.set_attn_implementation(previous)


@contextlib.contextmanager
def recorded_attentions(llm):
    """Inside the block every forward of `llm` is asked for `output_attentions=True` (HF's own way);
    the yielded list then holds the last forward's per-layer attention probabilities, in the graph."""
    store: list = []

    def ask(module, args, kwargs):
        return args, dict(kwargs, output_attentions=True)

    def keep(module, args, kwargs, output):
        attentions = getattr(output, "attentions", None)
        store[:] = list(attentions) if attentions is not None else []

    handles = [llm.register_forward_pre_hook(ask, with_kwargs=True),
               llm.register_forward_hook(keep, with_kwargs=True)]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def batch_saliency(note_model, batch: dict, image_tokens=None, image_pooled=None):
    """(per-layer saliency [N, L, L] fp32 list, loss value) of one batch; see the module docstring."""
    llm = note_model.llm
    with eager_attention(llm), recorded_attentions(llm) as attentions:
        out = note_model(batch, image_tokens, image_pooled)
        probs = list(attentions)
    if not probs or any(a is None for a in probs):
        raise AttentionAnalysisError(f"the backbone {type(llm).__name__} returned no attention probabilities "
                                     "with output_attentions=True under eager attention")
    if not out["loss"].requires_grad:
        raise AttentionAnalysisError("the loss has no gradient: are the model's parameters frozen?")
    grads = torch.autograd.grad(out["loss"], probs, allow_unused=True)
    if all(g is None for g in grads):
        raise AttentionAnalysisError(f"the attention probabilities of {type(llm).__name__} are not in the loss's "
                                     "graph (were they returned detached?)")
    saliency = []
    for a, g in zip(probs, grads):
        s = torch.zeros(a.shape[0], a.shape[2], a.shape[3], device=a.device) if g is None else \
            (a.detach().float() * g.float()).sum(dim=1).abs()
        saliency.append(s)
    return saliency, float(out["loss"].detach())


# ----------------------------------------------------------------------------- spans and flows

@dataclass
class Spans:
    rep: torch.Tensor              # [N] long: the representation position (last real token)
    real: torch.Tensor             # [N, L] bool: attention mask
    image: Optional[torch.Tensor]  # [N, L] bool, or None: this variant's LLM sees no image tokens
    text: torch.Tensor             # [N, L] bool


def token_spans(note_model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Spans:
    """Image and text key spans of each row, from token ids and the mask (see the module docstring)."""
    real = attention_mask.bool()
    rep, vis = marker_positions(input_ids, attention_mask, note_model.img_emb_id)
    n, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device).expand(n, length)
    before_rep = real & (pos < rep.view(-1, 1))
    if not note_model.spec.image_in_prompt:
        return Spans(rep, real, None, before_rep)
    if note_model.spec.micl:
        marker = vis + 1  # the <IMG_EMB> position; vis == -1 (no marker): no image note in this row
        has = (vis >= 0).view(-1, 1)
        image = real & has & (pos <= vis.view(-1, 1))
        text = before_rep & torch.where(has, pos > marker.view(-1, 1), torch.ones_like(real))
        return Spans(rep, real, image, text)
    image = real & (input_ids == note_model.img_id)
    return Spans(rep, real, image, before_rep & ~image)


def row_flows(saliency: torch.Tensor, spans: Spans) -> dict:
    """{flow: [N] per-row mean (nan where the row has no such pair)} of one layer's saliency [N, L, L]."""
    s = saliency.float()
    n, length, _ = s.shape
    rows = torch.arange(n, device=s.device)
    into_rep = s[rows, spans.rep.to(s.device)]  # [N, L]: S[n, r, j]

    def mean_over(weights):
        count = weights.sum(dim=-1).float()
        total = (into_rep * weights).sum(dim=-1)
        return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))

    image = spans.image.to(s.device) if spans.image is not None else None
    text = spans.text.to(s.device)
    real = spans.real.to(s.device)
    pairs = torch.tril(torch.ones(length, length, dtype=torch.bool, device=s.device), diagonal=-1)
    pairs = pairs & real.unsqueeze(2) & real.unsqueeze(1)
    counted = text | image if image is not None else text
    pairs[rows, spans.rep.to(s.device)] &= ~counted
    count = pairs.sum(dim=(1, 2)).float()
    other = torch.where(count > 0, (s * pairs).sum(dim=(1, 2)) / count.clamp(min=1), torch.full_like(count, float("nan")))
    return {"image": mean_over(image) if image is not None else None, "text": mean_over(text), "other": other}


@dataclass
class FlowReport:
    """Per-layer flows of one run, accumulated over batches (the mean of row means)."""

    run: str
    variant: str
    num_layers: int
    image_absent: bool  # the variant's LLM never sees image tokens
    sums: dict = field(default_factory=dict)    # flow -> [layers] sum of row means
    counts: dict = field(default_factory=dict)  # flow -> [layers] rows counted
    batches: int = 0
    rows: int = 0
    losses: list = field(default_factory=list)

    def __post_init__(self):
        for f in FLOWS:
            self.sums.setdefault(f, [0.0] * self.num_layers)
            self.counts.setdefault(f, [0] * self.num_layers)

    def add(self, saliency: list, spans: Spans, loss: float) -> None:
        if len(saliency) != self.num_layers:
            raise AttentionAnalysisError(f"{self.run}: {len(saliency)} attention layers, expected {self.num_layers}")
        for layer, s in enumerate(saliency):
            for f, values in row_flows(s, spans).items():
                if values is None:
                    continue
                ok = ~torch.isnan(values)
                self.sums[f][layer] += float(values[ok].sum())
                self.counts[f][layer] += int(ok.sum())
        self.batches += 1
        self.rows += int(spans.rep.shape[0])
        self.losses.append(loss)

    def raw(self, flow: str) -> list:
        """Mean saliency per layer; None in every layer where no row had such a pair (absent)."""
        return [self.sums[flow][i] / self.counts[flow][i] if self.counts[flow][i] else None
                for i in range(self.num_layers)]

    def normalised(self, flow: str) -> list:
        raws = {f: self.raw(f) for f in FLOWS}
        out = []
        for i in range(self.num_layers):
            present = [raws[f][i] for f in FLOWS if raws[f][i] is not None]
            total = sum(present)
            value = raws[flow][i]
            out.append(None if value is None else (value / total if total > 0 else 0.0))
        return out

    @property
    def image_rows(self) -> int:
        return max(self.counts["image"]) if self.counts["image"] else 0

    def as_dict(self) -> dict:
        return {"run": self.run, "variant": self.variant, "num_layers": self.num_layers, "batches": self.batches,
                "rows": self.rows, "image_rows": self.image_rows,
                "image_flow": "absent" if self.image_absent or all(v is None for v in self.raw("image")) else "present",
                "mean_loss": sum(self.losses) / len(self.losses) if self.losses else None,
                "normalised": {f: self.normalised(f) for f in FLOWS}, "raw": {f: self.raw(f) for f in FLOWS}}


# ----------------------------------------------------------------------------- a run over batches

def num_attention_layers(note_model) -> int:
    cfg = note_model.llm.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return int(cfg.num_hidden_layers)


def analyze_batches(note_model, vision_tower, batches: Iterable[dict], run: str, max_batches: int,
                    device="cpu", progress=None) -> FlowReport:
    """The flows of `run` over the first `max_batches` pair batches (layout [queries; targets])."""
    from notellm2.data_shards.batch import to_device
    from notellm2.modeling.vision import encode_images

    note_model.eval()  # dropout off; gradients still flow
    report = FlowReport(run, note_model.variant, num_attention_layers(note_model),
                        image_absent=not note_model.spec.image_in_prompt)
    device = torch.device(device)
    for k, batch in enumerate(batches):
        if k >= max_batches:
            break
        batch = to_device(batch, device)
        tokens, pooled = encode_images(vision_tower, batch)
        saliency, loss = batch_saliency(note_model, batch, tokens, pooled)
        report.add(saliency, token_spans(note_model, batch["input_ids"], batch["attention_mask"]), loss)
        if progress is not None:
            progress(k + 1, loss)
    if report.batches == 0:
        raise AttentionAnalysisError(f"{run}: no pair batch to analyse")
    return report


def pair_shard_paths(shards) -> list[str]:
    """The shard files of `shards`, checked to hold pairs (their first sample has q.json), or a one-line
    AttentionAnalysisError naming the pattern or the file."""
    from notellm2.data_shards.reader import expand_shards, index_shard

    try:
        paths = expand_shards(shards)
    except (FileNotFoundError, ValueError) as e:
        raise AttentionAnalysisError(f"--shards: {e}") from None
    first = index_shard(paths[0])
    if not first.samples:
        raise AttentionAnalysisError(f"--shards: {paths[0]} holds no sample ({first.problem or 'empty'})")
    if not any(m[0] == "q.json" for m in first.samples[0][1]):
        raise AttentionAnalysisError(f"--shards: {paths[0]} holds no pairs (its first sample has no q.json); "
                                     "give pairs-*.tar shards")
    return paths


def pair_batches(shards, prompter, batch_size: int, image_size: int, seed: int = 0):
    """Pair batches of `batch_size` pairs from pairs shards, as training reads them (one process, no
    flips, no workers)."""
    from notellm2.data_shards.config import DataConfig
    from notellm2.data_shards.reader import PairLoader

    paths = pair_shard_paths(shards)
    data_cfg = DataConfig(num_workers=0, random_flip=False, seed=seed)
    try:
        return PairLoader(paths, None, data_cfg=data_cfg, encode_fn=prompter.encode,
                          collate_text_fn=prompter.collate, rank=0, world_size=1, pairs_per_rank=batch_size,
                          image_size=image_size)
    except ValueError as e:
        raise AttentionAnalysisError(f"--shards: {e}") from None


# ----------------------------------------------------------------------------- outputs

CSV_COLUMNS = ("run", "variant", "layer", "image_flow", "text_flow", "other_flow",
               "image_flow_raw", "text_flow_raw", "other_flow_raw")


def _cell(v) -> str:
    return "" if v is None else repr(float(v))


def _atomic(path: str, write) -> None:
    tmp = temporary_name(path)
    write(tmp)
    commit_file(tmp, path)


def write_csv(reports: list, path: str) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_COLUMNS)
            for r in reports:
                norm = {f: r.normalised(f) for f in FLOWS}
                raw = {f: r.raw(f) for f in FLOWS}
                for layer in range(r.num_layers):
                    w.writerow([r.run, r.variant, layer] + [_cell(norm[f][layer]) for f in FLOWS]
                               + [_cell(raw[f][layer]) for f in FLOWS])
    _atomic(path, write)


def plot(reports: list, path: str) -> None:
    """One panel per run: the three normalised flows over layers (image absent: no curve, said so)."""
    from notellm2.errors import require

    require("matplotlib", "plots").use("Agg")
    import matplotlib.pyplot as plt

    n = len(reports)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), sharey=True, squeeze=False)
    styles = {"image": ("tab:red", "o", "image -> representation"),
              "text": ("tab:blue", "s", "text -> representation"),
              "other": ("tab:gray", "^", "all other token pairs")}
    for ax, r in zip(axes[0], reports):
        layers = list(range(r.num_layers))
        for f in FLOWS:
            ys = r.normalised(f)
            if all(y is None for y in ys):
                ax.text(0.5, 0.5, "image flow: absent\n(no image tokens in the LLM input)", transform=ax.transAxes,
                        ha="center", va="center", fontsize=8, color=styles[f][0])
                continue
            ax.plot(layers, [float("nan") if y is None else y for y in ys], color=styles[f][0],
                    marker=styles[f][1], ms=3, label=styles[f][2])
        ax.set_title(f"{r.run} ({r.variant})", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of the layer's saliency flow")
    handles = [plt.Line2D([], [], color=c, marker=m, ms=3, label=label) for c, m, label in styles.values()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def write_outputs(reports: list, out_dir: str, meta: dict) -> dict:
    """CSV, PNG and JSON (meta, normalisation, per-run figures) under out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, name) for k, name in (("csv", CSV_NAME), ("png", PNG_NAME), ("json", JSON_NAME))}
    write_csv(reports, paths["csv"])
    plot(reports, paths["png"])
    doc = {**meta, "normalisation": NORMALISATION, "runs": [r.as_dict() for r in reports]}

    def write(tmp):
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
    _atomic(paths["json"], write)
    return paths
