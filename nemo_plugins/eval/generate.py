"""Greedy generation with a (TP/PP-parallel) megatron model: short samples for run reports."""

from __future__ import annotations

import torch

from nemo_plugins.distributed import device
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import full_sequence, sum_from_last_stage, vocab_parallel_argmax


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
