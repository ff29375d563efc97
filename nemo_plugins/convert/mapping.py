"""Declarative Hugging Face <-> megatron-core parameter mapping for Mistral-family decoders.

Conversion is data: a table of ``ParamMapping`` rows. Each row knows
* its names on both sides (``{layer}`` is the global layer index),
* how to fuse/unfuse (``direct``, ``qkv`` for megatron's grouped-query fused layout, ``gated`` for
  SwiGLU's ``linear_fc1 = [gate; up]``),
* how megatron splits it over tensor-parallel ranks (``replicated``, ``column`` = dim 0, ``row`` = dim 1).
The full (TP=1) megatron tensor is built first, then sliced per rank, so fusion and sharding never mix.
``qkv`` and ``gated`` tensors are split by *group* so that each rank holds whole query groups and
matching gate/up halves, exactly as megatron's ColumnParallelLinear expects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

Fusion = Literal["direct", "qkv", "gated"]
Split = Literal["replicated", "column", "row"]

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear.
TE_NAME_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


@dataclass(frozen=True)
class ParamMapping:
    megatron: str
    hf: tuple[str, ...]
    fusion: Fusion = "direct"
    split: Split = "replicated"
    untied_only: bool = False

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.megatron


MISTRAL_MAPPINGS: tuple[ParamMapping, ...] = (
    ParamMapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), split="column"),
    ParamMapping("decoder.layers.{layer}.input_layernorm.weight", ("model.layers.{layer}.input_layernorm.weight",)),
    ParamMapping(
        "decoder.layers.{layer}.self_attention.linear_qkv.weight",
        (
            "model.layers.{layer}.self_attn.q_proj.weight",
            "model.layers.{layer}.self_attn.k_proj.weight",
            "model.layers.{layer}.self_attn.v_proj.weight",
        ),
        fusion="qkv",
        split="column",
    ),
    ParamMapping(
        "decoder.layers.{layer}.self_attention.linear_proj.weight",
        ("model.layers.{layer}.self_attn.o_proj.weight",),
        split="row",
    ),
    ParamMapping(
        "decoder.layers.{layer}.pre_mlp_layernorm.weight",
        ("model.layers.{layer}.post_attention_layernorm.weight",),
    ),
    ParamMapping(
        "decoder.layers.{layer}.mlp.linear_fc1.weight",
        ("model.layers.{layer}.mlp.gate_proj.weight", "model.layers.{layer}.mlp.up_proj.weight"),
        fusion="gated",
        split="column",
    ),
    ParamMapping("decoder.layers.{layer}.mlp.linear_fc2.weight", ("model.layers.{layer}.mlp.down_proj.weight",), split="row"),
    ParamMapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    ParamMapping("output_layer.weight", ("lm_head.weight",), split="column", untied_only=True),
)


def active_mappings(config: MistralConfig) -> list[ParamMapping]:
    return [m for m in MISTRAL_MAPPINGS if not (m.untied_only and config.tie_embeddings)]


# ---------------------------------------------------------------------------------------- fusion
def _fuse(mapping: ParamMapping, tensors: list[torch.Tensor], config: MistralConfig) -> torch.Tensor:
    if mapping.fusion == "direct":
        return tensors[0]
    if mapping.fusion == "gated":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    groups, d = config.num_kv_heads, config.head_dim
    heads_per_group = config.num_attention_heads // groups
    hidden = q.shape[1]
    q = q.reshape(groups, heads_per_group * d, hidden)
    k = k.reshape(groups, d, hidden)
    v = v.reshape(groups, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def _unfuse(mapping: ParamMapping, fused: torch.Tensor, config: MistralConfig) -> list[torch.Tensor]:
    if mapping.fusion == "direct":
        return [fused]
    if mapping.fusion == "gated":
        return list(torch.chunk(fused, 2, dim=0))
    groups, d = config.num_kv_heads, config.head_dim
    heads_per_group = config.num_attention_heads // groups
    grouped = fused.reshape(groups, (heads_per_group + 2) * d, -1)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    hidden = fused.shape[1]
    return [t.reshape(-1, hidden) for t in (q, k, v)]


# ---------------------------------------------------------------------------------------- TP sharding
def shard(mapping: ParamMapping, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """The slice of a full megatron tensor held by one tensor-parallel rank."""
    if mapping.split == "replicated" or tp_size == 1:
        return full
    if mapping.split == "row":
        return torch.chunk(full, tp_size, dim=1)[tp_rank]
    if mapping.fusion == "gated":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, tp_size)[tp_rank], torch.chunk(up, tp_size)[tp_rank]])
    # column: whole query groups (qkv) / whole vocab rows stay contiguous per rank
    return torch.chunk(full, tp_size, dim=0)[tp_rank]


def unshard(mapping: ParamMapping, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``shard`` given every rank's slice, in rank order."""
    if mapping.split == "replicated" or len(shards) == 1:
        return shards[0]
    if mapping.split == "row":
        return torch.cat(shards, dim=1)
    if mapping.fusion == "gated":
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=0)


