"""Packed documents in the THD layout: cu_seqlens, padding and the CP partition against slow references, and the
model's THD path (with a naive THD attention standing in for TE's kernel) against the local spec's masked path."""

import pytest
import torch
from megatron.core.transformer.module import MegatronModule

from nemo_plugins.data.batches import next_token_targets, packed_context_parallel_part
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import DataError
from nemo_plugins.model.attention_temperature import with_query_scale
from nemo_plugins.model.builder import build_model
from nemo_plugins.model.config import YarnScaling
from nemo_plugins.model.packed_sequences import (
    cu_seqlens_from_positions,
    cu_seqlens_of_rows,
    pad_documents,
    thd_partition_index,
)
from tests.conftest import tiny_config


def packed_positions(rows: list[list[int]]) -> torch.Tensor:
    """``[b, s]`` per-document positions from each row's document lengths."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


ROWS = [[5, 1, 9, 3], [7, 11]]  # two rows of 18 tokens, a one-token document among them


def slow_cu_seqlens(positions: torch.Tensor) -> list[int]:
    cu, offset = [0], 0
    for row in positions.tolist():
        for i, p in enumerate(row):
            if i > 0 and p == 0:
                cu.append(offset + i)
        offset += len(row)
        cu.append(offset)
    return cu


def slow_pad(positions: torch.Tensor, multiple: int, total_multiple: int) -> tuple[list[int], list[int]]:
    """(source index or -1 per padded slot, padded cu_seqlens), document by document."""
    flat, row_len = positions.reshape(-1).tolist(), positions.shape[1]
    source, cu, begin = [], [0], 0
    for k in range(1, len(flat) + 1):
        if k == len(flat) or flat[k] == 0 or k % row_len == 0:
            n = k - begin
            padded = -(-n // multiple) * multiple
            source += list(range(begin, k)) + [-1] * (padded - n)
            cu.append(cu[-1] + padded)
            begin = k
    filler = -cu[-1] % total_multiple
    if filler:
        source += [-1] * filler
        cu.append(cu[-1] + filler)
    return source, cu


def slow_partition(cu: list[int], cp: int, rank: int) -> list[int]:
    """TE's thd_get_partitioned_indices, written out: each document in 2cp chunks, chunks rank and 2cp-1-rank."""
    index = []
    for start, end in zip(cu, cu[1:]):
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            index += list(range(start + c * chunk, start + (c + 1) * chunk))
    return index


def test_cu_seqlens_of_rows_match_a_slow_scan():
    positions = packed_positions(ROWS)
    assert cu_seqlens_of_rows(positions).tolist() == slow_cu_seqlens(positions) == [0, 5, 6, 15, 18, 25, 36]
    assert cu_seqlens_of_rows(positions).dtype == torch.int32


@pytest.mark.parametrize("multiple,total_multiple", [(4, 4), (4, 32), (6, 48), (2, 2)])
def test_padding_matches_a_slow_reference(multiple, total_multiple):
    positions = packed_positions(ROWS)
    layout = pad_documents(positions, multiple, total_multiple)
    source, cu = slow_pad(positions, multiple, total_multiple)
    assert layout.source.tolist() == source
    assert layout.cu_seqlens.tolist() == cu
    assert cu[-1] % total_multiple == 0 and all((b - a) % multiple == 0 for a, b in zip(cu, cu[1:]))
    # pads continue their document's positions; every real token keeps its own
    for start, end in zip(cu, cu[1:]):
        assert layout.positions[start:end].tolist() == list(range(end - start))
    real = layout.source >= 0
    assert sorted(layout.source[real].tolist()) == list(range(positions.numel()))


def test_padding_refuses_positions_that_do_not_count_per_document():
    with pytest.raises(DataError, match="position_ids must count"):
        pad_documents(torch.tensor([[0, 1, 3, 4]]), 2, 2)


@pytest.mark.parametrize("cp", [2, 4])
def test_partition_matches_te_semantics_and_tiles_the_batch(cp):
    layout = pad_documents(packed_positions(ROWS), 2 * cp, 16 * cp)
    cu = layout.cu_seqlens
    parts = [thd_partition_index(cu, cp, rank) for rank in range(cp)]
    for rank, part in enumerate(parts):
        assert part.tolist() == slow_partition(cu.tolist(), cp, rank)
    assert sorted(torch.cat(parts).tolist()) == list(range(int(cu[-1])))


@pytest.mark.parametrize("cp", [2, 4])
def test_each_rank_reads_the_global_boundaries_back_from_its_positions(cp):
    layout = pad_documents(packed_positions(ROWS), 2 * cp, 16 * cp)
    for rank in range(cp):
        local = layout.positions[None, thd_partition_index(layout.cu_seqlens, cp, rank)]
        assert torch.equal(cu_seqlens_from_positions(local, cp, rank), layout.cu_seqlens)


def test_unpartitioned_positions_are_refused_under_context_parallelism():
    positions = packed_positions(ROWS)
    for rank in range(2):
        with pytest.raises(DataError, match="local_batch"):
            cu_seqlens_from_positions(positions, 2, rank)


