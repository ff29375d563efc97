"""Compose a recipe's config as its entry point does (Hydra over the registered schemas), typed: what tests hand to
a recipe's ``run`` or read settings from."""

from __future__ import annotations

from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from nemo_plugins.config.build import typed_config
from nemo_plugins.config.schemas import register_schemas
from recipes._entry import CONF_DIR, composition_error


def composed(name: str, *overrides: str) -> Any:
    """``conf/<name>.yaml`` with ``overrides``, as the typed root config of its recipe; a composition error is the
    one-line ConfigError the entry point prints."""
    register_schemas()
    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return typed_config(compose(name, overrides=list(overrides)))
    except (HydraException, OmegaConfBaseException) as err:
        raise composition_error(err) from None
