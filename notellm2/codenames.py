"""Code named by a string (`"package.module:function"`): vision plugin factories in configs and exports,
`notellm2 train --components`. Looked up with importlib, never eval.

A vision factory named by an export is code chosen by whoever wrote the export: the serving encoder
imports one outside notellm2.modeling.plugins (`is_builtin_plugin`) only when the caller trusts it
(`trust_code`, docs/training.md "What is safe to load").

Names written before the import root existed (`modeling.plugins.efficientnet_lite:build`, in exports
and configs of format 1) still resolve: `canonical` maps the old spellings to the new ones, here and
nowhere else (`LEGACY_MODULES` lists every module that moved when the packages got rooms).
"""
from __future__ import annotations

import importlib
from typing import Callable

from notellm2.errors import UserError

# Modules that moved (old spelling, without the root -> new, without the root). Every other module of
# the three packages kept its path under the root: `modeling.vision` -> `notellm2.modeling.vision`.
LEGACY_MODULES = {
    "launcher.train": "launcher.train.train",
    "launcher.engine": "launcher.train.engine",
    "launcher.components": "launcher.train.components",
    "launcher.checkpoint": "launcher.train.checkpoint",
    "launcher.chunked": "launcher.train.chunked",
    "launcher.optim": "launcher.train.optim",
    "launcher.metrics": "launcher.train.metrics",
    "launcher.preemption": "launcher.train.preemption",
    "launcher.partitioning": "launcher.train.partitioning",
    "launcher.faults": "launcher.train.faults",
    "launcher.validation": "launcher.train.validation",
    "launcher.vision_cache": "launcher.train.vision_cache",
    "launcher.embed": "launcher.eval.embed",
    "launcher.evaluate": "launcher.eval.evaluate",
    "launcher.search": "launcher.eval.search",
    "launcher.report": "launcher.eval.report",
    "launcher.attention": "launcher.eval.attention",
    "launcher.serving": "modeling.pretrained",
    "data_shards.catalog": "data_shards.catalog.notes",
    "data_shards.openclipart": "data_shards.catalog.openclipart",
    "data_shards.synthetic": "data_shards.catalog.synthetic",
    "data_shards.mining": "data_shards.mining.mine",
    "data_shards.mining_sql": "data_shards.mining.sql",
    "data_shards.mining_duckdb": "data_shards.mining.engine_duckdb",
    "data_shards.mining_spark": "data_shards.mining.engine_spark",
    "data_shards.import_pairs": "data_shards.mining.import_pairs",
    "data_shards.pairs_file": "data_shards.mining.pairs_file",
    "data_shards.writer": "data_shards.writing.shards",
    "data_shards.note_stats": "data_shards.writing.note_stats",
    "data_shards.shard_index": "data_shards.reader.shard_index",
    "data_shards.samples": "data_shards.reader.samples",
    "data_shards.epoch_plan": "data_shards.reader.epoch_plan",
    "data_shards.pixel_slots": "data_shards.reader.pixel_slots",
    "data_shards.pair_loader": "data_shards.reader.pair_loader",
    "data_shards.notes_loader": "data_shards.reader.notes_loader",
    "data_shards.collate": "data_shards.reader.collate",
    "data_shards.workers": "data_shards.reader.workers",
}
_PACKAGES = ("launcher", "modeling", "data_shards")
BUILTIN_PLUGINS = "notellm2.modeling.plugins."  # factories shipped with notellm2: loaded without trust_code


class CodeNameError(UserError, ValueError):
    """A `module:function` string that does not name a callable."""


def canonical(module: str) -> str:
    """The module's name today: `modeling.plugins.efficientnet_lite` -> `notellm2.modeling.plugins.efficientnet_lite`,
    `launcher.components` -> `notellm2.launcher.train.components`; other names unchanged."""
    if module.split(".")[0] not in _PACKAGES:
        return module
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        moved = LEGACY_MODULES.get(".".join(parts[:n]))
        if moved:
            return "notellm2." + ".".join([moved, *parts[n:]])
    return "notellm2." + module


def is_builtin_plugin(spec: str) -> bool:
    """Whether `spec` ("module:function", old spellings included) names a factory of a module shipped under
    notellm2.modeling.plugins: code that came with notellm2, not with a data file."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        return False
    module, fn = spec.split(":")
    parts = module.split(".")
    return (all(p.isidentifier() for p in parts) and fn.isidentifier() and not fn.startswith("_")
            and canonical(module).startswith(BUILTIN_PLUGINS))


def import_code(spec: str, key: str, error: type = CodeNameError) -> Callable:
    """The callable `spec` ("package.module:function") names; `key` (the option or config key) and
    `error` (a UserError type) shape the one-line message when it does not."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise error(f"{key}: got {spec!r}; allowed: 'module:function'")
    mod_name, fn_name = spec.split(":")
    mod_name = canonical(mod_name)
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise error(f"{key}: cannot import module {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise error(f"{key}: module {mod_name!r} has no callable {fn_name!r}")
    return fn
