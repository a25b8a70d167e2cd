"""Tiny, offline model fixtures shared by every test area (nothing is downloaded).

    tok_dir  = make_tokenizer(tmp_path)                    # SentencePiece BPE trained here (~300 pieces)
    bl_dir   = make_bytelevel_tokenizer(tmp_path)          # Qwen2-style byte-level BPE (~400 pieces)
    llm_dir  = make_tiny_llm_dir(tmp_path, arch="llama")   # or "qwen2"; holds its tokenizer too
    clip_dir = make_tiny_clip_dir(tmp_path)                # full CLIP (text + vision), 32 px, patch 8
    sig_dir  = make_tiny_siglip_dir(tmp_path)              # full SigLIP, 32 px, patch 8

Every function returns a directory path (str) that `from_pretrained` reads. Weights come from a
fixed seed, so two processes that build the same fixture get identical models. Each call takes
well under a second; the `tiny` fixture in `tests/conftest.py` shares one copy per session.
"""
from __future__ import annotations

import io
import os
import random

import torch

TINY_IMAGE_SIZE = 32
TINY_PATCH = 8

# A small corpus: plain words, JSON punctuation of the prompt templates, the characters of the
# placeholder strings (so a user typing "<IMG>" gets ordinary pieces), and the Chinese template
# characters (so prompt_language=zh does not collapse to <unk>).
_WORDS = (
    "the quick brown fox jumps over lazy dog note about cooking pasta tomato sauce travel diary "
    "mountains lakes lipstick review matte red color cat photos cute kitten image title topic "
    "content compress into one word summer beach recipe coffee garden flowers city night Note A B "
    "0 1 2 3 4 5 6 7 8 9"
).split()
_EXTRA = ['{"', '": ', '", "', '"}', "<", ">", "/", "_", ",", ".", ":", "IMG", "EMB", "s",
          "笔记", "标题", "话题", "内容", "图片", "压缩为一个词", "，", "：", "。", "“", "”"]


def _corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    vocab = _WORDS + _EXTRA
    return [" ".join(rng.choice(vocab) for _ in range(14)) for _ in range(n)]


def make_tokenizer(tmp_path, vocab_size: int = 300) -> str:
    """Train a SentencePiece BPE model in-process and save it as a transformers Llama tokenizer dir."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = os.path.join(str(tmp_path), "tokenizer")
    if os.path.exists(os.path.join(out, "tokenizer_config.json")):
        return out
    os.makedirs(out, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        minloglevel=2, num_threads=1, normalization_rule_name="identity")
    with open(os.path.join(out, "tokenizer.model"), "wb") as fh:
        fh.write(buf.getvalue())
    tok = LlamaTokenizer.from_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_bytelevel_tokenizer(tmp_path, vocab_size: int = 400) -> str:
    """A Qwen2-style byte-level BPE tokenizer (no BOS, <|endoftext|> as EOS) trained in-process."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Qwen2Tokenizer

    out = os.path.join(str(tmp_path), "tokenizer-bytelevel")
    if os.path.exists(os.path.join(out, "tokenizer_config.json")):
        return out
    raw = os.path.join(str(tmp_path), "tokenizer-bytelevel-raw")
    os.makedirs(raw, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(raw)
    tok = Qwen2Tokenizer(vocab=os.path.join(raw, "vocab.json"), merges=os.path.join(raw, "merges.txt"))
    tok.save_pretrained(out)
    return out


def make_tiny_llm_dir(tmp_path, arch: str = "llama", num_layers: int = 2, hidden: int = 32, seed: int = 0,
                      spare_rows: int = 0) -> str:
    """A causal-LM checkpoint (with LM head) plus its tokenizer, as a pretrained model dir would be.

    llama gets the SentencePiece tokenizer (make_tokenizer), qwen2 a byte-level BPE one
    (make_bytelevel_tokenizer), as the real families have. `spare_rows` pads the embedding matrix past
    the tokenizer (as Qwen2 checkpoints do), so new tokens need no resize."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = os.path.join(str(tmp_path), f"tiny-{arch}-{num_layers}x{hidden}-s{seed}" + (f"-spare{spare_rows}" if spare_rows else ""))
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    tok_dir = make_bytelevel_tokenizer(tmp_path) if arch == "qwen2" else make_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    common = dict(vocab_size=len(tok) + spare_rows, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "llama":
        cfg, cls = LlamaConfig(**common), LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        raise ValueError(f"make_tiny_llm_dir: arch {arch!r} is not one of 'llama', 'qwen2'")
    torch.manual_seed(seed)
    model = cls(cfg)
    # Distinct per-layer weights, so a test can tell which pretrained layers were kept.
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.fill_(1.0 + 0.01 * i)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_clip_dir(tmp_path, hidden: int = 32, layers: int = 2, vision_only: bool = False, seed: int = 0) -> str:
    """A full CLIP model (text + vision) or a CLIPVisionModel, 32 px images, 8 px patches."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

    out = os.path.join(str(tmp_path), f"tiny-clip{'-vision' if vision_only else ''}-{hidden}-s{seed}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH, projection_dim=16)
    torch.manual_seed(seed)
    if vision_only:
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    else:
        text = dict(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=16, projection_dim=16,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(out)
    return out


def make_tiny_siglip_dir(tmp_path, hidden: int = 32, layers: int = 2, vision_only: bool = False, seed: int = 0) -> str:
    """A full SigLIP model (text + vision) or a SiglipVisionModel, 32 px images, 8 px patches."""
    from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

    out = os.path.join(str(tmp_path), f"tiny-siglip{'-vision' if vision_only else ''}-{hidden}-s{seed}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH)
    torch.manual_seed(seed)
    if vision_only:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    else:
        text = dict(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                    num_attention_heads=4, max_position_embeddings=16,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(out)
    return out


def context_reading_llm_dir(root, seed: int = 0, std: float = 0.1) -> str:
    """make_tiny_llm_dir's 2-layer Llama (hidden 32) with its decoder matrices redrawn from N(0, std).

    At the initializer's std 0.02 a tiny random model's last-token state is set by the last few tokens
    and every attention row is nearly uniform; with std 0.1 the model reads its context, so tests of
    prompts and attention spans see what they test, not the seed. Cached per (seed, std) under `root`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    src = make_tiny_llm_dir(str(root), arch="llama", num_layers=2, hidden=32)
    out = os.path.join(str(root), f"tiny-llama-reads-context-s{seed}-{std}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(src)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


def warm_lora(module, std: float = 0.05, seed: int = 1) -> None:
    """LoRA adapters (notellm2.modeling.lora) as after some training: every B matrix (zero at init, which
    leaves A without gradient) and the placeholder rows moved by N(0, std) noise from a fixed generator
    (the same on every rank). Call it before deepspeed.initialize (the parameters are still whole)."""
    from notellm2.modeling.lora import adapter_state

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(adapter_state(module).items()):
            if ".lora_B." in name or name.endswith(".rows"):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def make_tiny_bert_dir(tmp_path, tokenizer_dir: str, hidden: int = 32, layers: int = 2) -> str:
    """A tiny BERT (dropout 0, so chunked caching takes it) with the tokenizer of `tokenizer_dir` (e.g.
    all-MiniLM-L6-v2's): the text_two_tower variant's backbone at test size."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = os.path.join(str(tmp_path), f"tiny-bert-{layers}x{hidden}")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=128,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
