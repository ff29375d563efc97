"""megatron's local core attention computed by PyTorch's ``scaled_dot_product_attention``.

The local spec's ``DotProductAttention`` materialises ``[b, heads, s, s]`` scores with ``baddbmm``, masks them and
runs a separate softmax and ``bmm``: on the CPU that is most of a step's attention time and memory. SDPA computes the
same ``softmax(q k^T * scale + mask) v`` in one fused kernel (PyTorch's flash kernel on the CPU and on GPUs), with
grouped-query heads read in place (``enable_gqa``) instead of repeated.

Masks keep megatron's meaning: ``attention_mask`` is True where attention is *not* allowed (the packed documents'
block-diagonal causal mask, the generation engine's padding mask); no mask on a causal layer means plain causal
attention, and a single query (a KV-cache decode step) attends to every cached key, as megatron does. One difference
on rows that may attend nowhere (a left-padded prompt's pad slots): megatron's ``-10000`` fill averages every value
there, SDPA returns zeros; nothing reads those rows. The attention-temperature query scale wraps this class like any
core attention (``attention_temperature.with_query_scale``).

A single query (a decode step) takes two fp32 matmuls and a softmax instead (``single_query_attention``): on the
CPU, PyTorch's bf16 SDPA kernel is 5-7x slower than that for one query over a short cache (128 rows, 9 heads over
3 groups, 40-100 keys: 3.6-7.5 ms against 0.5-1.4 ms on two cores), which made attention a third of a GRPO step's
sampling; the fp32 arithmetic matches the kernel's (same error against a float64 reference).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from nemo_plugins.errors import ConfigError


class SDPAttention(DotProductAttention):
    """``DotProductAttention`` (same constructor, parameters and checkpoint) whose forward is one SDPA call."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.config.softmax_type != "vanilla":
            raise ConfigError(f"softmax_type={self.config.softmax_type!r}: the SDPA core attention has the vanilla "
                              "softmax only; use the Transformer Engine spec for softmax offsets")
        if getattr(self.config, "window_size", None) is not None:
            raise ConfigError(f"window_size={self.config.window_size}: the SDPA core attention is full causal "
                              "attention; set window_size=None or use the Transformer Engine spec")
        # megatron divides the scale by the layer number under query-key layer scaling and multiplies it back
        # inside its fp32 softmax: the product is what the scores are scaled by
        self.score_scale = self.softmax_scale * (getattr(self.scale_mask_softmax, "scale", None) or 1.0)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``[sq, b, heads, d]`` query, ``[sk, b, groups, d]`` key / value -> ``[sq, b, heads * d]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("the local spec's attention takes masks, not packed_seq_params or attention_bias "
                             "(those are Transformer Engine's); MistralGPTModel builds the mask from position_ids")
        sq, b, sk = query.size(0), query.size(1), key.size(0)
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:
            raise ValueError(f"causal attention without a mask needs as many queries as keys, got {sq} and {sk}")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        dropout = self.attention_dropout.p if self.training else 0.0
        if sq == 1 and dropout == 0.0:
            allowed = None if attention_mask is None else ~attention_mask
            context = single_query_attention(q, k, v, allowed, self.score_scale)
            return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        rng = (contextlib.nullcontext() if self.config.sequence_parallel
               else tensor_parallel.get_cuda_rng_tracker().fork())
        with rng:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if attention_mask is None else ~attention_mask, dropout_p=dropout,
                is_causal=causal, scale=self.score_scale,
                enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def single_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           allowed: torch.Tensor | None, scale: float) -> torch.Tensor:
    """SDPA's ``softmax(q k^T * scale, masked) v`` for one query per row, in fp32, grouped-query heads read in place:
    ``[b, heads, 1, d]`` query, ``[b, groups, sk, d]`` key / value, ``allowed`` broadcastable to ``[b, heads, 1, sk]``
    (True: may attend) -> ``[b, heads, 1, d]`` in the query's dtype. Head h reads group ``h // (heads // groups)``,
    as ``enable_gqa`` does; a row allowed no key gets zeros, as SDPA gives."""
    b, heads, _, d = query.shape
    groups, keys = key.size(1), key.size(2)
    q = query.float().reshape(b, groups, heads // groups, d)
    scores = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [b, groups, heads per group, sk]
    if allowed is not None:
        allowed = allowed.expand(b, heads, 1, keys).reshape(b, groups, heads // groups, keys)
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(weights, value.float()).reshape(b, heads, 1, d).to(query.dtype)
