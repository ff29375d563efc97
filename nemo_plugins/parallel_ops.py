"""Small operations on model outputs in a TP / PP / CP layout, shared by training, evaluation and generation.

They live apart from any one of those so that none imports another (distillation and evaluation used to import
each other for these).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from nemo_plugins.distributed import device


def tp_group():
    """The tensor-parallel group, or None at TP=1 (vocab-parallel functions then skip their collectives)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        return parallel_state.get_tensor_model_parallel_group()
    return None


def sum_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """Sum per-rank partial sums over the world, counting each (DP, CP, last-stage) shard once (TP rank 0);
    a CP rank's sums cover its part of every row, so adding them up over CP gives the rows' totals."""
    counted = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    values = values.to(device(), torch.float64) * (1.0 if counted else 0.0)
    dist.all_reduce(values)
    return values


def summed_logs(outputs: list[dict], keys: tuple[str, ...]) -> list[float]:
    """The totals of ``keys`` over the micro-batch logs a training schedule returned (``(sum, count)`` losses), in
    float64, over the whole world (``sum_from_last_stage``): every rank gets the same numbers."""
    local = torch.zeros(len(keys), dtype=torch.float64)
    for out in outputs:
        local += torch.stack([out[key].detach().double().cpu() for key in keys])
    return sum_from_last_stage(local).tolist()


def full_sequence(hidden: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """``[s, b, h]`` hidden states over the whole sequence: under sequence parallelism each TP rank holds
    ``s / tp`` rows; the fused loss wants all of them (it sums its own hidden-state gradient over TP, so
    the gather's backward must split, not reduce-scatter)."""
    if not sequence_parallel:
        return hidden
    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)


def flatten_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """``[s, b, h]`` -> ``[b * s, h]`` in the row-major order of ``[b, s]`` token tensors."""
    return hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])


def vocab_parallel_argmax(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Argmax token ids of ``hidden @ W.T`` over a TP-split vocabulary (each rank's best, then the best of those)."""
    logits = (hidden @ model.output_weight().T).float()
    best, index = logits.max(-1)
    index = index + parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    group = tp_group()
    if group is None:
        return index
    size = dist.get_world_size(group)
    bests, indices = [torch.empty_like(best) for _ in range(size)], [torch.empty_like(index) for _ in range(size)]
    dist.all_gather(bests, best, group=group)
    dist.all_gather(indices, index, group=group)
    winner = torch.stack(bests).argmax(0)
    return torch.stack(indices).gather(0, winner[None])[0]
