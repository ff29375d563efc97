"""The token layout megatron's context parallelism expects: each CP rank holds two of 2*cp sequence chunks.

Rank r gets chunks r and 2*cp-1-r ("zigzag"), which balances causal-attention work across ranks; megatron's
rotary embedding slices its positions in the same way, so inputs must be laid out exactly like this.
"""

from __future__ import annotations

import torch

from nemo_plugins.errors import ConfigError


def context_parallel_slice(tensor: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This CP rank's part of a ``[b, s]`` tensor: ``[b, s / cp]``."""
    if cp_size == 1:
        return tensor
    seq = tensor.shape[1]
    if seq % (2 * cp_size):
        raise ConfigError(f"sequence length {seq} must be divisible by 2 x parallel.cp = {2 * cp_size}")
    chunks = tensor.chunk(2 * cp_size, dim=1)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=1)
