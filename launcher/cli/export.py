"""`notellm2 export --run-dir RUN --out DIR [--step N]`: a checkpoint as a directory loadable without DeepSpeed."""
from __future__ import annotations


def _run(args) -> int:
    from notellm2.launcher.export import export
    from notellm2.outputs import check_folder_output

    check_folder_output(args.out)  # a file where the export folder goes: one line, before a checkpoint is read
    export(args.run_dir, args.out, step=args.step, overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="consolidate a training checkpoint into a DeepSpeed-free encoder directory")
    p.add_argument("--run-dir", required=True, help="train.output_dir of the run")
    p.add_argument("--out", required=True, help="output directory (created; must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(handler=_run)
