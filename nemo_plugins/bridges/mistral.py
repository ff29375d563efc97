"""The Hugging Face bridge of the Mistral text family: Mistral, Llama and Ministral3 (Ministral 3's text model).

The three architectures share one tensor layout (no biases, no sliding window, RoPE, SwiGLU), so one bridge
serves them. Every name the family has outside megatron is here: the ``config.json`` keys (read into and written
from ``MistralConfig``), the HF <-> megatron parameter table and the HF tensor shapes, and the GGUF (llama.cpp)
tensor and metadata names. What uses them (fusing q/k/v and gate/up, TP slicing, readers and writers) is generic
and lives in ``nemo_plugins.convert``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from nemo_plugins.bridges.param_mapping import ParamMapping
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig, YarnScaling

# HF architecture -> its config.json ``model_type``
ARCHITECTURES = {
    "MistralForCausalLM": "mistral",
    "LlamaForCausalLM": "llama",
    "Ministral3ForCausalLM": "ministral3",
}

MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), (("vocab", "hidden"),),
                 split="column"),
    ParamMapping("decoder.layers.{layer}.input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",),
                 (("hidden",),)),
    ParamMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        (
            "model.layers.{layer}.self_attn.q_proj.weight",
            "model.layers.{layer}.self_attn.k_proj.weight",
            "model.layers.{layer}.self_attn.v_proj.weight",
        ),
        (("q", "hidden"), ("kv", "hidden"), ("kv", "hidden")),
        fusion="qkv",
        split="column",
    ),
    ParamMapping("decoder.layers.{layer}.self_attention.linear_proj.weight",
                 ("model.layers.{layer}.self_attn.o_proj.weight",), (("hidden", "q"),), split="row"),
    ParamMapping("decoder.layers.{layer}.pre_mlp_layernorm.weight",
                 ("model.layers.{layer}.post_attention_layernorm.weight",), (("hidden",),)),
    ParamMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.weight",
        ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
        (("ffn", "hidden"), ("ffn", "hidden")),
        fusion="gated",
        split="column",
    ),
    ParamMapping("decoder.layers.{layer}.mlp.linear_fc2.weight", ("model.layers.{layer}.mlp.down_proj.weight",),
                 (("hidden", "ffn"),), split="row"),
    ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",), (("hidden",),)),
    ParamMapping("output_layer.weight", ("lm_head.weight",), (("vocab", "hidden"),), split="column",
                 untied_only=True),
)

# llama.cpp's names: whole-model tensors, and per block ``blk.<layer>.<name>.<weight|bias>``
GGUF_ARCHITECTURE = "llama"
GGUF_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

GgufField = Callable[..., Any]  # (key, default=None) -> the metadata value


class MistralBridge:
    """HF config and tensor names of Mistral / Llama / Ministral3 text models."""

    architectures = ARCHITECTURES
    mappings = MAPPINGS
    gguf_architecture = GGUF_ARCHITECTURE

    # ------------------------------------------------------------------------------------- config.json
    def text_config(self, hf: Mapping[str, Any]) -> MistralConfig:
        """Read a ``config.json`` whose ``architectures`` names one of ours (the registry checked that)."""
        architecture = next(a for a in hf.get("architectures") or [] if a in self.architectures)
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
        eos = hf.get("eos_token_id", 2)
        return MistralConfig(
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
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

    def config_to_hf(self, config: MistralConfig) -> dict[str, Any]:
        """A ``config.json`` that transformers loads into the matching *ForCausalLM class."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
        if config.rope_scaling is not None:
            s = config.rope_scaling
            rope = {
                "rope_type": "yarn",
                "type": "yarn",
                "rope_theta": config.rope_theta,
                "factor": s.factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
                "beta_fast": s.beta_fast,
                "beta_slow": s.beta_slow,
                "mscale": s.mscale,
                "mscale_all_dim": s.mscale_all_dim,
                "truncate": s.truncate,
            }
            if config.attention_temperature_beta is not None:
                rope["llama_4_scaling_beta"] = config.attention_temperature_beta
        if config.attention_temperature_beta is not None and config.architecture != "Ministral3ForCausalLM":
            raise ConfigError(
                "attention_temperature_beta is only representable by the Ministral3ForCausalLM architecture; "
                "set model.architecture=Ministral3ForCausalLM"
            )
        hf: dict[str, Any] = {
            "architectures": [config.architecture],
            "model_type": self.architectures[config.architecture],
            "num_hidden_layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_kv_heads,
            "head_dim": config.head_dim,
            "intermediate_size": config.ffn_hidden_size,
            "vocab_size": config.vocab_size,
            "rms_norm_eps": config.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": config.tie_embeddings,
            "max_position_embeddings": config.max_position_embeddings,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "rope_theta": config.rope_theta,
            "torch_dtype": "float32",
        }
        if config.architecture == "Ministral3ForCausalLM":
            hf["rope_parameters"] = rope
        elif config.rope_scaling is not None:
            hf["rope_scaling"] = rope
        if config.architecture == "MistralForCausalLM":
            hf["sliding_window"] = None
        return hf

    def exportable_architecture(self, config: MistralConfig) -> str:
        """The architecture ``config`` can be exported as: a Llama model reshaped to a hidden size other than
        heads x head_dim (a pruned SmolLM2 child, hidden 384 with 9 heads of 64) becomes ``MistralForCausalLM``
        (transformers' LlamaConfig derives head_dim from hidden / heads; Mistral's carries it), the same maths."""
        if config.architecture == "LlamaForCausalLM" and not config.llama_shaped():
            return "MistralForCausalLM"
        return config.architecture

    # ------------------------------------------------------------------------------------- tensors
    def text_tensor_name(self, stored: str) -> str:
        """A CausalLM directory stores its tensors under their own names."""
        return stored

    def dims(self, config: MistralConfig) -> dict[str, int]:
        """The sizes of the dimension names ``MAPPINGS`` gives its tensors' shapes in."""
        return {"vocab": config.vocab_size, "hidden": config.hidden_size, "ffn": config.ffn_hidden_size,
                "q": config.num_attention_heads * config.head_dim, "kv": config.num_kv_heads * config.head_dim}

    # ------------------------------------------------------------------------------------- GGUF
    def gguf_tensor_name(self, gguf_name: str) -> str:
        """The HF name of a llama.cpp tensor."""
        if gguf_name in GGUF_TENSORS:
            return GGUF_TENSORS[gguf_name]
        parts = gguf_name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in GGUF_LAYER_TENSORS:
            return f"model.layers.{parts[1]}.{GGUF_LAYER_TENSORS[parts[2]]}.{parts[3]}"
        raise ConfigError(f"unexpected tensor {gguf_name!r} in GGUF file")

    def gguf_config(self, field: GgufField, tensor_names: set[str]) -> MistralConfig:
        """The config from a llama GGUF file's metadata (``field(key, default)``) and its tensor names."""
        heads = int(field("llama.attention.head_count"))
        hidden = int(field("llama.embedding_length"))
        return MistralConfig(
            num_layers=int(field("llama.block_count")),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_kv_heads=int(field("llama.attention.head_count_kv", heads)),
            head_dim=int(field("llama.rope.dimension_count", hidden // heads)),
            ffn_hidden_size=int(field("llama.feed_forward_length")),
            vocab_size=int(field("llama.vocab_size", len(field("tokenizer.ggml.tokens", [])))),
            rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(field("llama.rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in tensor_names,
            max_position_embeddings=int(field("llama.context_length", 8192)),
            architecture="LlamaForCausalLM",
            bos_token_id=field("tokenizer.ggml.bos_token_id"),
            eos_token_id=field("tokenizer.ggml.eos_token_id"),
        )

    def gguf_rotary_heads(self, name: str, config: MistralConfig) -> int | None:
        """How many heads llama.cpp permuted the rows of the HF tensor ``name`` by (q and k), else None."""
        if name.endswith("q_proj.weight"):
            return config.num_attention_heads
        if name.endswith("k_proj.weight"):
            return config.num_kv_heads
        return None


MISTRAL = MistralBridge()
