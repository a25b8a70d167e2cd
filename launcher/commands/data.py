"""`notellm2 data <sub-verb>`: catalog validation, co-occurrence mining, shard writing.

Sub-verbs are discovered from `launcher/data_cmds/`: each module defines `register(subparsers)`.
"""
from __future__ import annotations

import importlib
import pkgutil


def register(sub) -> None:
    import launcher.data_cmds as data_cmds

    modules = [importlib.import_module(f"launcher.data_cmds.{m.name}")
               for m in sorted(pkgutil.iter_modules(data_cmds.__path__), key=lambda m: m.name)]
    modules = [m for m in modules if hasattr(m, "register")]
    if not modules:
        return
    p = sub.add_parser("data", help="data preparation: validate, mine-pairs, write-shards")
    dsub = p.add_subparsers(dest="data_verb", metavar="<data-verb>")
    for m in modules:
        m.register(dsub)
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])
