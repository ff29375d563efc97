"""The project's one error type for bad input, and typed construction of config dataclasses from Hydra nodes."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

import torch

T = TypeVar("T")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A configuration or input that cannot work; the message says which key and what to change."""


def typed(cls: type[T], values: Mapping[str, Any] | None, key: str) -> T:
    """``cls(**values)`` for a config dataclass, naming ``key.<field>`` for unknown or missing fields."""
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
    return cls(**values)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
