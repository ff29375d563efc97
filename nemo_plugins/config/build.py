"""Config dataclasses built by OmegaConf from Hydra nodes or plain mappings, and OmegaConf's and Hydra's schema
errors as one ``ConfigError`` line that names the full key path.

The schemas are the dataclasses themselves: OmegaConf rejects unknown keys, values of the wrong type and missing
mandatory values (naming ``full_key``); each dataclass's ``__post_init__`` then checks what a type cannot say.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from nemo_plugins.errors import ConfigError

T = TypeVar("T")


def _joined(prefix: str, key: str) -> str:
    return ".".join(part for part in (prefix, key) if part)


def schema_message(err: OmegaConfBaseException, prefix: str = "") -> str:
    """``<full.key>: <what is wrong>`` for an OmegaConf schema error (``prefix``: where the node sits in the run's
    config), listing the allowed keys for an unknown one."""
    key = _joined(prefix, str(err.full_key or ""))
    reason = str(err.msg).split("\n")[0] if err.msg else type(err).__name__
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(err.object_type):
        allowed = ", ".join(f.name for f in dataclasses.fields(err.object_type))
        return f"{key}: unknown key (allowed here: {allowed})"
    if isinstance(err, MissingMandatoryValue):
        return f"{key}: missing mandatory value: set {key}=<value>"
    return f"{key}: {reason}"


def build(cls: type[T], values: Mapping[str, Any] | DictConfig | None, key: str = "") -> T:
    """``cls`` from ``values`` (a Hydra node, a manifest's JSON, a dict), validated by OmegaConf against ``cls``'s
    fields; ``key`` is the node's path in the run's config, so errors name ``key.<field>``."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values or {}))
    except OmegaConfBaseException as err:
        raise ConfigError(schema_message(err, key)) from None


def _added_keys(node: DictConfig | ListConfig, path: str = "") -> Iterator[tuple[str, type]]:
    """Keys a schema does not declare, with the dataclass they were added to: Hydra's ``+key=value`` adds a key to
    a structured config without asking the schema, and OmegaConf's ``to_object`` would then drop it silently."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in keys:
        where = f"{path}[{key}]" if isinstance(node, ListConfig) else _joined(path, str(key))
        if declared is not None and key not in declared:
            yield where, schema
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # checked where it resolves to (or reported missing by to_object)
        child = node[key]
        if isinstance(child, (DictConfig, ListConfig)):
            yield from _added_keys(child, where)


def typed_config(cfg: DictConfig) -> Any:
    """A composed recipe config (typed by its root schema, ``nemo_plugins.config.schemas``) as its dataclass, every
    group built and checked once, before any model or data is touched."""
    for key, schema in _added_keys(cfg):
        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{key}: unknown key (allowed here: {allowed})")
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(schema_message(err)) from None
