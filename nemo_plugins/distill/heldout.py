"""Held-out teacher-student KL and both models' perplexity on the same rows, without full logits."""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from nemo_plugins.data.batches import local_batch
from nemo_plugins.distill.kl_loss import token_kl_and_nll
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import flatten_tokens, full_sequence, sum_from_last_stage, tp_group


@torch.no_grad()
def evaluate_heldout(student: torch.nn.Module, teacher: Teacher, tokens: torch.Tensor, positions: torch.Tensor,
                     micro_batch_size: int, chunk_tokens: int = 256,
                     target_mask: torch.Tensor | None = None) -> dict[str, float]:
    """Mean KL(teacher || student) per token and student / teacher perplexity; DP ranks split the rows.

    With ``target_mask`` (a chat mix's assistant targets) only those tokens count: assistant-token KL and perplexity.
    """
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    rows = [t[dp_rank::dp_size] for t in (tokens, positions, *([] if target_mask is None else [target_mask]))]
    sequence_parallel = student.config.sequence_parallel
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, len(rows[0]), micro_batch_size):
        local = local_batch(*(t[start : start + micro_batch_size] for t in rows))
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
