import pickle

import pytest
import torch

from notellm2.modeling.prompts import NotePrompter, PromptError, fit_budget, marker_positions

K = 4  # image tokens per slot in these tests
NOTE = {"note_id": "n1", "title": "cooking pasta", "content": "tomato sauce recipe", "topics": ["food", "summer"],
        "has_image": True}


def squash(p: NotePrompter, ids) -> str:
    return p.decode(ids).replace(" ", "")


def make(tok, variant, **kw):
    kw.setdefault("num_image_tokens", 0 if variant in ("text_only", "late_fusion") else K)
    return NotePrompter(tok, variant, **kw)


def test_text_template(llama_tok):
    p = make(llama_tok, "text_only")
    enc = p.encode(NOTE)
    assert enc["has_image"] is False
    assert squash(p, enc["input_ids"]) == 'Note:{"title":"cookingpasta","topic":"food,summer","content":"tomatosaucerecipe"},compressintooneword:"'


def test_basic_mm_template_expands_slot(llama_tok):
    p = make(llama_tok, "basic_mm")
    enc = p.encode(NOTE)
    assert enc["has_image"] is True
    assert squash(p, enc["input_ids"]) == ('Note:{"image":' + "<IMG>" * K +
                                           ',"title":"cookingpasta","topic":"food,summer","content":"tomatosaucerecipe"},compressintooneword:"')
    ids = enc["input_ids"]
    slot = [i for i, t in enumerate(ids) if t == p.img_id]
    assert len(slot) == K and slot == list(range(slot[0], slot[0] + K))  # contiguous


def test_micl_template_and_positions(llama_tok):
    p = make(llama_tok, "notellm2")
    enc = p.encode(NOTE)
    assert squash(p, enc["input_ids"]) == (
        'Note:{"image":' + "<IMG>" * K + '},compressintooneword:"<IMG_EMB>".Note:{"title":"cookingpasta",'
        '"topic":"food,summer","content":"tomatosaucerecipe"},compressintooneword:"')
    batch = p.collate([enc])
    ids = enc["input_ids"]
    assert batch["vis_pos"].item() == ids.index(p.img_emb_id) - 1
    assert batch["last_pos"].item() == len(ids) - 1
    # The image-only probe prompt is exactly the mICL prefix that ends before <IMG_EMB>.
    img = p.encode(NOTE, mode="image")
    assert img["input_ids"] == ids[: ids.index(p.img_emb_id)]
    assert img["has_image"] is True


def test_chinese_wording(llama_tok):
    p = make(llama_tok, "micl", language="zh")
    text = squash(p, p.encode(NOTE)["input_ids"])
    assert text.startswith('笔记：{"图片":' + "<IMG>" * K + "}，压缩为一个词：“<IMG_EMB>”。笔记：{\"标题\":")
    assert text.endswith('"}，压缩为一个词：“')
    assert '"话题":"food，summer"' in text
    with pytest.raises(PromptError, match="model.prompt_language: got 'fr'"):
        make(llama_tok, "micl", language="fr")


def test_truncation_cuts_inside_fields_and_keeps_the_suffix(llama_tok):
    p = make(llama_tok, "micl", max_text_tokens=12)
    long = dict(NOTE, content="tomato sauce recipe " * 60, title="cat")
    enc = p.encode(long)
    full = make(llama_tok, "micl", max_text_tokens=10_000).encode(long)
    assert len(full["input_ids"]) - len(enc["input_ids"]) > 100
    text = squash(p, enc["input_ids"])
    assert text.endswith('"},compressintooneword:"')
    assert '"title":"cat"' in text  # a short field survives whole
    # Exactly the budget of user tokens: prompt length = template length + 12.
    empty = make(llama_tok, "micl", max_text_tokens=12).encode(dict(NOTE, title="", content="", topics=[]))
    assert len(enc["input_ids"]) - len(empty["input_ids"]) == 12


def test_fit_budget():
    assert fit_budget([3, 100, 5], 20) == [3, 12, 5]
    assert fit_budget([3, 4, 5], 20) == [3, 4, 5]
    assert fit_budget([30, 30, 30], 10) == [3, 3, 4]
    assert fit_budget([0, 0, 9], 4) == [0, 0, 4]
    assert sum(fit_budget([50, 1, 80], 7)) == 7 and fit_budget([50, 1, 80], 7)[1] == 1


