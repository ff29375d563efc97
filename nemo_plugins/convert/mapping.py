"""Declarative Hugging Face <-> megatron-core parameter mapping for Mistral-family decoders.

Conversion is data: a table of ``ParamMapping`` rows. Each row knows
* its names on both sides (``{layer}`` is the global layer index),
* how to fuse/unfuse (``direct``, ``qkv`` for megatron's grouped-query fused layout, ``gated`` for
  SwiGLU's ``linear_fc1 = [gate; up]``),
* how megatron splits it over tensor-parallel ranks (``replicated``, ``column`` = dim 0, ``row`` = dim 1).

Loading reads per TP rank only the rows / columns of each HF tensor that the rank holds (``hf_slices``), from any
``TensorReader`` (a lazy safetensors reader, or tensors in memory), then fuses those pieces in megatron's layout.
A column split of q / k / v takes whole query groups (heads are stored group by group) and a column split of
gate / up takes the matching rows of both halves, exactly what megatron's ColumnParallelLinear holds, so no rank
ever needs a full tensor. Export is the inverse, one tensor at a time: ``unshard`` the TP pieces, then unfuse.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol

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


# ---------------------------------------------------------------------------------------- readers
class TensorReader(Protocol):
    """HF tensors by name, readable in row / column ranges (``hf_io.HFReader`` reads them from safetensors)."""

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape, or None when the checkpoint has no such tensor."""

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        """The tensor, or only ``rows`` (dim 0) / ``cols`` (dim 1) of it."""


class InMemory:
    """A TensorReader over tensors already in memory (tests, pruning's full state)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.tensors = tensors

    def shape(self, name: str) -> tuple[int, ...] | None:
        return tuple(self.tensors[name].shape) if name in self.tensors else None

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        tensor = self.tensors[name][rows or slice(None)]
        return tensor if cols is None else tensor[:, cols]


def as_reader(source: TensorReader | Mapping[str, torch.Tensor]) -> TensorReader:
    return InMemory(source) if isinstance(source, Mapping) else source


# ---------------------------------------------------------------------------------------- fusion
def _fuse(mapping: ParamMapping, tensors: list[torch.Tensor], config: MistralConfig) -> torch.Tensor:
    """Megatron's tensor from HF pieces (whole tensors, or one TP rank's slices of them)."""
    if mapping.fusion == "direct":
        return tensors[0]
    if mapping.fusion == "gated":
        return torch.cat(tensors, dim=0)
    q, k, v = tensors
    d = config.head_dim
    groups = k.shape[0] // d  # all kv groups, or this rank's
    hidden = q.shape[1]
    q = q.reshape(groups, -1, hidden)
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
def _part(size: int, tp_rank: int, tp_size: int, name: str) -> slice:
    if size % tp_size:
        raise ConfigError(f"tensor {name!r}: size {size} does not split over parallel.tp={tp_size}; choose a tp "
                          "that divides it")
    step = size // tp_size
    return slice(tp_rank * step, (tp_rank + 1) * step)


def hf_slices(mapping: ParamMapping, names: list[str], config: MistralConfig, tp_rank: int,
              tp_size: int) -> list[tuple[slice | None, slice | None]]:
    """(rows, cols) of each HF tensor in ``names`` that one TP rank's shard is made of (None = all of that dim)."""
    if mapping.split == "replicated" or tp_size == 1:
        return [(None, None) for _ in names]
    if mapping.split == "row":
        return [(None, _part(hf_shape(n, config)[1], tp_rank, tp_size, n)) for n in names]
    return [(_part(hf_shape(n, config)[0], tp_rank, tp_size, n), None) for n in names]


def unshard(mapping: ParamMapping, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full megatron tensor from every TP rank's slice, in rank order."""
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


def hf_shape(name: str, config: MistralConfig) -> tuple[int, ...]:
    """The shape an HF tensor of this name has under ``config``."""
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


def hf_layout(config: MistralConfig) -> dict[str, tuple[ParamMapping, int | None, int]]:
    """Every HF tensor of the model -> (its mapping row, layer, index among the row's HF tensors), sorted by name."""
    layout = {}
    for mapping in active_mappings(config):
        for layer in range(config.num_layers) if mapping.per_layer else [None]:
            for index, name in enumerate(hf_names(mapping, layer)):
                layout[name] = (mapping, layer, index)
    return dict(sorted(layout.items()))


# ---------------------------------------------------------------------------------------- whole models
EMBEDDING = MISTRAL_MAPPINGS[0]


def _local_tensor(mapping: ParamMapping, layer: int | None, reader: TensorReader, config: MistralConfig,
                  tp_rank: int, tp_size: int) -> torch.Tensor:
    """One TP rank's megatron tensor, read slice by slice; a missing or misshapen HF tensor is named."""
    names = hf_names(mapping, layer)
    for name in names:
        found, expected = reader.shape(name), hf_shape(name, config)
        if found is None:
            raise ConfigError(f"checkpoint is missing tensor {name!r} required by the model config")
        if tuple(found) != expected:
            raise ConfigError(f"tensor {name!r} has shape {tuple(found)} but the config expects {expected}")
    slices = hf_slices(mapping, names, config, tp_rank, tp_size)
    pieces = [reader.read(name, rows, cols) for name, (rows, cols) in zip(names, slices)]
    return _fuse(mapping, pieces, config).contiguous()


def hf_to_megatron(
    source: TensorReader | Mapping[str, torch.Tensor],
    config: MistralConfig,
    layers: range | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    te_names: bool = False,
    first_stage: bool = True,
    last_stage: bool = True,
) -> dict[str, torch.Tensor]:
    """Megatron state dict of one (TP rank, pipeline stage) from HF tensors; layers are renumbered locally.

    Only this rank's slices are read. Raises ConfigError naming the tensor when one is missing or misshapen.
    """
    reader = as_reader(source)
    layers = range(config.num_layers) if layers is None else layers
    out: dict[str, torch.Tensor] = {}
    for mapping in active_mappings(config):
        if mapping.per_layer:
            targets = [(layer, local) for local, layer in enumerate(layers)]
        elif mapping is EMBEDDING:
            targets = [(None, None)] if first_stage else []
        else:
            targets = [(None, None)] if last_stage else []
        for layer, local in targets:
            out[megatron_name(mapping, local, te_names)] = _local_tensor(mapping, layer, reader, config, tp_rank, tp_size)
    if config.tie_embeddings and last_stage and not first_stage:
        # the last pipeline stage keeps its own copy of the tied embedding as the output layer
        out["output_layer.weight"] = _local_tensor(EMBEDDING, None, reader, config, tp_rank, tp_size)
    return out


def megatron_to_hf_tensors(mapping: ParamMapping, layer: int | None, shards: list[torch.Tensor],
                           config: MistralConfig) -> dict[str, torch.Tensor]:
    """The HF tensors of one mapping row from its megatron TP shards (rank order)."""
    full = unshard(mapping, shards)
    return {name: t.contiguous() for name, t in zip(hf_names(mapping, layer), _unfuse(mapping, full, config))}
