"""The local spec's SDPA core attention computes megatron's DotProductAttention maths: packed documents, GQA, the
attention-temperature query scale, KV-cache decode steps, gradients; and it is the one the local spec builds."""

import pytest
import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.attention_temperature import query_scale, with_query_scale
from nemo_plugins.model.builder import build_model, transformer_config
from nemo_plugins.model.config import YarnScaling
from nemo_plugins.model.masks import packed_causal_mask
from nemo_plugins.model.sdpa_attention import SDPAttention
from tests.conftest import tiny_config

DOCS = [[5, 1, 9, 3], [7, 11]]  # two rows of 18 tokens, a one-token document among them
CONFIG = tiny_config()  # 4 query heads over 2 kv groups (GQA), head_dim 16
TEMPERATURE = tiny_config(architecture="Ministral3ForCausalLM", rope_theta=1_000_000.0, max_position_embeddings=64,
                          rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=4, beta_fast=32.0,
                                                   beta_slow=1.0),
                          attention_temperature_beta=0.5)


def positions_of(rows: list[list[int]]) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def attentions(model_config=CONFIG):
    """The new and the old core attention on the same config."""
    config = transformer_config(model_config, ParallelConfig())
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPAttention(**args), DotProductAttention(**args)


def qkv(sq: int, sk: int, b: int = 2):
    q = torch.randn(sq, b, CONFIG.num_attention_heads, CONFIG.head_dim, requires_grad=True)
    k, v = (torch.randn(sk, b, CONFIG.num_kv_heads, CONFIG.head_dim, requires_grad=True) for _ in range(2))
    return q, k, v


def naive_per_document(q, k, v, rows: list[list[int]]) -> torch.Tensor:
    """Each document attends causally within itself only, computed document by document with repeated kv heads."""
    group = q.shape[2] // k.shape[2]
    out = torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3])
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            qd, kd, vd = (t[start:start + n, b].transpose(0, 1) for t in (q, k, v))  # [heads, n, d]
            kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
            scores = qd @ kd.transpose(1, 2) / q.shape[3] ** 0.5
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
            out[start:start + n, b] = (scores.softmax(-1) @ vd).transpose(0, 1).reshape(n, -1)
            start += n
    return out


def test_packed_documents_equal_a_per_document_reference_and_megatrons_attention():
    sdpa, megatron = attentions()
    positions = positions_of(DOCS)
    q, k, v = qkv(18, 18)
    mask = packed_causal_mask(positions)
    got = sdpa(q, k, v, mask)
    torch.testing.assert_close(got, naive_per_document(q, k, v, DOCS), atol=1e-5, rtol=1e-5)
    want = megatron(q, k, v, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad(want.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_no_mask_is_causal_and_a_decode_step_sees_every_cached_key():
    sdpa, megatron = attentions()
    q, k, v = qkv(12, 12)
    torch.testing.assert_close(sdpa(q, k, v, None), naive_per_document(q, k, v, [[12], [12]]), atol=1e-5, rtol=1e-5)
    q1 = q[-1:]
    torch.testing.assert_close(sdpa(q1, k, v, None), megatron(q1, k, v, None), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="as many queries as keys"):
        sdpa(q[:3], k, v, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_over_a_left_padded_cache_equals_a_per_row_reference(dtype):
    """The single-query path (two matmuls, grouped heads read in place) against float64 attention row by row over
    each row's own keys: a head reading the wrong group, a mask applied to the wrong keys or scores rounded to bf16
    before the softmax all fail it. A row allowed no key gives zeros, as SDPA does."""
    sdpa, _ = attentions()
    q, k, v = (t.detach() for t in qkv(1, 9, b=4))
    q, k, v = (4 * q).to(dtype), k.to(dtype), v.to(dtype)  # scores of several units: bf16 would round them
    pad = [0, 3, 8, 9]  # row r's first pad[r] cached slots are its prompt's left padding; row 3 may attend nowhere
    padding = (torch.arange(9)[None, :] < torch.tensor(pad)[:, None])[:, None, None, :]  # True: not allowed
    got = sdpa(q, k, v, padding)
    group = CONFIG.num_attention_heads // CONFIG.num_kv_heads
    for row, start in enumerate(pad[:3]):
        qr, kr, vr = q[0, row].double(), k[start:, row].double(), v[start:, row].double()  # [heads, d], [n, groups, d]
        kr, vr = kr.repeat_interleave(group, 1), vr.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", qr, kr) / CONFIG.head_dim ** 0.5
        want = torch.einsum("hn,nhd->hd", scores.softmax(-1), vr).reshape(-1)
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got[0, row].double(), want, atol=tolerance, rtol=tolerance)
    assert got.dtype == dtype and not got[0, 3].any()


def test_query_scale_wraps_sdpa_like_megatrons_attention():
    scaled_sdpa = with_query_scale(SDPAttention)
    scaled_old = with_query_scale(DotProductAttention)
    config = transformer_config(TEMPERATURE, ParallelConfig())
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    positions = positions_of(DOCS)
    scale = query_scale(positions, 0.5, 2)
    assert scale.unique().numel() > 2  # the planted scale really varies along the documents
    q, k, v = qkv(18, 18)
    mask = packed_causal_mask(positions)
    got = scaled_sdpa(**args)(q, k, v, mask, attention_bias=scale)
    torch.testing.assert_close(got, scaled_old(**args)(q, k, v, mask, attention_bias=scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, naive_per_document(q * scale, k, v, DOCS), atol=1e-5, rtol=1e-5)


def test_the_local_spec_builds_sdpa_and_its_logits_equal_the_old_attentions_with_temperature_and_packing():
    model = build_model(TEMPERATURE, ParallelConfig()).eval()
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention) for layer in model.decoder.layers)
    old = build_model(TEMPERATURE, ParallelConfig()).eval()
    old.load_state_dict(model.state_dict())
    for layer in old.decoder.layers:
        layer.self_attention.core_attention = with_query_scale(DotProductAttention)(
            config=old.config, layer_number=layer.layer_number, attn_mask_type=AttnMaskType.causal,
            attention_type="self")
    positions = positions_of(DOCS)
    tokens = torch.randint(0, TEMPERATURE.vocab_size, positions.shape)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions), old(tokens, positions), atol=1e-5, rtol=1e-5)
        whole = torch.arange(18).expand(2, 18)
        torch.testing.assert_close(model(tokens, whole), old(tokens, whole), atol=1e-5, rtol=1e-5)
