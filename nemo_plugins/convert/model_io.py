"""Move Hugging Face tensors into and out of live (TP/PP-sharded) megatron models."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nemo_plugins.convert.mapping import MISTRAL_MAPPINGS, TE_NAME_ALIASES, hf_to_megatron, megatron_to_hf, shard
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig


def local_layers(model: torch.nn.Module) -> range:
    """Global indices of the transformer layers held by this pipeline stage."""
    offset = get_transformer_layer_offset(model.config)
    return range(offset, offset + len(model.decoder.layers))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def _uses_te_names(model: torch.nn.Module) -> bool:
    return any(k.endswith(TE_NAME_ALIASES["input_layernorm.weight"]) for k in model.state_dict())


def load_hf_state(model: torch.nn.Module, hf_state: dict[str, torch.Tensor], config: MistralConfig) -> None:
    """Copy HF tensors into this rank's shard of ``model``; every mismatch is named, nothing is half-loaded."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    first, last = model.pre_process, model.post_process
    local = hf_to_megatron(
        hf_state, config, local_layers(model), tp_rank, tp_size, _uses_te_names(model), first_stage=first, last_stage=last
    )
    if config.tie_embeddings and last and not first:
        embedding = next(m for m in MISTRAL_MAPPINGS if m.megatron.startswith("embedding"))
        local["output_layer.weight"] = shard(embedding, hf_state["model.embed_tokens.weight"], tp_rank, tp_size)
    expected = _weights(model)
    missing = sorted(set(expected) - set(local))
    unexpected = sorted(set(local) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"model/checkpoint mismatch: model needs {missing}, checkpoint adds {unexpected}")
    for name, tensor in local.items():
        if tensor.shape != expected[name].shape:
            raise ConfigError(
                f"tensor {name!r}: checkpoint shard has shape {tuple(tensor.shape)}, model expects {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, param in _weights(model).items():
            param.copy_(local[name].to(param.dtype))


def gather_hf_state(model: torch.nn.Module, config: MistralConfig) -> dict[str, torch.Tensor] | None:
    """HF tensors of the whole model on global rank 0 (None elsewhere), gathered over TP and PP ranks."""
    offset = local_layers(model).start
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _weights(model).items():
        if name == "output_layer.weight" and config.tie_embeddings:
            continue
        if name.startswith("decoder.layers."):
            _, _, index, rest = name.split(".", 3)
            name = f"decoder.layers.{int(index) + offset}.{rest}"
        state[name] = tensor.detach().to("cpu", copy=True)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object((tp_rank, dp_rank, state), gathered, dst=0)
    if gathered is None:
        return None
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    per_tp: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for rank_tp, rank_dp, rank_state in gathered:
        if rank_dp == 0:
            per_tp[rank_tp].update(rank_state)
    return megatron_to_hf(per_tp, config, te_names=_uses_te_names(model))
