"""The config schema's validator: a dataclass tree filled from plain data (YAML, an export's JSON).

Every error names the dotted key, the value and what is allowed. Field metadata understood here:
``check`` (a callable ``value -> bool``) and ``allowed`` (a text saying what passes it). The run
schema (`notellm2.launcher.config`) and the serving encoder's (`notellm2.modeling.pretrained`) both
build through `build_dataclass`; this module imports nothing of the three packages.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from notellm2.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key, type or value that the schema does not allow."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp, path: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `path`."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{path}: got {value!r} ({type(value).__name__}); allowed: {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return build_dataclass(tp, value, path)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad
        return [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{path}: unsupported schema type {tp}")


def build_dataclass(cls, data: dict, prefix: str = ""):
    """An instance of the dataclass `cls` from a mapping: unknown keys, wrong types and failed checks
    raise ConfigError naming the dotted key, the value and what is allowed."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        path = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = _convert(data[name], hints[name], path)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        check = f.metadata.get("check")
        if check is not None and value is not None and not check(value):
            raise ConfigError(f"{path}: got {value!r}; allowed: {f.metadata.get('allowed', 'see the schema')}")
        kwargs[name] = value
    return cls(**kwargs)