# ---------------------------------------------------------------------------------------- names
def megatron_name(mapping: ParamMapping, layer: int | None, te_names: bool = False) -> str:
    name = mapping.megatron.format(layer=layer) if mapping.per_layer else mapping.megatron
    if te_names:
        for local, te in TE_NAME_ALIASES.items():
            if name.endswith(local):
                return name[: -len(local)] + te
    return name


def hf_names(mapping: ParamMapping, layer: int | None) -> list[str]:
    return [n.format(layer=layer) if mapping.per_layer else n for n in mapping.hf]


def _expected_hf_shape(name: str, config: MistralConfig) -> tuple[int, ...]:
    h, d = config.hidden_size, config.head_dim
    table = {
        r"embed_tokens|lm_head": (config.vocab_size, h),
        r"layernorm|model\.norm": (h,),
        r"q_proj": (config.num_attention_heads * d, h),
        r"[kv]_proj": (config.num_kv_heads * d, h),
        r"o_proj": (h, config.num_attention_heads * d),
        r"gate_proj|up_proj": (config.ffn_hidden_size, h),
        r"down_proj": (h, config.ffn_hidden_size),
    }
    for pattern, shape in table.items():
        if re.search(pattern, name):
            return shape
    raise KeyError(name)


# ---------------------------------------------------------------------------------------- whole models
def hf_to_megatron(
    hf_state: dict[str, torch.Tensor],
    config: MistralConfig,
    layers: range | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    te_names: bool = False,
    first_stage: bool = True,
    last_stage: bool = True,
) -> dict[str, torch.Tensor]:
    """Megatron state dict of one (TP rank, pipeline stage) from HF tensors; layers are renumbered locally.

    Raises ConfigError naming the tensor when one is missing or has the wrong shape.
    """
    layers = range(config.num_layers) if layers is None else layers
    out: dict[str, torch.Tensor] = {}
    for mapping in active_mappings(config):
        if mapping.per_layer:
            targets = [(layer, local) for local, layer in enumerate(layers)]
        elif mapping.megatron.startswith("embedding"):
            targets = [(None, None)] if first_stage else []
        else:
            targets = [(None, None)] if last_stage else []
        for layer, local in targets:
            sources = []
            for name in hf_names(mapping, layer):
                if name not in hf_state:
                    raise ConfigError(f"checkpoint is missing tensor {name!r} required by the model config")
                tensor = hf_state[name]
                expected = _expected_hf_shape(name, config)
                if tuple(tensor.shape) != expected:
                    raise ConfigError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)} but the config expects {expected}"
                    )
                sources.append(tensor)
            full = _fuse(mapping, sources, config)
            out[megatron_name(mapping, local, te_names)] = shard(mapping, full, tp_rank, tp_size).contiguous()
    return out


def megatron_to_hf(
    per_rank_states: list[dict[str, torch.Tensor]],
    config: MistralConfig,
    te_names: bool = False,
) -> dict[str, torch.Tensor]:
    """HF tensors from the TP shards of a full-depth megatron state (global layer numbering), rank order."""
    out: dict[str, torch.Tensor] = {}
    for mapping in active_mappings(config):
        layers = range(config.num_layers) if mapping.per_layer else [None]
        for layer in layers:
            name = megatron_name(mapping, layer, te_names)
            missing = [i for i, s in enumerate(per_rank_states) if name not in s]
            if missing:
                raise ConfigError(f"megatron state of TP rank(s) {missing} lacks {name!r}")
            full = unshard(mapping, [s[name] for s in per_rank_states])
            for hf_name, tensor in zip(hf_names(mapping, layer), _unfuse(mapping, full, config)):
                out[hf_name] = tensor.contiguous()
    return out
