"""Entry point used by tests.helpers.multirank.run_ranks: init gloo, call module:function, save its return."""
import datetime
import importlib
import json
import os
import sys

# Run as a script, this file puts tests/ first on sys.path, where the test package tests/modeling would
# shadow the modeling package; its submodules then came from wherever notellm2 is pip-installed
# (an editable install of another checkout: a worktree's ranks ran that checkout's modeling code).
# The repository root (the folder above this file that holds pytest.ini; wherever under tests/ this
# file lives) goes first instead.
_root = os.path.dirname(os.path.abspath(__file__))
while not os.path.exists(os.path.join(_root, "pytest.ini")) and os.path.dirname(_root) != _root:
    _root = os.path.dirname(_root)
sys.path[0] = _root

import torch.distributed as dist  # noqa: E402


def main() -> None:
    target, kwargs, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("MULTIRANK_PG_TIMEOUT", "60"))))
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    rank = dist.get_rank()
    value = fn(**kwargs)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(value, fh)
    # The ranks' one teardown (barrier, end of the group, gloo's worker threads idle before the interpreter
    # exits: launcher/distributed.py); the function may have run it already (`notellm2 train` does).
    from notellm2.launcher.distributed import shutdown

    shutdown()


if __name__ == "__main__":
    main()
