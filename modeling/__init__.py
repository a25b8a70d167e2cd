"""NoteLLM-2 style note encoders: LLM backbone, frozen vision tower, connector, prompts, late fusion,
and the gathered contrastive loss. Plain torch + transformers (no deepspeed, no launcher).

Entry points: `notellm2.modeling.encoder.build_all`, `notellm2.modeling.encoder.build_note_model`, `notellm2.modeling.backbone.load_llm`,
`notellm2.modeling.vision.build_vision_tower`, `notellm2.modeling.prompts.NotePrompter`, `notellm2.modeling.loss.GatheredContrastiveLoss`.
See docs/modeling.md.
"""
