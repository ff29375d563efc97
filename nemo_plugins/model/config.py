"""Typed configuration of a Mistral-family decoder (Mistral, Llama, the text part of Ministral 3).

One dataclass is the single source of truth: Hydra YAML, Hugging Face ``config.json`` and megatron's
``TransformerConfig`` are all derived from it, so a shape can never disagree between them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from nemo_plugins.errors import ConfigError, typed

# HF text architectures we read and write (-> their ``model_type``); all share the same tensor layout.
HF_ARCHITECTURES = {
    "MistralForCausalLM": "mistral",
    "LlamaForCausalLM": "llama",
    "Ministral3ForCausalLM": "ministral3",
}
# Vision-language checkpoints whose text model we read from ``text_config`` (Mistral Small 3.1, Ministral 3).
MULTIMODAL_ARCHITECTURES = ("Mistral3ForConditionalGeneration",)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
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
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "head_dim", "ffn_hidden_size", "vocab_size"):
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
        if self.architecture not in HF_ARCHITECTURES:
            raise ConfigError(f"model.architecture={self.architecture!r} is not one of {sorted(HF_ARCHITECTURES)}")
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
        """A copy with ``changes``; a Llama model reshaped to a hidden size other than heads x head_dim (a pruned
        SmolLM2 child, hidden 384 with 9 heads of 64) becomes ``MistralForCausalLM``, the same maths here (no
        biases, no sliding window, same RoPE, tied or not) under a config that carries head_dim, so that its HF
        export loads in transformers. An explicit ``architecture`` change is kept as given."""
        changed = dataclasses.replace(self, **changes)
        if "architecture" not in changes and changed.architecture == "LlamaForCausalLM" and not changed.llama_shaped():
            return dataclasses.replace(changed, architecture="MistralForCausalLM")
        return changed

    # ----------------------------------------------------------------- (de)serialisation
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], key: str = "model.architecture") -> "MistralConfig":
        """Build from a plain mapping (Hydra node, manifest JSON); unknown keys are an error naming them."""
        values = dict(values)
        scaling = values.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, YarnScaling):
            values["rope_scaling"] = typed(YarnScaling, scaling, f"{key}.rope_scaling")
        return typed(cls, values, key)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "MistralConfig":
        """Read a Hugging Face ``config.json`` (Mistral, Llama, Ministral3 text, or Mistral3's text_config)."""
        hf = cls._text_model(hf)
        architectures = hf.get("architectures") or []
        architecture = next((a for a in architectures if a in HF_ARCHITECTURES), None)
        if architecture is None:
            raise ConfigError(
                f"unsupported architecture {architectures or hf.get('model_type')!r} in config.json; "
                f"supported: {sorted(HF_ARCHITECTURES)}"
            )
        for unsupported in ("attention_bias", "mlp_bias"):
            if hf.get(unsupported):
                raise ConfigError(f"config.json sets {unsupported}=true; Mistral-family models here have no biases")
        if hf.get("sliding_window"):
            raise ConfigError("config.json sets sliding_window; sliding-window attention is not supported")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {rope_type!r} is not supported (default or yarn)")
        scaling = None
        if rope_type == "yarn":
            scaling = YarnScaling(
                factor=float(rope["factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                beta_fast=float(rope.get("beta_fast") or 32.0),
                beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=float(rope.get("mscale") or 1.0),
                mscale_all_dim=float(rope.get("mscale_all_dim") or 1.0),
                truncate=bool(rope.get("truncate", True)),
            )
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = int(hf["num_attention_heads"])
        return cls(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            num_attention_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn_hidden_size=int(hf["intermediate_size"]),
            vocab_size=int(hf["vocab_size"]),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            attention_temperature_beta=rope.get("llama_4_scaling_beta"),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
            architecture=architecture,
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=eos[0] if isinstance(eos := hf.get("eos_token_id", 2), list) else eos,
        )

    @staticmethod
    def _text_model(hf: Mapping[str, Any]) -> Mapping[str, Any]:
        """The text model's config of a Mistral3ForConditionalGeneration (plain configs pass through).

        Its architecture follows ``text_config.model_type``: Mistral Small 3.1 24B is ``mistral`` (a plain Mistral,
        rope_theta 1e9, no YaRN), the Ministral 3 children are ``ministral3`` (YaRN + ``llama_4_scaling_beta``).
        Tying comes from ``text_config.tie_word_embeddings`` (default False), never the outer flag: transformers
        5.x defaults the outer one to True, which would discard the 24B's real ``lm_head``.
        """
        if not any(a in MULTIMODAL_ARCHITECTURES for a in hf.get("architectures") or []):
            return hf
        text = dict(hf.get("text_config") or {})
        if not text:
            raise ConfigError("config.json declares Mistral3ForConditionalGeneration but has no text_config")
        model_type = text.get("model_type", "mistral")
        by_type = {t: a for a, t in HF_ARCHITECTURES.items()}
        if model_type not in by_type:
            raise ConfigError(f"text_config.model_type={model_type!r} is not one of {sorted(by_type)}")
        for key in ("bos_token_id", "eos_token_id"):
            if key not in text and key in hf:
                text[key] = hf[key]
        return {**text, "architectures": [by_type[model_type]], "tie_word_embeddings": text.get("tie_word_embeddings", False)}

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` that transformers loads into the matching *ForCausalLM class."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope = {
                "rope_type": "yarn",
                "type": "yarn",
                "rope_theta": self.rope_theta,
                "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow,
                "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim,
                "truncate": s.truncate,
            }
            if self.attention_temperature_beta is not None:
                rope["llama_4_scaling_beta"] = self.attention_temperature_beta
        if self.attention_temperature_beta is not None and self.architecture != "Ministral3ForCausalLM":
            raise ConfigError(
                "attention_temperature_beta is only representable by the Ministral3ForCausalLM architecture; "
                "set model.architecture=Ministral3ForCausalLM"
            )
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": HF_ARCHITECTURES[self.architecture],
            "num_hidden_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_hidden_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "rope_theta": self.rope_theta,
            "torch_dtype": "float32",
        }
        if self.architecture == "Ministral3ForCausalLM":
            hf["rope_parameters"] = rope
        elif self.rope_scaling is not None:
            hf["rope_scaling"] = rope
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = None
        return hf
