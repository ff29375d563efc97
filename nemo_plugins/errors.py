"""The project's one error type for bad input, and typed construction of config dataclasses from Hydra nodes."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

import torch

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration or input that cannot work; the message says which key and what to change."""


def _dataclass_of(annotation) -> type | None:
    """The config dataclass a field holds (``Settings`` or ``Settings | None``), else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        found = [a for a in typing.get_args(annotation) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def typed(cls: type[T], values: Mapping[str, Any] | None, key: str) -> T:
    """``cls(**values)`` for a config dataclass, naming ``key.<field>`` for unknown or missing fields; fields that
    are config dataclasses themselves are built the same way from their mapping (null stays None)."""
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
    return cls(**values)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


class CheckpointError(ValueError):
    """An unreadable or inconsistent checkpoint: a damaged or missing file, or pickled code where data belongs."""
