"""Move Hugging Face tensors into and out of live (TP/PP-sharded) megatron models.

Loading: each rank reads only its own TP slice of its own stage's tensors (``mapping.hf_to_megatron`` over an
``hf_io.HFReader``). Export: one mapping row at a time, the owning stage's TP ranks (DP=0, CP=0) gather their
shards to their TP rank 0 (``dist.gather`` over the TP group), which unfuses the row into HF tensors and sends
them point to point to global rank 0; rank 0 writes them into safetensors shards as they come. No rank ever holds
more than one row beyond its own model, and nothing goes through ``gather_object`` (on NCCL that allocates
max_size x world on rank 0's GPU). Every tensor a collective touches lives on ``distributed.device()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nemo_plugins.bridges.param_mapping import ParamMapping
from nemo_plugins.convert import hf_io
from nemo_plugins.convert.mapping import (
    EMBEDDING,
    TE_NAME_ALIASES,
    TensorReader,
    hf_layout,
    hf_names,
    hf_shape,
    hf_to_megatron,
    megatron_name,
    megatron_to_hf_tensors,
)
from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig


def local_layers(model: torch.nn.Module) -> range:
    """Global indices of the transformer layers held by this pipeline stage."""
    offset = get_transformer_layer_offset(model.config)
    return range(offset, offset + len(model.decoder.layers))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The text model's tensors (a vision-language model's encoder and projector are ``vision.checkpoint``'s)."""
    other = tuple(getattr(model, "non_text_prefixes", ()))
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and not k.startswith(other)}


def _uses_te_names(model: torch.nn.Module) -> bool:
    return any(k.endswith(TE_NAME_ALIASES["input_layernorm.weight"]) for k in model.state_dict())


def load_hf_state(model: torch.nn.Module, source: TensorReader | Mapping[str, torch.Tensor],
                  config: MistralConfig) -> None:
    """Copy this rank's slices of the HF tensors into ``model``; every mismatch is named, nothing is half-loaded."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    local = hf_to_megatron(source, config, local_layers(model), tp_rank, tp_size, _uses_te_names(model),
                           first_stage=model.pre_process, last_stage=model.post_process)
    expected = _weights(model)
    missing = sorted(set(expected) - set(local))
    unexpected = sorted(set(local) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"model/checkpoint mismatch: model needs {missing}, checkpoint adds {unexpected}")
    for name, tensor in local.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"tensor {name!r}: checkpoint shard has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(local[name].to(param.dtype))


# ---------------------------------------------------------------------------------------- export
def _rank_table(model: torch.nn.Module) -> torch.Tensor:
    """Per global rank: (pp, tp, dp, cp, first layer, end layer, pre_process, post_process)."""
    layers = local_layers(model)
    row = torch.tensor([parallel_state.get_pipeline_model_parallel_rank(),
                        parallel_state.get_tensor_model_parallel_rank(),
                        parallel_state.get_data_parallel_rank(), parallel_state.get_context_parallel_rank(),
                        layers.start, layers.stop, int(model.pre_process), int(model.post_process)],
                       dtype=torch.int64, device=device())
    table = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(table, row)
    return torch.stack(table).cpu()


def _owner(table: torch.Tensor, mapping: ParamMapping, layer: int | None) -> int:
    """The pipeline stage holding one mapping row."""
    if layer is not None:
        holds = (table[:, 4] <= layer) & (layer < table[:, 5])
    else:
        holds = table[:, 6 if mapping.megatron == EMBEDDING else 7] == 1
    return int(table[holds][0, 0])


def _source_rank(table: torch.Tensor, stage: int) -> int:
    """The global rank of (pp=stage, tp=0, dp=0, cp=0): it assembles the stage's rows and sends them to rank 0."""
    match = (table[:, 0] == stage) & (table[:, 1:4] == 0).all(dim=1)
    return int(match.nonzero()[0, 0])


def export_dtype(model: torch.nn.Module) -> torch.dtype:
    """One dtype for the whole export, the model's parameter dtype (HF directories declare one ``torch_dtype``):
    megatron's local spec keeps RMSNorm weights in fp32 inside a bf16 model, and those are cast to it."""
    return model.config.params_dtype


def iter_hf_tensors(model: torch.nn.Module, config: MistralConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of the model, in name order, as CPU tensors on global rank 0 (nothing elsewhere).

    Collective: every rank must drain it (the others send their rows as rank 0 reaches them).
    """
    table = _rank_table(model)
    rank = dist.get_rank()
    me = table[rank]
    offset, te_names = int(me[4]), _uses_te_names(model)
    weights = _weights(model)
    dtype = export_dtype(model)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    done: set[tuple[str, int | None]] = set()
    pending: dict[str, torch.Tensor] = {}
    for name, (mapping, layer, _) in hf_layout(config).items():
        key = (mapping.megatron, layer)
        if key not in done:
            done.add(key)
            stage = _owner(table, mapping, layer)
            source = _source_rank(table, stage)
            row_names = hf_names(mapping, layer)
            if int(me[0]) == stage and int(me[2]) == 0 and int(me[3]) == 0:
                local = weights[megatron_name(mapping, None if layer is None else layer - offset, te_names)]
                shards = [torch.empty_like(local) for _ in range(tp_size)] if rank == source else None
                if tp_size > 1:
                    dist.gather(local.contiguous(), shards, dst=parallel_state.get_tensor_model_parallel_src_rank(),
                                group=parallel_state.get_tensor_model_parallel_group())
                elif shards is not None:
                    shards = [local]
                if rank == source:
                    row = {n: t.to(dtype) for n, t in megatron_to_hf_tensors(mapping, layer, shards, config).items()}
                    if rank == 0:
                        pending.update({n: t.to("cpu", copy=True) for n, t in row.items()})
                    else:
                        for n in row_names:
                            dist.send(row[n], dst=0)
            if rank == 0 and source != 0:
                for n in row_names:
                    buffer = torch.empty(hf_shape(n, config), dtype=dtype, device=device())
                    dist.recv(buffer, src=source)
                    pending[n] = buffer.cpu()
        if rank == 0:
            yield name, pending.pop(name)


def gather_hf_state(model: torch.nn.Module, config: MistralConfig) -> dict[str, torch.Tensor] | None:
    """HF tensors of the whole model on global rank 0 (None elsewhere): the export stream, collected."""
    state = dict(iter_hf_tensors(model, config))
    return state if dist.get_rank() == 0 else None


def export_hf(model: torch.nn.Module, config: MistralConfig, out_dir: str | Path, max_shard_bytes: int = 4 * 2**30,
              extra_files: dict[str, Path] | None = None, overwrite: bool = False,
              multimodal: hf_io.Multimodal | None = None) -> Path:
    """Stream the model into a Hugging Face directory written by rank 0 (collective; see the module docstring)."""
    stream = iter_hf_tensors(model, config)
    if dist.get_rank() == 0:
        specs = {name: (hf_shape(name, config), export_dtype(model)) for name in hf_layout(config)}
        hf_io.write_streamed(stream, specs, config, out_dir, max_shard_bytes, extra_files, overwrite, multimodal)
    else:
        for _ in stream:
            pass
    dist.barrier()
    return Path(out_dir)
