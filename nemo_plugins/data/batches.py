"""Training rows as one rank feeds them to the model: next-token targets, loss masks, the CP slice, the device."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.distributed import device


def next_token_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the next token in the row) and a mask that drops each row's last position, which has none."""
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0.0
    return labels, mask


def local_batch(tokens: torch.Tensor, positions: torch.Tensor, target_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch as this rank feeds it to the model: targets made on the whole rows, then every tensor
    cut to this context-parallel rank's part, on this rank's device.

    ``target_mask`` [b, s] (1 where the token at t+1 is a target, e.g. an assistant token of a conversation)
    narrows the loss to those positions; without it every next token of the row counts.
    """
    labels, mask = next_token_targets(tokens)
    if target_mask is not None:
        mask = mask * target_mask.to(mask.dtype)
    cp_size, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    return {name: context_parallel_slice(value, cp_size, cp_rank).to(device())
            for name, value in (("tokens", tokens), ("positions", positions), ("labels", labels), ("mask", mask))}
