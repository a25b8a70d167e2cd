"""`notellm2 analyze attention --model EXPORT --shards PAIRS --out DIR`: the visual-neglect diagnosis.

Per layer, the saliency flow of the batch contrastive loss into the representation position from
image tokens, from text tokens, and between all other token pairs (launcher/eval/attention.py), written as
attention_flow.csv, attention_flow.png and attention_flow.json. Runs in one process."""
from __future__ import annotations

import os
import sys

from notellm2.launcher.cli import positive_int


def _parse_models(values: list[str]) -> list[tuple[str, str]]:
    """`[NAME=]DIR` -> (name, dir); the name defaults to the directory's base name."""
    from notellm2.launcher.cli import parse_named_dirs

    return parse_named_dirs(values, "--model")


def _attention(args) -> int:
    import torch

    from notellm2.launcher.eval.attention import (JSON_NAME, AttentionAnalysisError, analyze_batches, load_model,
                                                  pair_batches, pair_shard_paths, write_outputs)
    from notellm2.launcher.eval.embed import shards_fingerprint
    from notellm2.launcher.eval.provenance import model_fingerprint
    from notellm2.modeling.pretrained import ExportError, read_export_config
    from notellm2.outputs import check_folder_output, recorded_request, reuse_finished

    def fail(message: str) -> int:
        print(f"notellm2 analyze attention: {message}", file=sys.stderr)
        return 2

    if args.batches <= 0:
        return fail(f"--batches: got {args.batches}; allowed: an integer > 0")
    if args.batch_size <= 0:
        return fail(f"--batch-size: got {args.batch_size}; allowed: an integer > 0 (pairs per batch)")
    try:
        models = _parse_models(args.model)
        for _, path in models:  # every export is checked before the first one loads
            read_export_config(path)
    except (ValueError, ExportError) as e:
        return fail(f"--model: {e}" if isinstance(e, ExportError) else str(e))
    try:
        pair_shard_paths(args.shards)
    except AttentionAnalysisError as e:
        return fail(str(e))
    check_folder_output(args.out)
    request = {"models": {n: model_fingerprint(p, None) for n, p in models}, "shards": shards_fingerprint(args.shards)[0],
               "batches": args.batches, "pairs_per_batch": args.batch_size, "seed": args.seed}
    if reuse_finished(args.out, recorded_request(args.out, JSON_NAME), request, args.overwrite,
                      "an attention analysis"):
        print(f"{args.out}: already holds this analysis (same models, shards and settings); nothing to do")
        return 0
    torch.manual_seed(args.seed)
    reports = []
    for name, path in models:
        try:
            note_model, tower, prompter = load_model(path, device=args.device, trust_code=args.trust_code,
                                                     tower_path=args.tower_path)
            image_size = tower.image_size if tower is not None else 224
            batches = pair_batches(args.shards, prompter, args.batch_size, image_size, seed=args.seed)
            report = analyze_batches(
                note_model, tower, batches, name, args.batches, device=args.device,
                progress=lambda k, loss: print(f"[analyze] {name}: batch {k}/{args.batches}, loss {loss:.4f}",
                                               flush=True))
        except (AttentionAnalysisError, ExportError) as e:
            return fail(str(e))
        reports.append(report)
        del note_model, tower
    meta = {"models": {n: os.path.abspath(p) for n, p in models}, "shards": args.shards,
            "batches": args.batches, "pairs_per_batch": args.batch_size, "seed": args.seed, "request": request}
    paths = write_outputs(reports, args.out, meta)
    for r in reports:
        image = r.normalised("image")
        shown = "absent" if all(v is None for v in image) else \
            " ".join("-" if v is None else f"{v:.3f}" for v in image)
        short = f" (the shards hold only {r.batches} batches of {args.batch_size} pairs)" if r.batches < args.batches else ""
        print(f"{r.run} ({r.variant}): {r.batches} batches{short}, {r.rows} notes; image flow share per layer: {shown}")
    print(f"wrote {paths['csv']}, {paths['png']}, {paths['json']}")
    return 0


def register(sub) -> None:
    from notellm2.launcher.cli import add_export_load_args

    p = sub.add_parser("analyze", help="diagnose a trained model (attention: the visual-neglect saliency flows)")
    asub = p.add_subparsers(dest="analyze_verb", metavar="<analysis>")
    a = asub.add_parser("attention", help="per-layer saliency flow of the contrastive loss into the representation "
                                          "from image tokens, text tokens and all other pairs (CSV + PNG)")
    a.add_argument("--model", required=True, nargs="+", metavar="[NAME=]DIR",
                   help="one or more directories written by `notellm2 export` (one panel each)")
    a.add_argument("--shards", required=True, help="pairs shards (glob or brace pattern), e.g. pairs-test-*.tar")
    a.add_argument("--out", required=True, help="output folder (attention_flow.csv, .png, .json)")
    a.add_argument("--batches", type=positive_int, default=4, help="pair batches to average over (default 4)")
    a.add_argument("--batch-size", type=positive_int, default=8, help="pairs per batch (default 8; the loss sees 2x notes)")
    a.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a.add_argument("--seed", type=int, default=0, help="the reader's shuffle seed (default 0)")
    add_export_load_args(a)
    a.add_argument("--overwrite", action="store_true",
                   help="replace an analysis of other models, shards or settings in --out (the same: nothing is done)")
    a.set_defaults(handler=_attention)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
