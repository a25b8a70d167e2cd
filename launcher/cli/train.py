"""`notellm2 train --config run.yaml [a.b=c ...]`: start under torchrun, the deepspeed launcher or srun."""
from __future__ import annotations

import argparse

from notellm2.launcher.cli import add_config_args, config_from_args


def _run(args) -> int:
    from notellm2.launcher.train.components import load_factory
    from notellm2.launcher.train.preemption import PREEMPTED_EXIT_CODE, Preempted
    from notellm2.launcher.train.train import train

    cfg = config_from_args(args)
    factory = load_factory(args.components) if args.components else None

    # The process group ends in notellm2.launcher.cli.main, on this verb's every way out (notellm2.launcher.distributed.shutdown).
    try:
        train(cfg, factory=factory)  # a CheckpointError (the user's run dir) is reported by notellm2.launcher.cli.main
    except Preempted:
        return PREEMPTED_EXIT_CODE
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train the note encoder (DeepSpeed ZeRO; start with torchrun/deepspeed/srun)")
    add_config_args(p)
    p.add_argument("--components", default="",
                   help="advanced: 'module:function' building the model and loader (default: the NoteModel + PairLoader)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=_run)

