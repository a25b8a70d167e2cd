"""The one registry of model variant names and probe modes (torch-free).

The config schema (`model.variant`), the prompts (which template a variant trains with), the
encoder (what each variant builds), the serving encoder and the CLI (`embed --mode`) all read the
names here; nothing else spells them.

Variants (`model.variant`):

    text_only          text prompt; no image anywhere
    basic_mm           image tokens inside the note prompt
    micl               mICL prompt (image note, then text note); loss mixes note and visual representations
    late_fusion        text prompt; pooled ViT feature fused by the gate
    late_early_fusion  basic_mm prompt + gate
    notellm2           mICL prompt + gate on both representations
    text_two_tower     the text two-tower baseline: raw text (title, topics, content), no note prompt,
                       mean pooling over the tokens; meant for an encoder backbone such as
                       all-MiniLM-L6-v2 (one shared, siamese encoder for both sides of a pair)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class VariantSpec:
    prompt: str            # which template (notellm2.modeling.prompts) the variant trains with: text, basic_mm, micl
    image_in_prompt: bool  # a connector feeds image tokens into the LLM
    micl: bool             # mICL: a second (visual) representation and the mixed loss
    late_fusion: bool      # the gate mixes the pooled ViT feature into the representation(s)
    pooling: str = "last"  # the note representation: "last" real token's hidden state, or the "mean" over tokens

    @property
    def uses_images(self) -> bool:
        """Image features reach the representation (through the prompt or the gate)."""
        return self.image_in_prompt or self.late_fusion


VARIANT_SPECS: dict[str, VariantSpec] = {
    "text_only": VariantSpec("text", False, False, False),
    "basic_mm": VariantSpec("basic_mm", True, False, False),
    "micl": VariantSpec("micl", True, True, False),
    "late_fusion": VariantSpec("text", False, False, True),
    "late_early_fusion": VariantSpec("basic_mm", True, False, True),
    "notellm2": VariantSpec("micl", True, True, True),
    "text_two_tower": VariantSpec("raw", False, False, False, pooling="mean"),
}
VARIANTS = tuple(VARIANT_SPECS)

# The probes (`notellm2 embed --mode`, `NoteEncoder.encode(mode=...)`): what each feeds the model.
PROBES: dict[str, str] = {
    "both": "the variant's training representation (note representation, fused where the variant fuses)",
    "text": "text prompt only; no image tokens, no fusion",
    "image": "image only: the image-only prompt (mICL: equals the visual representation), fused where the "
             "variant fuses; late_fusion: the text prompt with empty fields, fused with the pooled image feature",
}
PROBE_MODES = tuple(PROBES)


def variant_spec(variant: str, key: str = "model.variant") -> VariantSpec:
    """The spec of `variant`; a ValueError naming `key` and the allowed names otherwise."""
    spec = VARIANT_SPECS.get(variant)
    if spec is None:
        raise ValueError(f"{key}: got {variant!r}; allowed: {', '.join(VARIANTS)}")
    return spec


def probe_unavailable(variant: str, mode: str) -> Optional[str]:
    """Why `variant` has no `mode` probe (one sentence), or None when it has one."""
    if mode not in PROBES:
        return f"mode {mode!r} is not a probe; allowed: {', '.join(PROBE_MODES)}"
    if mode == "image" and not variant_spec(variant).uses_images:
        return f"variant {variant!r} has no image probe (it never sees an image)"
    return None
