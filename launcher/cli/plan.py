"""`notellm2 plan`: per-GPU memory estimate of a config on N nodes x G GPUs (nothing is loaded)."""
from __future__ import annotations

import contextlib
import json
import sys

from notellm2.launcher.cli import add_config_args, config_from_args, positive_float, positive_int


def _run(args) -> int:
    from notellm2.launcher.plan import format_plan, make_plan

    cfg = config_from_args(args)
    # Library chatter (DeepSpeed's accelerator notice) goes to stderr: stdout is the plan (or its JSON).
    # A PlanError (a key or file of the config) is reported by notellm2.launcher.cli.main.
    with contextlib.redirect_stdout(sys.stderr):
        plan = make_plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, seq_len=args.seq_len,
                         config_name=args.config or cfg.name)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_plan(plan, gpu_memory_gib=args.gpu_memory_gib))
    return 0


def register(sub) -> None:
    p = sub.add_parser("plan", help="per-GPU memory plan (parameters, gradients, optimizer, activations) for N nodes x G GPUs")
    add_config_args(p)
    p.add_argument("--nodes", type=positive_int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="GPUs (ranks) per node (default 8)")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="tokens per note prompt (default: model.max_text_tokens + image tokens + template)")
    p.add_argument("--gpu-memory-gib", type=positive_float, default=None, help="GPU memory to compare the total against (e.g. 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p.set_defaults(handler=_run)
