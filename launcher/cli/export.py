"""`notellm2 export --run-dir RUN --out DIR [--step N]`: a checkpoint as a directory loadable without DeepSpeed."""
from __future__ import annotations

TOWER_MODES = ("copy", "relative")  # mirror of notellm2.launcher.export.TOWER_MODES (that module imports torch)


def _run(args) -> int:
    from notellm2.launcher.export import export
    from notellm2.outputs import check_folder_output

    check_folder_output(args.out)  # a file where the export folder goes: one line, before a checkpoint is read
    export(args.run_dir, args.out, step=args.step, overwrite=args.overwrite, trust_code=args.trust_code,
           tower_path=args.tower_path, tower=args.tower)
    return 0


def register(sub) -> None:
    p = sub.add_parser("export", help="consolidate a training checkpoint into a DeepSpeed-free encoder directory")
    p.add_argument("--run-dir", required=True, help="train.output_dir of the run")
    p.add_argument("--out", required=True, help="output directory (created; must not exist or be empty)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--tower", choices=TOWER_MODES, default="copy",
                   help="a Hugging Face vision tower is copied into the export (default), or named by its path "
                        "relative to the export (a large tower kept beside it)")
    p.add_argument("--tower-path", default=None, metavar="DIR",
                   help="the tower's folder, instead of the run's model.vision.path (a run folder from another machine)")
    p.add_argument("--trust-code", action="store_true",
                   help="import the vision plugin factory the run's config names even when it is not one of notellm2's")
    p.set_defaults(handler=_run)
