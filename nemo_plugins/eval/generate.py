"""Greedy generation with a (TP/PP-parallel) megatron model: short samples for run reports."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plugins.distill.teacher import full_sequence
from nemo_plugins.distributed import device
from nemo_plugins.eval.heldout import sum_from_last_stage, tp_group
from nemo_plugins.model.forward import forward_only


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


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt's greedy continuation (full forward per token: fine for a few dozen tokens of a report)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for _ in range(max_new_tokens):
        tokens = torch.tensor([ids], device=device())
        positions = torch.arange(len(ids), device=device())[None]
        outputs = forward_only(model, [(tokens, positions, None)],
                               lambda hidden: {"next": vocab_parallel_argmax(model, full_sequence(hidden, model.config.sequence_parallel)[-1, 0])},
                               forward_kwargs={"return_hidden": True})
        local = torch.tensor([float(outputs[0]["next"]) if outputs else 0.0])
        next_id = int(sum_from_last_stage(local).item())
        ids.append(next_id)
        if next_id == tokenizer.eos_token_id:
            break
    return tokenizer.decode(ids[len(tokenizer(prompt, add_special_tokens=False)["input_ids"]):])
