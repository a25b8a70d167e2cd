"""`notellm2 embed`: embed every note of a notes shard set with an exported model (or, with
--config and no --model, with the untrained model the config describes: the zero-shot baseline).

Runs in one process, or under torchrun / srun with several ranks (each embeds its share)."""
from __future__ import annotations

from launcher.cli import add_config_args, config_from_args
from modeling.names import PROBE_MODES  # torch-free, so `notellm2 --help` imports no torch


def _run(args) -> int:
    from launcher.embed import embed_command

    cfg = config_from_args(args) if args.config else None
    return embed_command(args.model, cfg, args.config, args.shards, args.out, mode=args.mode,
                         batch_size=args.batch_size, num_workers=args.num_workers)


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed the notes of a notes shard set (exported model or untrained baseline)")
    p.add_argument("--model", help="directory written by `notellm2 export`")
    p.add_argument("--shards", help="notes shards (glob, brace pattern); default data.notes_shards of --config")
    p.add_argument("--out", required=True, help="output folder (embeddings.npy, ids.txt, embeddings.json)")
    p.add_argument("--mode", choices=PROBE_MODES, default="both",
                   help="probe: both inputs, the text alone, or the image alone (notes without an image are left out)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    add_config_args(p)
    p.set_defaults(handler=_run)
