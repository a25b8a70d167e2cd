"""`notellm2 config`: print the resolved run config (YAML + overrides, validated)."""
from __future__ import annotations

import yaml

from notellm2.launcher.cli import add_config_args, config_from_args
from notellm2.launcher.config import config_hash, config_to_dict


def _run(args) -> int:
    cfg = config_from_args(args)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# config hash: {config_hash(cfg)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a config and print it resolved")
    add_config_args(p)
    p.set_defaults(handler=_run)
