"""Hugging Face <-> megatron-core parameter conversion for Mistral-family decoders, driven by a bridge's table.

Conversion is data: a bridge (``nemo_plugins.bridges``) declares ``ParamMapping`` rows, each with its names on both
sides, how it fuses and how megatron splits it over tensor-parallel ranks. This module does the same work for every
row: fusing / unfusing (``qkv``: megatron's grouped-query fused layout; ``gated``: SwiGLU's ``linear_fc1 =
[gate; up]``) and slicing.

Loading reads per TP rank only the rows / columns of each HF tensor that the rank holds (``hf_slices``), from any
``TensorReader`` (a lazy safetensors reader, or tensors in memory), then fuses those pieces in megatron's layout.
A column split of q / k / v takes whole query groups (heads are stored group by group) and a column split of
gate / up takes the matching rows of both halves, exactly what megatron's ColumnParallelLinear holds, so no rank
ever needs a full tensor. Export is the inverse, one tensor at a time: ``unshard`` the TP pieces, then unfuse.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Protocol

import torch

from nemo_plugins.bridges import text_bridge
from nemo_plugins.bridges.param_mapping import ParamMapping
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

# Transformer Engine fuses the pre-attention / pre-MLP norms into the following linear (megatron-side names, the
# same for every family).
TE_NAME_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
EMBEDDING = "embedding.word_embeddings.weight"  # megatron's input embedding: on the first pipeline stage
LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")  # the layer number in an HF name (``{layer}`` in a template)


def active_mappings(config: MistralConfig) -> list[ParamMapping]:
    """The rows of ``config``'s bridge that its model has (no output layer when the embeddings are tied)."""
    return [m for m in text_bridge(config.architecture).mappings if not (m.untied_only and config.tie_embeddings)]


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


@functools.cache
def _rows_by_name(mappings: tuple[ParamMapping, ...]) -> dict[str, tuple[ParamMapping, int]]:
    """HF name template -> (its row, its index among the row's HF tensors)."""
    return {name: (mapping, index) for mapping in mappings for index, name in enumerate(mapping.hf)}


def hf_shape(name: str, config: MistralConfig) -> tuple[int, ...]:
    """The shape an HF tensor of this name has under ``config``, as its bridge's table declares it."""
    bridge = text_bridge(config.architecture)
    found = _rows_by_name(bridge.mappings).get(LAYER_INDEX.sub("{layer}", name))
    if found is None:
        raise KeyError(name)
    mapping, index = found
    dims = bridge.dims(config)
    return tuple(dims[dim] for dim in mapping.shapes[index])


def hf_layout(config: MistralConfig) -> dict[str, tuple[ParamMapping, int | None, int]]:
    """Every HF tensor of the model -> (its mapping row, layer, index among the row's HF tensors), sorted by name."""
    layout = {}
    for mapping in active_mappings(config):
        for layer in range(config.num_layers) if mapping.per_layer else [None]:
            for index, name in enumerate(hf_names(mapping, layer)):
                layout[name] = (mapping, layer, index)
    return dict(sorted(layout.items()))


# ---------------------------------------------------------------------------------------- whole models
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
    mappings = active_mappings(config)
    for mapping in mappings:
        if mapping.per_layer:
            targets = [(layer, local) for local, layer in enumerate(layers)]
        elif mapping.megatron == EMBEDDING:
            targets = [(None, None)] if first_stage else []
        else:
            targets = [(None, None)] if last_stage else []
        for layer, local in targets:
            out[megatron_name(mapping, local, te_names)] = _local_tensor(mapping, layer, reader, config, tp_rank,
                                                                         tp_size)
    if config.tie_embeddings and last_stage and not first_stage:
        # the last pipeline stage keeps its own copy of the tied embedding as the output layer
        embedding = next(m for m in mappings if m.megatron == EMBEDDING)
        out["output_layer.weight"] = _local_tensor(embedding, None, reader, config, tp_rank, tp_size)
    return out


def megatron_to_hf_tensors(mapping: ParamMapping, layer: int | None, shards: list[torch.Tensor],
                           config: MistralConfig) -> dict[str, torch.Tensor]:
    """The HF tensors of one mapping row from its megatron TP shards (rank order)."""
    full = unshard(mapping, shards)
    return {name: t.contiguous() for name, t in zip(hf_names(mapping, layer), _unfuse(mapping, full, config))}