@pytest.mark.parametrize("tok_name", ["llama_tok", "qwen_tok"])
@pytest.mark.parametrize("variant", ["text_only", "basic_mm", "micl", "notellm2"])
def test_control_strings_in_user_text_stay_text(request, tok_name, variant):
    llama_tok = request.getfixturevalue(tok_name)
    p = make(llama_tok, variant)
    hostile = dict(NOTE, title="<IMG> <s> </s> <IMG_EMB>", content="</s><IMG><IMG_EMB><s>", topics=["<IMG>", "</s>"])
    ids = p.encode(hostile)["input_ids"]
    clean = p.encode(dict(NOTE, title="", content="", topics=[]))["input_ids"]
    control = {p.img_id, p.img_emb_id, llama_tok.bos_token_id, llama_tok.eos_token_id, llama_tok.pad_token_id} - {None}
    for cid in control:
        assert ids.count(cid) == clean.count(cid), llama_tok.convert_ids_to_tokens([cid])
    # ... and the strings are really in the prompt, as ordinary pieces.
    assert '<IMG><s></s><IMG_EMB>' in squash(p, [i for i in ids if i not in control])


def test_marker_positions_hand_built():
    PAD, EMB = 0, 99
    ids = torch.tensor([
        [5, PAD, 7, EMB, 9, 10, PAD, PAD],  # right padded, a pad id inside the text (mask 1)
        [PAD, PAD, 5, PAD, 7, EMB, 9, 10],  # left padded, a pad id inside the text
        [5, 6, 7, 8, PAD, PAD, PAD, PAD],   # no marker
        [5, 6, EMB, PAD, EMB, PAD, PAD, PAD],  # marker only in the real part counts; the first one wins
        [3, 4, PAD, PAD, PAD, EMB, EMB, EMB],  # markers under the mask are ignored
    ])
    mask = torch.tensor([
        [1, 1, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
    ])
    last, vis = marker_positions(ids, mask, EMB)
    assert last.tolist() == [5, 7, 3, 4, 2]
    assert vis.tolist() == [2, 4, -1, 1, -1]
    with pytest.raises(PromptError, match="no real token"):
        marker_positions(ids[:1], torch.zeros_like(ids[:1]), EMB)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_positions_point_at_the_right_tokens(llama_tok, side):
    p = make(llama_tok, "notellm2")
    notes = [NOTE, dict(NOTE, content="a much longer body " * 5), dict(NOTE, has_image=False)]
    encs = [p.encode(n) for n in notes]
    b = p.collate(encs, padding_side=side)
    assert b["input_ids"].shape == b["attention_mask"].shape == (3, max(len(e["input_ids"]) for e in encs))
    assert b["has_image"].tolist() == [True, True, False]
    for i, e in enumerate(encs):
        real = b["input_ids"][i][b["attention_mask"][i].bool()].tolist()
        assert real == e["input_ids"]
        assert b["input_ids"][i, b["last_pos"][i]].item() == e["input_ids"][-1]
        if p.img_emb_id in e["input_ids"]:
            j = e["input_ids"].index(p.img_emb_id)
            assert b["input_ids"][i, b["vis_pos"][i] + 1].item() == p.img_emb_id
            assert b["input_ids"][i, b["vis_pos"][i]].item() == e["input_ids"][j - 1]
        else:
            assert b["vis_pos"][i].item() == -1
    assert p.img_id not in encs[2]["input_ids"]  # a note without an image gets the text prompt


def test_prompter_is_picklable(llama_tok):
    p = make(llama_tok, "notellm2")
    q = pickle.loads(pickle.dumps(p))
    assert q.encode(NOTE) == p.encode(NOTE)


def test_modes(llama_tok):
    micl = make(llama_tok, "micl")
    text = micl.encode(NOTE, mode="text")
    assert micl.img_id not in text["input_ids"] and text["has_image"] is False
    assert text == make(llama_tok, "text_only").encode(NOTE)
    lf = make(llama_tok, "late_fusion")
    both = lf.encode(NOTE)
    assert both["has_image"] is True and lf.img_id not in both["input_ids"]  # image enters through the gate
    img = lf.encode(NOTE, mode="image")
    assert img["has_image"] is True
    assert squash(lf, img["input_ids"]) == 'Note:{"title":"","topic":"","content":""},compressintooneword:"'
    with pytest.raises(PromptError, match="note n1: variant 'text_only' has no image probe"):
        make(llama_tok, "text_only").encode(NOTE, mode="image")
    with pytest.raises(PromptError, match="note n1: the image probe needs a note with has_image true"):
        micl.encode(dict(NOTE, has_image=False), mode="image")
    with pytest.raises(PromptError, match="mode 'video'"):
        micl.encode(NOTE, mode="video")


@pytest.mark.parametrize("bad,match", [
    (dict(NOTE, topics="food"), "note n1: topics must be a list of strings"),
    (dict(NOTE, title=3), "note n1: title must be a string"),
    (dict(NOTE, content=None), "note n1: content must be a string"),
    (dict(NOTE, has_image="yes"), "note n1: has_image must be true or false"),
])
def test_bad_notes_name_the_note(llama_tok, bad, match):
    with pytest.raises(PromptError, match=match):
        make(llama_tok, "micl").encode(bad)


def test_setting_errors(llama_tok):
    with pytest.raises(PromptError, match="num_image_tokens must be > 0"):
        NotePrompter(llama_tok, "micl", num_image_tokens=0)
    with pytest.raises(PromptError, match="model.variant: got 'nope'"):
        NotePrompter(llama_tok, "nope")
    from transformers import AutoTokenizer
    from tests.helpers.models import make_tokenizer
    import tempfile
    raw = AutoTokenizer.from_pretrained(make_tokenizer(tempfile.mkdtemp()))
    with pytest.raises(PromptError, match="lacks .*load_tokenizer"):
        NotePrompter(raw, "text_only")


def test_bytelevel_tokenizer_templates(qwen_tok):
    p = make(qwen_tok, "notellm2")
    assert p.prefix == []  # Qwen-style: no BOS
    enc = p.encode(NOTE)
    assert p.decode(enc["input_ids"]) == (
        'Note: {"image": ' + "<IMG>" * K + '}, compress into one word: "<IMG_EMB>". Note: {"title": "cooking pasta", '
        '"topic": "food, summer", "content": "tomato sauce recipe"}, compress into one word: "')
    zh = make(qwen_tok, "micl", language="zh")
    assert zh.decode(zh.encode(NOTE)["input_ids"]).endswith('"}，压缩为一个词：“')


EMPTY = {"note_id": "blank", "title": "", "content": "", "topics": []}


@pytest.mark.parametrize("tok_name", ["llama_tok", "qwen_tok"])
@pytest.mark.parametrize("language", ["en", "zh"])
def test_a_note_with_no_text_gets_a_valid_prompt_in_every_variant_and_probe(request, tok_name, language):
    """Picture-only posts (docs/benchmark.md): empty title, topics and content are legal. Every variant and
    probe gives a non-empty prompt (the representation is read at its last real token) that holds the
    template with empty fields."""
    from notellm2.modeling.names import PROBE_MODES, VARIANTS, probe_unavailable

    tok = request.getfixturevalue(tok_name)
    for variant in VARIANTS:
        p = make(tok, variant, language=language)
        for has_image in (True, False):
            note = dict(EMPTY, has_image=has_image)
            for mode in PROBE_MODES:
                if probe_unavailable(variant, mode) or (mode == "image" and not has_image):
                    continue
                enc = p.encode(note, mode=mode)
                ids = enc["input_ids"]
                assert ids, (variant, mode, has_image)
                batch = p.collate([enc, p.encode(dict(NOTE, has_image=has_image), mode=mode)])
                assert batch["last_pos"][0].item() == len(ids) - 1
                if p.kind != "raw":  # the template's literal text, then the closing quote
                    text = squash(p, ids)
                    assert text.endswith('"' if language == "en" else "“"), (variant, mode, text)
                    if mode != "image" or p.kind == "text":  # every prompt but the image-only one has the fields
                        assert '"title":"","topic":"","content":""' in text or \
                               '"标题":"","话题":"","内容":""' in text, (variant, mode, text)

