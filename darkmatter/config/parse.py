"""YAML-shaped data to typed config and back: unknown keys, wrong types and renamed keys fail by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or impossible."""


def to_dict(obj: Any) -> Any:
    """Dataclasses → dicts, tuples → lists, recursively (JSON/YAML-able)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def stable_hash(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string", type(None): "null"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{where}: key '{key}' must be {_type_name(tp)}, got {value!r}.")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, key, where)
            except ConfigError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(v, item, f"{key}[{i}]", where) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, where, prefix=f"{key}.")
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{where}: key '{key}' has an unsupported type {tp!r}.")


# keys of earlier versions -> their replacement, for a helpful error instead of "unknown key"
RENAMED = {"harvest.autocast_bf16": "harvest.precision (auto, float32 or bfloat16)",
           "training.autocast_bf16": "training.precision (auto, float32 or bfloat16)",
           "analysis.ce_contexts": "downstream.contexts"}


def from_dict(cls: type, data: dict[str, Any], where: str = "config", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if f"{prefix}{key}" in RENAMED and key not in names:
            raise ConfigError(f"{where}: key '{prefix}{key}' was replaced by {RENAMED[prefix + key]}.")
        if key not in names:
            raise ConfigError(
                f"{where}: unknown key '{prefix}{key}'; expected one of {', '.join(sorted(names))}."
            )
    kwargs = {k: _convert(v, hints[k], prefix + k, where) for k, v in data.items()}
    return cls(**kwargs)


class ConfigSlice:
    """The keys of one config section that a step received, validated and typed like the full section.

    Reading a key the step was not given raises: it would otherwise silently be the dataclass default rather than
    the experiment's value (add the key to :data:`STEP_KEYS` instead).
    """

    def __init__(self, cls: type, data: dict[str, Any], where: str):
        self._where, self._keys = where, frozenset(data)
        self._cfg = from_dict(cls, data, where)

    def whole(self) -> Any:
        """The typed section itself, when the step was given every one of its keys (e.g. to hash it)."""
        missing = {f.name for f in dataclasses.fields(self._cfg)} - self._keys
        if missing:
            raise ConfigError(f"{self._where}: the step was not given keys {sorted(missing)}; add them to "
                              "darkmatter.config.steps.STEP_KEYS.")
        return self._cfg

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._keys:
            raise ConfigError(f"{self._where}: the step was not given key '{name}'; add it to "
                              "darkmatter.config.steps.STEP_KEYS.")
        return getattr(self._cfg, name)
