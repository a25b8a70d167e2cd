"""`notellm2 embed`: embed every note of a notes shard set with an exported model (or, with
--config and no --model, with the untrained model the config describes: the zero-shot baseline).

Runs in one process, or under torchrun / srun with several ranks (each embeds its share)."""
from __future__ import annotations

import os
import sys

from launcher.cli import add_config_args, config_from_args
from modeling.config import PROBE_MODES, probe_unavailable  # torch-free, so `notellm2 --help` imports no torch

MODES = PROBE_MODES
# Ranks wait for each other only at the final gather; the slowest rank's whole share must fit in it.
EMBED_COLLECTIVE_TIMEOUT_S = 1800  # torch's default, what embed had before


def _run(args) -> int:
    from launcher import distributed

    distributed.enable_crash_traces()  # a native crash prints every thread's stack into this rank's log
    from data_shards.config import DataConfig
    from launcher.embed import run_embed
    from launcher.export import ExportError, read_export_config

    # The user's mistakes, before any rank starts or loads a model.
    if args.model:
        try:
            variant = read_export_config(args.model).model.variant
        except ExportError as e:
            print(f"notellm2 embed: --model: {e}", file=sys.stderr)
            return 2
    elif args.config:
        cfg = config_from_args(args)
        variant = cfg.model.variant
    else:
        raise SystemExit("notellm2 embed: give --model EXPORT_DIR, or --config for the untrained baseline")
    why = probe_unavailable(variant, args.mode)
    if why:
        print(f"notellm2 embed: --mode {args.mode}: {why}; use --mode text or --mode both", file=sys.stderr)
        return 2

    topo = distributed.detect_topology()
    if topo.world_size > 1:
        # The trainer's start-up (the rank's CUDA device is set before the group starts under NCCL),
        # before anything below touches CUDA; DeepSpeed's comm layer is not needed here.
        distributed.init_distributed(topo, timeout_s=EMBED_COLLECTIVE_TIMEOUT_S, deepspeed_comm=False)
    if args.model:
        from launcher.export import load_exported

        note_model, tower, prompter = load_exported(args.model)
        data_cfg = DataConfig(num_workers=args.num_workers)
        image_size = tower.image_size if tower is not None else 224
        source = {"model": os.path.abspath(args.model)}
        shards = args.shards
    else:
        from modeling.encoder import build_all

        import torch

        torch.manual_seed(cfg.train.seed)  # the new modules' random init is the same on every rank and run
        note_model, tower, prompter = build_all(cfg.model, cfg.loss)
        data_cfg = cfg.data
        image_size = cfg.model.vision.image_size
        source = {"model": "untrained", "config": os.path.abspath(args.config)}
        shards = args.shards or cfg.data.notes_shards
    if not shards:
        raise SystemExit("notellm2 embed: no notes shards (--shards, or data.notes_shards in the config)")
    rc = run_embed(note_model, tower, prompter, shards, args.out, data_cfg, args.batch_size, args.mode,
                   topo.rank, topo.world_size, image_size, source)
    distributed.shutdown()
    return rc


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed the notes of a notes shard set (exported model or untrained baseline)")
    p.add_argument("--model", help="directory written by `notellm2 export`")
    p.add_argument("--shards", help="notes shards (glob, brace pattern); default data.notes_shards of --config")
    p.add_argument("--out", required=True, help="output folder (embeddings.npy, ids.txt, embeddings.json)")
    p.add_argument("--mode", choices=MODES, default="both",
                   help="probe: both inputs, the text alone, or the image alone (notes without an image are left out)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    add_config_args(p)
    p.set_defaults(handler=_run)