@pytest.mark.parametrize("cp,tp", [(2, 1), (4, 1), (2, 2)])
def test_context_parallel_part_keeps_tokens_labels_masks_and_positions_aligned(cp, tp):
    """Every real token lands on exactly one CP rank with its own position, label and mask; pads are never targets."""
    positions = packed_positions(ROWS)
    tokens = torch.arange(positions.numel()).view(positions.shape) + 3  # a token names its slot
    labels, mask = next_token_targets(tokens)
    mask[0, 2] = 0.0
    rows = {"tokens": tokens, "positions": positions, "labels": labels, "mask": mask}
    seen = []
    for rank in range(cp):
        part = {k: v[0] for k, v in packed_context_parallel_part(rows, cp, rank, tp_size=tp).items()}
        assert len(part["tokens"]) % (16 * tp) == 0
        for t, p, y, m in zip(*(part[k].tolist() for k in ("tokens", "positions", "labels", "mask"))):
            if t == 0:  # padding
                assert m == 0
                continue
            source = t - 3
            seen.append(source)
            assert (p, y, m) == (positions.view(-1)[source], labels.view(-1)[source], mask.view(-1)[source])
        assert torch.equal(cu_seqlens_from_positions(part["positions"][None], cp, rank),
                           pad_documents(positions, 2 * cp, 16 * cp * tp).cu_seqlens)
    assert sorted(seen) == list(range(positions.numel()))


class ThdReferenceAttention(MegatronModule):
    """What TE's kernel computes, written naively: causal attention within each packed document of a THD batch
    (``cu_seqlens_q_padded``), or over each whole row for sbhd input. Lets the model's THD path run on CPU."""

    def __init__(self, config, layer_number=None, attn_mask_type=None, attention_type=None, **_):
        super().__init__(config)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert attention_mask is None
        if packed_seq_params is None:  # [s, b, n, d]: each row one document
            s, b = query.shape[:2]
            outs = [self._attend(query[:, i], key[:, i], value[:, i], torch.zeros(s, dtype=torch.long))
                    for i in range(b)]
            return torch.stack(outs, 1).reshape(s, b, -1)
        cu = packed_seq_params.cu_seqlens_q_padded.long()
        docs = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu))
        return self._attend(query, key, value, docs).reshape(query.shape[0], -1)

    def _attend(self, q, k, v, docs):
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = torch.einsum("tnd,snd->nts", q.float(), k.float()) / q.shape[-1] ** 0.5
        n = q.shape[0]
        allowed = (docs[:, None] == docs[None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("nts,snd->tnd", probs, v.float()).to(q.dtype)


# YaRN and an attention temperature that steps every 4 positions: both must follow the documents
TEMPERATURE = tiny_config(architecture="Ministral3ForCausalLM", rope_theta=1_000_000.0, max_position_embeddings=64,
                          rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=4, beta_fast=32.0,
                                                   beta_slow=1.0),
                          attention_temperature_beta=0.5)


def thd_twin(model):
    """A copy of ``model`` that takes the Transformer Engine path (THD), with the naive THD attention."""
    twin = build_model(TEMPERATURE, ParallelConfig())
    twin.load_state_dict(model.state_dict())
    attention_cls = with_query_scale(ThdReferenceAttention)
    for layer in twin.decoder.layers:
        layer.self_attention.core_attention = attention_cls(twin.config)
    twin.uses_transformer_engine = True
    return twin.eval()


def test_thd_path_equals_the_local_block_diagonal_path():
    """Logits, per-token losses and hidden states through THD (cu_seqlens, per-document RoPE and temperature)
    equal the local spec's masked path on the same packed rows."""
    local = build_model(TEMPERATURE, ParallelConfig()).eval()
    thd = thd_twin(local)
    positions = packed_positions(ROWS)
    tokens = torch.randint(0, TEMPERATURE.vocab_size, positions.shape)
    labels, _ = next_token_targets(tokens)
    with torch.no_grad():
        assert thd._thd_params(positions) is not None
        torch.testing.assert_close(thd(tokens, positions), local(tokens, positions), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(thd(tokens, positions, labels=labels), local(tokens, positions, labels=labels),
                                   atol=1e-5, rtol=1e-5)
        hidden_thd = thd(tokens, positions, return_hidden=True)
        hidden_local = local(tokens, positions, return_hidden=True)
    assert hidden_thd.shape == (positions.numel(), 1, TEMPERATURE.hidden_size)
    torch.testing.assert_close(hidden_thd[:, 0], hidden_local.transpose(0, 1).reshape(-1, TEMPERATURE.hidden_size),
                               atol=1e-5, rtol=1e-5)


def test_thd_boundaries_matter():
    """Guards the test above: the same rows read as one document each give other logits."""
    local = build_model(TEMPERATURE, ParallelConfig()).eval()
    thd = thd_twin(local)
    positions = packed_positions(ROWS)
    tokens = torch.randint(0, TEMPERATURE.vocab_size, positions.shape)
    whole = torch.arange(positions.shape[1]).expand_as(positions)
    with torch.no_grad():
        assert thd._thd_params(whole) is None
        assert (thd(tokens, positions) - thd(tokens, whole)).abs().max() > 1e-3


def test_padded_documents_give_the_same_logits_at_real_tokens():
    """The CP padding (pads after each document, continuing its positions) changes nothing for real tokens."""
    local = build_model(TEMPERATURE, ParallelConfig()).eval()
    thd = thd_twin(local)
    positions = packed_positions(ROWS)
    tokens = torch.randint(0, TEMPERATURE.vocab_size, positions.shape)
    layout = pad_documents(positions, 4, 64)
    with torch.no_grad():
        padded = thd(layout.gather(tokens), layout.positions[None])[0]
        plain = local(tokens, positions).reshape(positions.numel(), -1)
    real = layout.source >= 0
    torch.testing.assert_close(padded[real], plain[layout.source[real]], atol=1e-5, rtol=1e-5)


def test_reference_attention_is_the_local_one_on_single_documents():
    local = build_model(TEMPERATURE, ParallelConfig()).eval()
    thd = thd_twin(local)
    tokens = torch.randint(0, TEMPERATURE.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        torch.testing.assert_close(thd(tokens, positions), local(tokens, positions), atol=1e-5, rtol=1e-5)

