"""`notellm2` command line.

Each module in `launcher/commands/` that defines `register(subparsers)` contributes verbs; a verb
that is not built yet simply has no module. A verb's handler receives the parsed argparse
namespace and returns an exit code. Verbs that take a run config use `add_config_args` and
`config_from_args` so that `--config file.yaml a.b=c ...` behaves the same everywhere.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from launcher.config import ConfigError, RunConfig, load_config


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, values read as YAML scalars (e.g. train.max_steps=10)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notellm2",
        description="Train and evaluate NoteLLM-2 style multimodal note encoders for I2I recommendation.")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    import launcher.commands as commands
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"launcher.commands.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None) or not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except ConfigError as e:
        print(f"notellm2 {args.verb}: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
