"""Each rank's tensor-parallel slice of the model in Hugging Face layout: read, gathered, loaded.

Pruning a 24B parent on one 8-GPU node must not hold the whole model on every rank (48 GB in bf16, 8 times over):
every rank reads only the slice its megatron TP rank holds (``safe_open(...).get_slice``), the pruning steps
rewrite slices (a rotation of the residual stream acts on each slice alone), and only the FFN channel selection
and the fitted embedding tie look across slices, one layer / one reduction at a time.

A TP slice of a Mistral model in HF layout is the HF state of a model with 1/TP of the heads, KV heads, FFN
channels and vocabulary (``slice_config``): megatron's fused QKV and gate/up tensors of one rank are built from
it exactly as from a whole model at TP=1, so loading reuses the one declarative mapping.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plugins.convert import hf_io
from nemo_plugins.convert.mapping import (
    TE_NAME_ALIASES,
    active_mappings,
    hf_layout,
    hf_shape,
    hf_slices,
    megatron_name,
    megatron_to_hf_tensors,
)
from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.convert.sources import ModelSource, hf_dir, load_model, source_config
from nemo_plugins.distributed import ParallelConfig, device
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.state import ModelState, TensorSlice


def this_rank() -> TensorSlice:
    return TensorSlice(parallel_state.get_tensor_model_parallel_rank(),
                       parallel_state.get_tensor_model_parallel_world_size())


def part(tensor: torch.Tensor, dim: int | None, where: TensorSlice) -> torch.Tensor:
    """This slice's part of a whole tensor split along ``dim``."""
    if dim is None or where.whole:
        return tensor
    return tensor.chunk(where.size, dim=dim)[where.rank]


def whole(tensor: torch.Tensor, dim: int | None, where: TensorSlice) -> torch.Tensor:
    """The whole tensor from every slice's part (gathered over the TP group on the job's device)."""
    if dim is None or where.whole:
        return tensor
    mine = tensor.to(device()).contiguous()
    parts = [torch.empty_like(mine) for _ in range(where.size)]
    dist.all_gather(parts, mine, group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim).to(tensor.device)


def sum_over_slices(tensor: torch.Tensor, where: TensorSlice) -> torch.Tensor:
    """A sum whose terms are spread over the slices (e.g. over vocabulary rows), completed on every slice."""
    if where.whole:
        return tensor
    total = tensor.to(device()).contiguous()
    dist.all_reduce(total, group=parallel_state.get_tensor_model_parallel_group())
    return total.to(tensor.device)


def slice_config(config: MistralConfig, size: int) -> MistralConfig:
    """The config whose whole HF state has the shapes of one TP slice of ``config``'s."""
    config.check_parallel(size)
    return config.replace(num_attention_heads=config.num_attention_heads // size,
                          num_kv_heads=config.num_kv_heads // size,
                          ffn_hidden_size=config.ffn_hidden_size // size,
                          vocab_size=config.vocab_size // size)


def _uses_te_names(model: torch.nn.Module) -> bool:
    return any(k.endswith(TE_NAME_ALIASES["input_layernorm.weight"]) for k in model.state_dict())


def read_slice(source: ModelSource, parallel: ParallelConfig) -> ModelState:
    """This rank's TP slice of every tensor of ``source`` (all layers: pruning runs with parallel.pp=1)."""
    if parallel.pp != 1:
        raise ConfigError(f"parallel.pp={parallel.pp}: pruning holds every layer of its TP slice on each rank; run the "
                          "prune stage with parallel.pp=1 (cascade.stage_parallel.prune.pp=1)")
    if parallel.cp != 1:
        raise ConfigError(f"parallel.cp={parallel.cp}: pruning's calibration reads whole rows on every rank; run the "
                          "prune stage with parallel.cp=1 (cascade.stage_parallel.prune.cp=1)")
    where = this_rank()
    if source.kind == "megatron":
        config, model = load_model(source, parallel)
        return ModelState(config, model_slice(model, config), where)
    config = source_config(source)
    config.check_parallel(where.size)
    reader = hf_io.HFReader(hf_dir(source))
    tensors = {}
    for name, (mapping, _, _) in hf_layout(config).items():
        if reader.shape(name) is None:
            raise CheckpointError(f"{source}: checkpoint is missing tensor {name!r} required by its config: "
                                  "copy or convert it again")
        (rows, cols), = hf_slices(mapping, [name], config, where.rank, where.size)
        tensors[name] = reader.read(name, rows, cols)
    return ModelState(config, tensors, where)


def model_slice(model: torch.nn.Module, config: MistralConfig) -> dict[str, torch.Tensor]:
    """This rank's slice in HF layout, from its shard of a (pipeline-parallel size 1) megatron model."""
    local = {k: v.detach().cpu() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    sliced, te_names = slice_config(config, this_rank().size), _uses_te_names(model)
    tensors = {}
    for mapping in active_mappings(config):
        for layer in range(config.num_layers) if mapping.per_layer else [None]:
            shard = local[megatron_name(mapping, layer, te_names)]
            tensors.update(megatron_to_hf_tensors(mapping, layer, [shard], sliced))
    return tensors


class SliceReader:
    """A TP slice as a ``TensorReader`` of the whole model that serves exactly this rank's ranges: the one loader
    (``load_hf_state``) checks names and shapes and fuses QKV / gate-up as for a checkpoint on disk."""

    def __init__(self, state: ModelState):
        self.state = state

    def shape(self, name: str) -> tuple[int, ...] | None:
        return hf_shape(name, self.state.config) if name in self.state.tensors else None

    def read(self, name: str, rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        tensor = self.state.tensors[name]
        wanted = tuple(len(range(*r.indices(n))) if r is not None else n
                       for r, n in zip((rows, cols), self.shape(name)))
        if wanted != tuple(tensor.shape):
            raise ConfigError(f"tensor {name!r}: TP slice {self.state.slice} holds {tuple(tensor.shape)}, the model "
                              f"asks for {wanted}; load it under the layout it was sliced for")
        return tensor


def load_slice(model: torch.nn.Module, state: ModelState) -> None:
    """Copy a TP-sliced state into this rank's shard of ``model``."""
    if state.slice != this_rank():
        raise ConfigError(f"a state sliced for TP rank {state.slice.rank} of {state.slice.size} cannot load into TP "
                          f"rank {this_rank().rank} of {this_rank().size}")
    load_hf_state(model, SliceReader(state), state.config)
