"""Note-compression prompts, their token budget, and the positions the representations are read at.

A prompt is a list of segments: fixed template text, the note's fields (title, topic, content), the
image slot `<IMG>` (expanded to `num_image_tokens` copies of the IMG placeholder id; the connector's
output replaces their embeddings) and the mICL visual marker `<IMG_EMB>`. Template text and the
note's fields are encoded separately, fields with special-token parsing disabled, and control tokens
are inserted by id: a user who types "<IMG>", "<s>" or "</s>" in a title gets ordinary text pieces.

English templates (`model.prompt_language: en`)::

    text      Note: {"title": "T", "topic": "P", "content": "C"}, compress into one word: "
    basic_mm  Note: {"image": <IMG>, "title": "T", "topic": "P", "content": "C"}, compress into one word: "
    micl      Note: {"image": <IMG>}, compress into one word: "<IMG_EMB>". Note: {"title": "T", "topic": "P", "content": "C"}, compress into one word: "
    image     Note: {"image": <IMG>}, compress into one word: "
    raw       T P C   (text_two_tower: the fields alone, joined by spaces, inside the tokenizer's own
                       special tokens, e.g. BERT's [CLS] ... [SEP]; no template, no marker)

The note representation is the last layer's hidden state at the last real token (the closing `"`);
the mICL visual representation is the hidden state immediately before `<IMG_EMB>`. Note that the
`image` prompt is exactly the prefix of the mICL prompt that ends before `<IMG_EMB>`, so (causal
attention) the image probe of an mICL model reproduces its visual representation.

Positions are found from the marker id and the attention mask, never by counting pads: they are
right under left padding, right padding and a pad id occurring inside the text.
"""
from __future__ import annotations


import torch

from notellm2.errors import UserError
from notellm2.modeling.backbone import IMG_EMB_TOKEN, IMG_TOKEN
from notellm2.modeling.names import PROBE_MODES, VARIANTS, probe_unavailable, variant_spec

IMG, EMB = "\x00IMG", "\x00EMB"  # segment markers for the image slot and the mICL visual marker
FIELDS = ("title", "topic", "content")

_TEMPLATES = {
    "en": {
        "text": ['Note: {"title": "', "title", '", "topic": "', "topic", '", "content": "', "content",
                 '"}, compress into one word: "'],
        "basic_mm": ['Note: {"image": ', IMG, ', "title": "', "title", '", "topic": "', "topic",
                     '", "content": "', "content", '"}, compress into one word: "'],
        "micl": ['Note: {"image": ', IMG, '}, compress into one word: "', EMB, '". Note: {"title": "', "title",
                 '", "topic": "', "topic", '", "content": "', "content", '"}, compress into one word: "'],
        "image": ['Note: {"image": ', IMG, '}, compress into one word: "'],
        "raw": ["title", " ", "topic", " ", "content"],
        "topic_sep": ", ",
    },
    # The paper's Chinese wording.
    "zh": {
        "text": ['笔记：{"标题": "', "title", '", "话题": "', "topic", '", "内容": "', "content", '"}，压缩为一个词：“'],
        "basic_mm": ['笔记：{"图片": ', IMG, ', "标题": "', "title", '", "话题": "', "topic", '", "内容": "', "content",
                     '"}，压缩为一个词：“'],
        "micl": ['笔记：{"图片": ', IMG, '}，压缩为一个词：“', EMB, '”。笔记：{"标题": "', "title", '", "话题": "', "topic",
                 '", "内容": "', "content", '"}，压缩为一个词：“'],
        "image": ['笔记：{"图片": ', IMG, '}，压缩为一个词：“'],
        "raw": ["title", " ", "topic", " ", "content"],
        "topic_sep": "，",
    },
}

class PromptError(UserError, ValueError):
    """A note or a prompter setting that cannot be encoded."""


def fit_budget(lengths: list[int], budget: int) -> list[int]:
    """Per-field token caps summing to at most `budget`: short fields keep everything, the rest share
    what is left equally (water-filling), so a long body cannot starve the title."""
    caps = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = budget
    for k, i in enumerate(order):
        share = left // (len(order) - k)
        caps[i] = min(lengths[i], share)
        left -= caps[i]
    return caps


