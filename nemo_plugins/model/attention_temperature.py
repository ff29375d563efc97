"""Position-based attention temperature (Llama 4 / Ministral 3): queries x (1 + beta log(1 + floor(pos / P))).

The factor is applied to the query after RoPE inside megatron's core attention. Positions are the
position *inside each document* (``position_ids`` restart at 0 for every packed document), unlike the
public implementations, which use the position inside the pack and so give a late short document a
temperature it never sees at inference.

Transport: megatron threads ``attention_bias`` untouched from ``GPTModel.forward(extra_block_kwargs=...)``
through every pipeline stage, activation recomputation and layer down to the core attention. Mistral
models have no attention bias, so that channel carries the per-token query scale ``[s, b, 1, 1]``; the
core-attention subclass consumes it and hands ``None`` to the real kernel.
"""

from __future__ import annotations

import functools

import torch


def query_scale(position_ids: torch.Tensor, beta: float, period: int) -> torch.Tensor:
    """Per-token query multiplier, shape ``[s, b, 1, 1]`` (megatron's sbhd layout), fp32."""
    positions = position_ids.to(torch.float32)
    scale = 1.0 + beta * torch.log1p(torch.floor(positions / period))
    return scale.transpose(0, 1)[:, :, None, None].contiguous()


@functools.cache
def with_query_scale(core_attention_cls: type) -> type:
    """Subclass of a megatron core-attention class that multiplies the query by the carried scale."""

    class QueryScaledAttention(core_attention_cls):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if attention_bias is not None:
                scale = attention_bias if query.dim() == 4 else attention_bias.reshape(-1, 1, 1)
                query = query * scale.to(query.dtype)
            return super().forward(
                query,
                key,
                value,
                attention_mask,
                attn_mask_type=attn_mask_type,
                attention_bias=None,
                packed_seq_params=packed_seq_params,
            )

    QueryScaledAttention.__name__ = f"QueryScaled{core_attention_cls.__name__}"
    QueryScaledAttention.__qualname__ = QueryScaledAttention.__name__
    return QueryScaledAttention
