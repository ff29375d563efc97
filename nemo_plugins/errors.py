"""The project's error types (each printed by the recipes as one line, exit code 2), and typed construction of
config dataclasses from Hydra nodes (every value checked against its field's type, named by its key path)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

import torch

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProjectError(Exception):
    """An error the user can fix from its message alone: the recipes print it as one line, without a traceback."""


class ConfigError(ProjectError, ValueError):
    """A configuration or input that cannot work; the message says which key and what to change."""


class DataError(ProjectError, ValueError):
    """Data on disk that cannot serve the run: exhausted, truncated, unparsable, or written for other data."""


class ResourceError(ProjectError, RuntimeError):
    """The machine refuses what the run needs: no disk space, an output folder in use by another run."""


class NonFiniteError(ProjectError, RuntimeError):
    """A NaN/inf where a number must be finite (weights, a loss, a perplexity)."""


def _dataclass_of(annotation) -> type | None:
    """The config dataclass a field holds (``Settings`` or ``Settings | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


class _Mismatch(Exception):
    """A value that does not fit a type hint (internal to ``_conform``)."""


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        return " or ".join(_describe(a) for a in args)
    if origin in (list, tuple):
        return f"a list (each {_describe(args[0])})" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return "a mapping of settings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _conform(value, hint):
    """``value`` as ``hint`` wants it (an integer where a float is expected becomes a float), or ``_Mismatch``.
    Hints this does not know (``Any``, plain classes) accept the value unchanged."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        for arg in args:
            try:
                return _conform(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        return type(value)(_conform(v, item) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


def checked(value, hint, key: str):
    """``value`` if it fits the type ``hint`` (an integer where a float is expected becomes a float), else a
    ``ConfigError`` naming ``key``: for top-level keys that are not part of a config dataclass."""
    try:
        return _conform(value, hint)
    except _Mismatch:
        raise ConfigError(f"{key}={value!r} must be {_describe(hint)}") from None


def typed(cls: type[T], values: Mapping[str, Any] | None, key: str) -> T:
    """``cls(**values)`` for a config dataclass, naming ``key.<field>`` for unknown or missing fields and for a
    value of the wrong type (``parallel.tp='two' must be an integer``); fields that are config dataclasses
    themselves are built the same way from their mapping (null stays None)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {[f'{key}.{u}' for u in unknown]}; allowed: {sorted(fields)}")
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing key(s) {[f'{key}.{m}' for m in missing]}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        nested = _dataclass_of(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            values[name] = typed(nested, value, f"{key}.{name}")
        elif name in hints:
            values[name] = checked(value, hints[name], f"{key}.{name}")
    return cls(**values)


def typed_stage(cls: type[T], node: Any, key: str) -> T:
    """A training stage's settings from its Hydra node (``typed``); its ``name`` defaults to the node's last key
    (``stage.distill_short`` -> ``distill_short``), which names its outputs and metrics."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    return typed(cls, {**values, "name": values.get("name") or key.rsplit(".", 1)[-1]}, key)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


class CheckpointError(ProjectError, ValueError):
    """An unreadable or inconsistent checkpoint: a damaged or missing file, or pickled code where data belongs."""
