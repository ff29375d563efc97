"""Attention masks for packed sequences: causal and no attention across document boundaries."""

from __future__ import annotations

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every token, from per-document positions that restart at 0. ``[b, s]`` -> ``[b, s]``."""
    return torch.cumsum((position_ids == 0).to(torch.int64), dim=1)


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask ``[b, 1, s, s]``, True where attention is *not* allowed (megatron's convention)."""
    docs = document_ids(position_ids)
    s = position_ids.shape[1]
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=position_ids.device), diagonal=1)
    other_doc = docs[:, :, None] != docs[:, None, :]
    return (future[None] | other_doc)[:, None]


def is_single_document(position_ids: torch.Tensor) -> bool:
    """True when every row is one document starting at position 0 (plain causal masking suffices)."""
    s = position_ids.shape[1]
    expected = torch.arange(s, device=position_ids.device).expand_as(position_ids)
    return bool(torch.equal(position_ids, expected))
