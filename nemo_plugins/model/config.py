"""Typed configuration of a Mistral-family decoder (Mistral, Llama, the text part of Ministral 3).

One dataclass is the single source of truth: Hydra YAML, Hugging Face ``config.json`` and megatron's
``TransformerConfig`` are all derived from it, so a shape can never disagree between them. Its Hugging Face names
(architectures, ``config.json`` keys) are its family's bridge's (``nemo_plugins.bridges``); the bridges import this
module, so the few methods that ask them import the registry when called.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from nemo_plugins.errors import ConfigError


@dataclass
class YarnScaling:
    """YaRN rope scaling (frequency interpolation); mscale == mscale_all_dim leaves magnitudes unchanged."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ConfigError(f"rope_scaling.factor must be >= 1, got {self.factor}")
        if self.original_max_position_embeddings <= 0:
            raise ConfigError("rope_scaling.original_max_position_embeddings must be positive")


@dataclass
class MistralConfig:
    """Shape and positional settings of a Mistral-family model.

    ``head_dim`` is explicit and never derived from hidden/heads: Mistral Small 3.1 has hidden 5120 with
    32 heads of dim 128. ``attention_temperature_beta`` is Llama 4's / Ministral 3's position-based query
    scaling ``1 + beta * log(1 + floor(pos / original_max_position_embeddings))``.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: YarnScaling | None = None
    attention_temperature_beta: float | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    architecture: str = "MistralForCausalLM"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size",
                     "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
        from nemo_plugins.bridges import text_bridge

        text_bridge(self.architecture)  # a ConfigError naming the supported ones unless a bridge reads and writes it
        if self.attention_temperature_beta is not None and self.rope_scaling is None:
            raise ConfigError(
                "model.attention_temperature_beta needs model.rope_scaling (its original_max_position_embeddings "
                "sets the temperature period)"
            )

    # ----------------------------------------------------------------- derived facts
    @property
    def temperature_period(self) -> int | None:
        """Positions per attention-temperature step, or None when the temperature is off."""
        if not self.attention_temperature_beta or self.rope_scaling is None:
            return None
        return self.rope_scaling.original_max_position_embeddings

    def num_parameters(self) -> int:
        """Exact parameter count (no biases, RMSNorm weights included)."""
        q = self.num_attention_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        ffn = 3 * self.hidden_size * self.ffn_hidden_size
        per_layer = attention + ffn + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + embeddings + self.hidden_size

    def check_parallel(self, tensor_parallel: int, pipeline_parallel: int = 1) -> None:
        """Raise ConfigError unless the shapes split evenly over the requested parallel layout."""
        splits = {
            "model.num_attention_heads": self.num_attention_heads,
            "model.num_kv_heads": self.num_kv_heads,
            "model.ffn_hidden_size": self.ffn_hidden_size,
            "model.vocab_size": self.vocab_size,
        }
        for key, value in splits.items():
            if value % tensor_parallel:
                raise ConfigError(
                    f"parallel.tp={tensor_parallel} does not divide {key}={value}; choose a tp that divides it"
                )
        if self.num_layers % pipeline_parallel:
            raise ConfigError(
                f"parallel.pp={pipeline_parallel} does not divide model.num_layers={self.num_layers}"
            )

    def llama_shaped(self) -> bool:
        """Whether hidden_size == heads x head_dim: Llama configs derive head_dim from hidden / heads (transformers'
        LlamaConfig refuses a hidden size that is not a multiple of the heads), Mistral ones take it explicitly."""
        return self.hidden_size == self.num_attention_heads * self.head_dim

    def replace(self, **changes: Any) -> "MistralConfig":
        """A copy with ``changes``, under the architecture its bridge can export that shape as (a Llama model
        reshaped to a hidden size other than heads x head_dim becomes ``MistralForCausalLM``, the same maths here,
        so that its HF export loads in transformers). An explicit ``architecture`` change is kept as given."""
        from nemo_plugins.bridges import text_bridge

        changed = dataclasses.replace(self, **changes)
        if "architecture" in changes:
            return changed
        exportable = text_bridge(changed.architecture).exportable_architecture(changed)
        return dataclasses.replace(changed, architecture=exportable)

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], key: str = "model.architecture") -> "MistralConfig":
        """Build from a plain mapping (Hydra node, manifest JSON), validated by OmegaConf against the fields: an
        unknown key or a value of the wrong type is a ConfigError naming ``key.<field>``."""
        from nemo_plugins.config.build import build

        return build(cls, values, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
