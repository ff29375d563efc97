"""Context extension for the long-context stage: YaRN frequency scaling + position-based attention temperature.

Neither changes a weight's shape: the student of the short stage is loaded as is into the extended config.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig, YarnScaling


@dataclass
class ContextExtension:
    """``original_context`` (the short stage's length) x ``yarn_factor`` = the new maximum context."""

    original_context: int
    yarn_factor: float
    attention_temperature_beta: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self) -> None:
        if self.original_context < 1 or self.yarn_factor <= 1.0:
            raise ConfigError(f"context: need original_context >= 1 and yarn_factor > 1, got "
                              f"{self.original_context} and {self.yarn_factor}")

    @property
    def max_context(self) -> int:
        return int(self.original_context * self.yarn_factor)

    def apply(self, config: MistralConfig) -> MistralConfig:
        if config.rope_scaling is not None:
            raise ConfigError("this student already has rope_scaling: the long-context stage extends a short-context "
                              "checkpoint (the output of distill_short), not an already extended one")
        # the attention temperature exists in Hugging Face only as Ministral 3's llama_4_scaling_beta
        architecture = "Ministral3ForCausalLM" if self.attention_temperature_beta else config.architecture
        return config.replace(
            architecture=architecture,
            rope_scaling=YarnScaling(factor=self.yarn_factor, original_max_position_embeddings=self.original_context,
                                     beta_fast=self.beta_fast, beta_slow=self.beta_slow),
            attention_temperature_beta=self.attention_temperature_beta,
            max_position_embeddings=max(self.max_context, config.max_position_embeddings),
        )
