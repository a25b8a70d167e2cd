"""`notellm2` command line: one explicit table of verbs.

`VERBS` maps each verb to the module that parses its arguments (a nested dict is a verb with
sub-verbs, e.g. `notellm2 data mine-pairs`). Each module is named like its verb (`data mine-pairs`
-> `launcher/cli/data/mine_pairs.py`) and defines `register(subparsers)`, which adds the verb's
parser with `set_defaults(handler=...)`; the handler receives the parsed namespace and returns an
exit code. Verbs only parse arguments and call a library function; they import torch, pandas and
the like inside the handler, so `notellm2 --help` stays light. A new verb is one line in `VERBS`
plus its module.

Verbs that take a run config use `add_config_args` and `config_from_args`, so that
`--config file.yaml a.b=c ...` behaves the same everywhere. A user's mistake (`notellm2.errors`)
becomes one line on stderr and exit code 2, never a traceback; so does a malformed command line
(`Parser.error`: one line naming the option, not argparse's usage block). Numeric options take their
range from the option types below (`positive_int`, `fraction`, ...): 0, a negative number, nan or inf
where they make no sense is refused by the parser, before any work starts (docs/data.md, "Errors").
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from typing import Union

import notellm2
from notellm2 import __version__
from notellm2.launcher.config import RunConfig, load_config
from notellm2.errors import one_line, user_error_types

VerbTable = dict[str, Union[str, "VerbTable"]]


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `notellm2 VERB: error: MESSAGE (see notellm2 VERB --help)`, exit 2.
    Sub-parsers inherit the class (argparse's add_subparsers uses the parent's type)."""

    def error(self, message: str):
        line = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {line} (see {self.prog} --help)\n")


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return value


