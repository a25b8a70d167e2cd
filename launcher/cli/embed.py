"""`notellm2 embed`: embed every note of a notes shard set with an exported model (or, with
--config and no --model, with the untrained model the config describes: the zero-shot baseline).

Runs in one process, or under torchrun / srun with several ranks (each embeds its share). Each rank
writes a part every --part-every batches under OUT/parts; a killed run, rerun with the same command,
resumes from the finished parts (docs/evaluation.md, "notellm2 embed")."""
from __future__ import annotations


from notellm2.launcher.cli import add_config_args, add_export_load_args, config_from_args, nonnegative_int, positive_int
from notellm2.modeling.names import PROBE_MODES  # torch-free, so `notellm2 --help` imports no torch

# Mirrors of notellm2.launcher.eval.embed.DEFAULT_PART_EVERY / EMBED_DEVICES and notellm2.launcher.eval.evaluate.EMBEDDING_DTYPES
# (those modules import torch; tests/launcher/eval/test_embed_parts.py checks they agree).
DEFAULT_PART_EVERY = 20
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float16")


def _run(args) -> int:
    from notellm2.launcher.eval.embed import embed_command

    cfg = config_from_args(args) if args.config else None
    # getattr: a namespace built by hand with the verb's first options (tests) still runs, with the defaults
    return embed_command(args.model, cfg, args.config, args.shards, args.out, mode=args.mode,
                         batch_size=args.batch_size, num_workers=args.num_workers,
                         part_every=getattr(args, "part_every", DEFAULT_PART_EVERY),
                         restart=getattr(args, "restart", False), device=getattr(args, "device", "cpu"),
                         dtype=getattr(args, "dtype", "float32"), vision_cache=getattr(args, "vision_cache", None),
                         trust_code=getattr(args, "trust_code", False), tower_path=getattr(args, "tower_path", None),
                         base=getattr(args, "base", None), overwrite=getattr(args, "overwrite", False))


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed the notes of a notes shard set (exported model or untrained baseline)")
    p.add_argument("--model", help="directory written by `notellm2 export`")
    p.add_argument("--shards", help="notes shards (glob, brace pattern; with --base also a `data write-notes` folder); "
                                    "default data.notes_shards of --config")
    p.add_argument("--base", default=None, metavar="EMB_DIR",
                   help="an earlier embedding set of the same model and mode: embed only the notes of --shards that are "
                        "new or changed, drop the deleted ones, reuse the rest (docs/new_notes.md)")
    p.add_argument("--out", required=True, help="output folder (embeddings.npy, ids.txt, embeddings.json)")
    p.add_argument("--mode", choices=PROBE_MODES, default="both",
                   help="probe: both inputs, the text alone, or the image alone (notes without an image are left out)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="notes per batch per rank (default 32)")
    p.add_argument("--num-workers", type=nonnegative_int, default=1, help="loader processes (0: none; default 1)")
    p.add_argument("--part-every", type=positive_int, default=DEFAULT_PART_EVERY, metavar="N",
                   help=f"each rank writes a part (OUT/parts/rank<R>-<K>.npz) every N batches (default "
                        f"{DEFAULT_PART_EVERY}); a killed run, rerun with the same settings, resumes after the "
                        "finished parts; they are removed once the final files are written")
    p.add_argument("--overwrite", action="store_true",
                   help="replace finished embeddings of another model, shards or settings in --out (the same "
                        "ones are left as they are: the command does nothing)")
    p.add_argument("--restart", action="store_true",
                   help="discard the parts in OUT/parts first (a rerun with other settings is refused without it)")
    p.add_argument("--vision-cache", default=None, metavar="DIR",
                   help="a cache written by `notellm2 data cache-vision` for this model's tower and these shards: "
                        "its features instead of pixels, the tower not run (default: data.vision_cache of --config)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the model runs: cpu (default) or cuda, the rank's GPU cuda:LOCAL_RANK")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="storage dtype of embeddings.npy: float32 (default) or float16 (half the file); the model "
                        "computes in its own dtype either way, readers upcast to float32")
    add_export_load_args(p)
    add_config_args(p)
    p.set_defaults(handler=_run)
