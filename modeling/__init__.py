"""NoteLLM-2 style note encoders: LLM backbone, frozen vision tower, connector, prompts, late fusion,
and the gathered contrastive loss. Plain torch + transformers (no deepspeed, no launcher).

Entry points: `modeling.encoder.build_all`, `modeling.encoder.build_note_model`, `modeling.backbone.load_llm`,
`modeling.vision.build_vision_tower`, `modeling.prompts.NotePrompter`, `modeling.loss.GatheredContrastiveLoss`.
See docs/modeling.md.
"""