def int_at_least(low: int):
    """An argparse type: an integer >= `low`."""
    def parse(text: str) -> int:
        value = _number(text, int, "an integer")
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: must be an integer >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"  # argparse names the type in 'invalid ... value' messages
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in [low, high] (an open end excludes its bound)."""
    def parse(text: str) -> float:
        value = _number(text, float, "a number")
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            lo, hi = "(" if low_open else "[", ")" if high_open else "]"
            raise argparse.ArgumentTypeError(f"{value}: must be in {lo}{low}, {high}{hi}")
        return value
    parse.__name__ = "number"
    return parse


finite_float = float_in(-math.inf)
positive_float = float_in(0.0, low_open=True)
nonnegative_float = float_in(0.0)
fraction = float_in(0.0, 1.0, high_open=True)  # [0, 1)
probability = float_in(0.0, 1.0)  # [0, 1]

VERBS: VerbTable = {
    "config": "notellm2.launcher.cli.config",
    "data": {
        "validate": "notellm2.launcher.cli.data.validate",
        "import-openclipart": "notellm2.launcher.cli.data.import_openclipart",
        "simulate-views": "notellm2.launcher.cli.data.simulate_views",
        "mine-pairs": "notellm2.launcher.cli.data.mine_pairs",
        "write-shards": "notellm2.launcher.cli.data.write_shards",
        "write-notes": "notellm2.launcher.cli.data.write_notes",
        "import-pairs": "notellm2.launcher.cli.data.import_pairs",
        "cache-vision": "notellm2.launcher.cli.data.cache_vision",
        "note-stats": "notellm2.launcher.cli.data.note_stats",
    },
    "train": "notellm2.launcher.cli.train",
    "export": "notellm2.launcher.cli.export",
    "embed": "notellm2.launcher.cli.embed",
    "eval": "notellm2.launcher.cli.eval",
    "neighbors": "notellm2.launcher.cli.neighbors",
    "index": {
        "build": "notellm2.launcher.cli.index.build",
        "update": "notellm2.launcher.cli.index.update",
    },
    "plan": "notellm2.launcher.cli.plan",
    "analyze": "notellm2.launcher.cli.analyze",
}

GROUP_HELP = {
    "index": "a persisted search index and its related-notes table: build, update",
    "data": "data preparation: validate, import-openclipart, simulate-views, mine-pairs, import-pairs, write-shards, "
            "write-notes, cache-vision, note-stats",
}


def parse_named_dirs(specs: list[str], option: str) -> list[tuple[str, str]]:
    """`NAME=DIR` or a bare `DIR` (named by its folder) -> (name, dir), for options that take several
    runs (`eval --embeddings`, `analyze attention --model`); names must be distinct."""

    runs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise ValueError(f"{option} {spec!r}: expected name=dir or dir")
        runs.append((name, path))
    names = [n for n, _ in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{option}: run name {dup[0]!r} given twice (name them: name=dir)")
    return runs


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, values read as YAML scalars (e.g. train.max_steps=10)")


def add_export_load_args(parser: argparse.ArgumentParser) -> None:
    """The options of every verb that loads an export (docs/training.md, "What is safe to load")."""
    parser.add_argument("--trust-code", action="store_true",
                        help="import the vision plugin factory the export names even when it is not one of notellm2's "
                             "(code: only for exports from a source you trust)")
    parser.add_argument("--tower-path", default=None, metavar="DIR",
                        help="the frozen vision tower's folder, instead of the export's own location for it "
                             "(it must hold the tower files the export was written with)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.overrides)


def _add_verbs(sub, table: VerbTable, path: tuple[str, ...]) -> None:
    for verb, target in table.items():
        if isinstance(target, dict):
            group = sub.add_parser(verb, help=GROUP_HELP.get(verb, f"{verb} sub-verbs"))
            gsub = group.add_subparsers(dest=f"{'_'.join((*path, verb))}_verb", metavar=f"<{verb}-verb>")
            group.set_defaults(handler=lambda args, g=group: (g.print_help(), 2)[1])
            _add_verbs(gsub, target, (*path, verb))
            continue
        importlib.import_module(target).register(sub)
        if verb not in sub.choices:
            raise RuntimeError(f"{target}.register added no parser named {verb!r} (VERBS in notellm2.launcher.cli)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="notellm2",
        description="Train and evaluate NoteLLM-2 style multimodal note encoders for I2I recommendation.")
    parser.add_argument("--version", action="version", version=f"notellm2 {__version__} ({os.path.dirname(notellm2.__file__)})")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    _add_verbs(sub, VERBS, ())
    return parser


def _verb_words(argv: list[str]) -> str:
    """`data mine-pairs` for argv ['data', 'mine-pairs', ...]: the verb path, for error messages."""
    words, table = [], VERBS
    for word in argv:
        if not isinstance(table, dict) or word not in table:
            break
        words.append(word)
        table = table[word]
    return " ".join(words)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) or a malformed command line (2, one line printed)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "verb", None) or not hasattr(args, "handler"):
        parser.print_help()
        return 2
    returned = False
    try:
        code = int(args.handler(args) or 0)
        returned = True
        return code
    except Exception as e:  # noqa: BLE001 - only the user's mistakes are caught, the rest re-raised
        if not isinstance(e, user_error_types()):
            raise
        print(f"notellm2 {_verb_words(argv)}: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        _end_distributed(wait_for_ranks=returned)


def _end_distributed(wait_for_ranks: bool) -> None:
    """Every verb's way out (its exit code, the preemption's 75, a user error's 2, a crash) ends the rank's
    distributed state in one place, notellm2.launcher.distributed.shutdown: watchdogs, process group, gloo's worker
    threads (issue #24: a finished run aborted at interpreter exit). The ranks wait for each other only when
    the verb returned; after an error the others may never get there. A verb that never imported
    notellm2.launcher.distributed started nothing to end (and `notellm2 --help` imports no torch)."""
    distributed = sys.modules.get("notellm2.launcher.distributed")
    if distributed is not None:
        distributed.shutdown(wait_for_ranks=wait_for_ranks)


if __name__ == "__main__":
    sys.exit(main())
