"""Entry point used by tests.multirank.run_ranks: init gloo, call module:function, save its return."""
import datetime
import importlib
import json
import os
import sys

import torch.distributed as dist


def main() -> None:
    target, kwargs, out_dir = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("MULTIRANK_PG_TIMEOUT", "60"))))
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    value = fn(**kwargs)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as fh:
        json.dump(value, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
