"""megatron's self-attention with a static KV cache that holds keys already rotated.

In static batching (``StaticInferenceContext``, what the generation engine uses) megatron caches each key *before*
RoPE and, at every forward, rotates the whole cache again (``k_pos_emb[:sequence_end]``): a decode step costs
elementwise work over every cached token in every layer, several full-cache temporaries each, on top of the
attention itself. RoPE acts on each position alone, so rotating a key once, with its own slot's angle, when it is
written gives the same cached keys (the same op on the same values: bit-identical), and the step's cost no longer
grows with the cache through the rotation. megatron does the same in its flash-decode and dynamic paths ("Apply
rotary embeddings before appending KV cache"); flash decode needs CUDA kernels, so the static path is ours to fix.
Training and every path other than static batching are megatron's, untouched.
"""

from __future__ import annotations

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention


class RotatedKeyCacheSelfAttention(SelfAttention):
    """``SelfAttention`` (same constructor, parameters and checkpoint) that rotates new keys before caching them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the YaRN scale megatron's forward gives the query's rotation: the keys must get the same one
        self.key_rotation_mscale = _yarn_get_concentration_factor_from_config(self.config)

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args, **kwargs):
        static = inference_context is not None and inference_context.is_static_batching()
        if not static or rotary_pos_emb is None or self.config.flash_decode:
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        start = inference_context.sequence_len_offset
        key = apply_rotary_pos_emb(key, rotary_pos_emb[1][start : start + key.size(0)], config=self.config,
                                   mscale=self.key_rotation_mscale,
                                   cp_group=self.pg_collection.cp)
        query, key, value, (query_pos_emb, _), mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, rotary_pos_emb, *args, **kwargs)
        return query, key, value, (query_pos_emb, None), mask_type, block_table