def marker_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, marker_id: int):
    """(last_pos, vis_pos) per row from explicit markers and the mask.

    last_pos: index of the last real token (mask 1); vis_pos: index just before the first `marker_id`
    among real tokens, -1 where the row has no marker.
    """
    n, length = input_ids.shape
    ar = torch.arange(length, device=input_ids.device).expand(n, length)
    real = attention_mask.bool()
    if not real.any(dim=1).all():
        raise PromptError("marker_positions: a row has no real token (attention_mask all 0)")
    last = torch.where(real, ar, -1).max(dim=1).values
    is_marker = (input_ids == marker_id) & real
    first = torch.where(is_marker, ar, length).min(dim=1).values
    vis = torch.where(is_marker.any(dim=1), first - 1, torch.full_like(first, -1))
    return last, vis


def _nid(note) -> str:
    if isinstance(note, dict):
        return str(note.get("note_id", note.get("id", "?")))
    return "?"


class NotePrompter:
    """Encodes notes into prompt ids (in DataLoader workers: plain lists, picklable) and collates them.

    encode(note, mode):
      mode "both"  - the variant's training prompt (text prompt for a note without an image);
      mode "text"  - the text prompt, no image: the text-only probe;
      mode "image" - the image-only prompt (for late_fusion, whose LLM never sees image tokens, the text
                     prompt with empty fields, fused with the pooled image feature): the image-only probe.
    Returned `has_image` says whether image features enter the model for that row (slot or late fusion).
    """

    def __init__(self, tokenizer, variant: str, language: str = "en", max_text_tokens: int = 96,
                 num_image_tokens: int = 0):
        if variant not in VARIANTS:
            raise PromptError(f"model.variant: got {variant!r}; allowed: {', '.join(VARIANTS)}")
        if language not in _TEMPLATES:
            raise PromptError(f"model.prompt_language: got {language!r}; allowed: {', '.join(_TEMPLATES)}")
        if max_text_tokens <= 0:
            raise PromptError(f"model.max_text_tokens: got {max_text_tokens}; allowed: an integer > 0")
        self.tokenizer = tokenizer
        self.variant = variant
        self.language = language
        self.max_text_tokens = max_text_tokens
        self.num_image_tokens = num_image_tokens
        spec = variant_spec(variant)
        self.kind = spec.prompt
        self.uses_images = spec.uses_images
        if spec.image_in_prompt and num_image_tokens <= 0:
            raise PromptError(f"NotePrompter: variant {variant!r} puts image tokens in the prompt; num_image_tokens "
                              f"must be > 0 (the connector's output count), got {num_image_tokens}")
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IMG_TOKEN, IMG_EMB_TOKEN) if t not in vocab]
        if missing:
            raise PromptError(f"NotePrompter: the tokenizer lacks {missing}; load it with notellm2.modeling.backbone.load_tokenizer")
        self.img_id = tokenizer.convert_tokens_to_ids(IMG_TOKEN)
        self.img_emb_id = tokenizer.convert_tokens_to_ids(IMG_EMB_TOKEN)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.control_ids = frozenset({self.img_id, self.img_emb_id})
        self.prefix, self.suffix = self._special_affixes()
        tpl = _TEMPLATES[language]
        self.topic_sep = tpl["topic_sep"]
        # Literal template pieces encoded once.
        self.templates = {name: [self._segment(s) for s in tpl[name]] for name in ("text", "basic_mm", "micl", "image", "raw")}

    # ------------------------------------------------------------------ encoding

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer puts before and after text by default (Llama: [BOS] and nothing; BERT:
        [CLS] and [SEP]). Note prompts use only the prefix: they must end at the compression quote. The
        raw text of text_two_tower uses both, as its encoder saw them in pre-training."""
        tok = self.tokenizer
        plain = tok("Note", add_special_tokens=False)["input_ids"]
        full = tok("Note", add_special_tokens=True)["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return list(full[:start]), list(full[start + len(plain):])
        return [], []

    def _segment(self, seg: str) -> tuple:
        """Template piece -> ("img",) | ("emb",) | ("field", name) | ("lit", ids) (plain data: picklable)."""
        if seg == IMG:
            return ("img",)
        if seg == EMB:
            return ("emb",)
        if seg in FIELDS:
            return ("field", seg)
        return ("lit", tuple(self.tokenizer(seg, add_special_tokens=False)["input_ids"]))

    def _encode_user(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [i for i in ids if i not in self.control_ids]

    def encode(self, note: dict, mode: str = "both") -> dict:
        """Prompt ids for one note: {"input_ids": list[int], "has_image": bool}."""
        title, topic, content, has_image = self._check_note(note)
        if mode not in PROBE_MODES:
            raise PromptError(f"NotePrompter.encode: mode {mode!r}; allowed: {', '.join(PROBE_MODES)}")
        uses_image = False
        why = probe_unavailable(self.variant, mode)
        if why:
            raise PromptError(f"note {_nid(note)}: {why}")
        if self.kind == "raw":
            name = "raw"
        elif mode == "text" or not self.uses_images:
            name = "text"
        elif mode == "image":
            if not has_image:
                raise PromptError(f"note {_nid(note)}: the image probe needs a note with has_image true")
            uses_image = True
            name = "text" if self.kind == "text" else "image"
            if name == "text":  # late_fusion's image probe: empty fields, pooled feature through the gate
                title, topic, content = "", "", ""
        else:  # both
            uses_image = has_image
            name = self.kind if has_image else "text"
        fields = {"title": self._encode_user(title), "topic": self._encode_user(topic),
                  "content": self._encode_user(content)}
        caps = fit_budget([len(fields[f]) for f in FIELDS], self.max_text_tokens)
        for f, cap in zip(FIELDS, caps):
            fields[f] = fields[f][:cap]
        ids = list(self.prefix)
        for seg in self.templates[name]:
            if seg[0] == "img":
                ids.extend([self.img_id] * self.num_image_tokens)
            elif seg[0] == "emb":
                ids.append(self.img_emb_id)
            elif seg[0] == "field":
                ids.extend(fields[seg[1]])
            else:
                ids.extend(seg[1])
        if name == "raw":
            ids.extend(self.suffix)
        return {"input_ids": ids, "has_image": bool(uses_image)}

    def _check_note(self, note: dict):
        nid = _nid(note)
        if not isinstance(note, dict):
            raise PromptError(f"note: expected a dict with title, content, topics, has_image; got {type(note).__name__}")
        title = note.get("title", "")
        content = note.get("content", "")
        topics = note.get("topics", [])
        has_image = note.get("has_image", False)
        if not isinstance(title, str):
            raise PromptError(f"note {nid}: title must be a string, got {type(title).__name__}")
        if not isinstance(content, str):
            raise PromptError(f"note {nid}: content must be a string, got {type(content).__name__}")
        if isinstance(topics, str) or not isinstance(topics, (list, tuple)) or not all(isinstance(t, str) for t in topics):
            raise PromptError(f"note {nid}: topics must be a list of strings, got {topics!r}")
        if not isinstance(has_image, bool):
            raise PromptError(f"note {nid}: has_image must be true or false, got {has_image!r}")
        return title, self.topic_sep.join(topics), content, has_image

    # ------------------------------------------------------------------ collation

    def collate(self, encodings: list[dict], padding_side: str = "right") -> dict:
        """Pad a list of encodings into tensors.

        Returns input_ids [N,L], attention_mask [N,L], has_image [N] bool, last_pos [N] (last real
        token), vis_pos [N] (token before <IMG_EMB>, -1 where absent).
        """
        if padding_side not in ("right", "left"):
            raise PromptError(f"collate: padding_side {padding_side!r}; allowed: right, left")
        if not encodings:
            raise PromptError("collate: no encodings")
        length = max(len(e["input_ids"]) for e in encodings)
        n = len(encodings)
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids = torch.as_tensor(e["input_ids"], dtype=torch.long)
            sl = slice(0, len(ids)) if padding_side == "right" else slice(length - len(ids), length)
            input_ids[i, sl] = ids
            mask[i, sl] = 1
        last, vis = marker_positions(input_ids, mask, self.img_emb_id)
        return {"input_ids": input_ids, "attention_mask": mask,
                "has_image": torch.tensor([bool(e["has_image"]) for e in encodings], dtype=torch.bool),
                "last_pos": last, "vis_pos": vis}

    def decode(self, input_ids) -> str:
        """Readable prompt (control tokens shown by name) for debugging and docs."""
        return self.tokenizer.decode(list(input_ids), skip_special_tokens=False)
