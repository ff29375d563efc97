"""Hugging Face bridges, one per model family, registered by HF architecture name.

A family's module (``mistral``: Mistral / Llama / Ministral3 text models; ``mistral3``: the Mistral3 multimodal
models) is the one place that knows its Hugging Face and GGUF names: ``config.json`` <-> ``MistralConfig``, the
HF <-> megatron parameter table, where tensors are stored. The conversion machinery in ``nemo_plugins.convert``
asks the registry here for the bridge of a checkpoint's architecture and never spells a name itself, so a new
family is one new module and one line below (as Megatron-Bridge registers its bridges).
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_plugins.bridges.mistral import MISTRAL, MistralBridge
from nemo_plugins.bridges.mistral3 import Mistral3Bridge
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

MISTRAL3 = Mistral3Bridge(text=MISTRAL)
# HF architecture -> bridge: text models (CausalLM), and multimodal ones whose text model is a text family's
TEXT: dict[str, MistralBridge] = {architecture: MISTRAL for architecture in MISTRAL.architectures}
MULTIMODAL: dict[str, Mistral3Bridge] = {architecture: MISTRAL3 for architecture in MISTRAL3.architectures}
BRIDGES: dict[str, MistralBridge | Mistral3Bridge] = {**TEXT, **MULTIMODAL}
GGUF: dict[str, MistralBridge] = {MISTRAL.gguf_architecture: MISTRAL}  # GGUF ``general.architecture`` -> bridge


def supported() -> list[str]:
    """Every HF architecture a bridge is registered for."""
    return sorted(BRIDGES)


def bridge_for(hf: Mapping[str, Any]) -> MistralBridge | Mistral3Bridge:
    """The bridge of a ``config.json``: that of the first of its ``architectures`` registered here."""
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in BRIDGES:
            return BRIDGES[architecture]
    raise ConfigError(f"unsupported architecture {architectures or hf.get('model_type')!r} in config.json; "
                      f"supported: {supported()}")


def multimodal_bridge(hf: Mapping[str, Any]) -> Mistral3Bridge | None:
    """The bridge of a ``config.json`` declaring a multimodal architecture, or None (a text model's)."""
    return next((MULTIMODAL[a] for a in hf.get("architectures") or [] if a in MULTIMODAL), None)


def text_bridge(architecture: str, key: str = "model.architecture") -> MistralBridge:
    """The bridge of a text architecture (``MistralConfig.architecture``); ``key`` names the setting that chose it."""
    if architecture not in TEXT:
        raise ConfigError(f"{key}={architecture!r} is not one of {sorted(TEXT)}")
    return TEXT[architecture]


def gguf_bridge(architecture: Any, where: str) -> MistralBridge:
    """The bridge of a GGUF file's ``general.architecture``."""
    if architecture not in GGUF:
        raise ConfigError(f"{where}: GGUF architecture {architecture!r} is not supported (supported: {sorted(GGUF)})")
    return GGUF[architecture]


def config_from_hf(hf: Mapping[str, Any]) -> MistralConfig:
    """The text model's config of a ``config.json`` (a multimodal checkpoint's ``text_config``)."""
    return bridge_for(hf).text_config(hf)


def config_to_hf(config: MistralConfig) -> dict[str, Any]:
    """The ``config.json`` transformers loads into ``config.architecture``'s *ForCausalLM class."""
    return text_bridge(config.architecture).config_to_hf(config)
