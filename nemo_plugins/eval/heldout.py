"""Held-out teacher-student KL and both models' perplexity on the same rows, without full logits."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.distill.kl_loss import token_kl_and_nll
from nemo_plugins.distill.teacher import Teacher, flatten_tokens, full_sequence
from nemo_plugins.distributed import device
from nemo_plugins.model.forward import forward_only


def next_token_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the next token in the row) and a mask that drops each row's last position, which has none."""
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0.0
    return labels, mask


def local_batch(tokens: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """One micro-batch as this rank feeds it to the model: targets made on the whole rows, then every tensor
    cut to this context-parallel rank's part, on this rank's device."""
    labels, mask = next_token_targets(tokens)
    cp_size, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    return {name: context_parallel_slice(value, cp_size, cp_rank).to(device())
            for name, value in (("tokens", tokens), ("positions", positions), ("labels", labels), ("mask", mask))}


def tp_group():
    return parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None


def sum_from_last_stage(values: torch.Tensor) -> torch.Tensor:
    """Sum per-rank partial sums over the world, counting each (DP, CP, last-stage) shard once (TP rank 0);
    a CP rank's sums cover its part of every row, so adding them up over CP gives the rows' totals."""
    counted = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    values = values.to(device(), torch.float64) * (1.0 if counted else 0.0)
    dist.all_reduce(values)
    return values


@torch.no_grad()
def evaluate_heldout(student: torch.nn.Module, teacher: Teacher, tokens: torch.Tensor, positions: torch.Tensor,
                     micro_batch_size: int, chunk_tokens: int = 256) -> dict[str, float]:
    """Mean KL(teacher || student) per token and student / teacher perplexity; DP ranks split the rows."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tokens, positions = tokens[dp_rank::dp_size], positions[dp_rank::dp_size]
    sequence_parallel = student.config.sequence_parallel
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(tokens), micro_batch_size):
        local = local_batch(tokens[start : start + micro_batch_size], positions[start : start + micro_batch_size])
        batch = (local["tokens"], local["positions"])
        teacher_out = teacher.run([batch])
        labels, mask = local["labels"].reshape(-1), local["mask"].reshape(-1)

        def reduce(hidden, teacher_out=teacher_out, labels=labels, mask=mask):
            per_token = token_kl_and_nll(flatten_tokens(full_sequence(hidden, sequence_parallel)), student.output_weight(),
                                         teacher_out[0], labels, chunk_tokens, tp_group())
            return {name: (value * mask).double().sum().cpu() for name, value in per_token.items()}

        for out in forward_only(student, [(*batch, None)], reduce, forward_kwargs={"return_hidden": True}):
            totals += torch.stack([out["kl"], out["student_nll"], out["teacher_nll"], mask.double().sum().cpu()])
    kl, student_nll, teacher_nll, count = sum_from_last_stage(totals).tolist()
    return {
        "kl": kl / count,
        "student_ppl": math.exp(student_nll / count),
        "teacher_ppl": math.exp(teacher_nll / count),
        "tokens": int(count),
    }
