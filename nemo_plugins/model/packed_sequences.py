"""Packed documents in Transformer Engine's THD layout: cu_seqlens, per-document padding, the context-parallel part.

Training rows hold several documents whose ``position_ids`` restart at 0. The local spec masks them with an
explicit block-diagonal mask; TE's fused kernels ignore masks and take the document boundaries instead, as
cumulative sequence lengths over all rows laid end to end (``PackedSeqParams(qkv_format="thd")``).

Under context parallelism TE needs every document's length to be a multiple of 2 x cp, and splits EACH document
into 2 x cp chunks, rank r holding chunks r and 2cp-1-r (``tex.thd_get_partitioned_indices``). So the batch is
padded and partitioned before the model sees it (``data.batches.local_batch``); the model recovers the global
boundaries from its part of the positions (``cu_seqlens_from_positions``), so no caller has to carry them.

Padding goes after each document's last token and continues its positions. Under causal attention no real token
ever sees a later one, so giving TE the padded lengths as the real ones (``cu_seqlens_q == cu_seqlens_q_padded``)
is exact for every real token; the pads' own outputs are never targets.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_plugins.errors import DataError

# TE's FP8 GEMMs want the token count of every GEMM divisible by 16: each rank's share of a packed batch is.
TOKEN_ALIGNMENT = 16


@dataclass(frozen=True)
class PaddedLayout:
    """Where each slot of the padded, flattened batch comes from: ``source[i]`` indexes the flattened ``[b, s]``
    rows, -1 for padding; ``positions`` are per-document positions of every slot (pads continue their document)."""

    source: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor

    def gather(self, rows: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        """``[b, s]`` -> ``[1, T]`` in the padded layout, ``pad_value`` in the padding."""
        flat = rows.reshape(-1)
        out = flat[self.source.clamp(min=0)]
        return torch.where(self.source >= 0, out, torch.full_like(out, pad_value))[None]


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Flat indices where a document starts in ``[b, s]`` rows read end to end: position 0 or a row start."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts.reshape(-1).nonzero().squeeze(1)


def cu_seqlens_of_rows(position_ids: torch.Tensor) -> torch.Tensor:
    """Cumulative document lengths (int32, ``[documents + 1]``) of unpadded ``[b, s]`` rows read end to end."""
    total = torch.tensor([position_ids.numel()], device=position_ids.device)
    return torch.cat([document_starts(position_ids), total]).to(torch.int32)


def thd_multiples(cp: int, tp: int) -> tuple[int, int]:
    """(each document's length, the whole batch's length) must be multiples of these under context parallelism:
    TE's CP splits every document into 2 x cp chunks; each CP rank's share, and each TP rank's share of that
    under sequence parallelism, must hold a multiple of ``TOKEN_ALIGNMENT`` tokens."""
    return 2 * cp, TOKEN_ALIGNMENT * cp * tp


def pad_documents(position_ids: torch.Tensor, multiple: int, total_multiple: int) -> PaddedLayout:
    """Pad every document of ``[b, s]`` rows (positions 0, 1, ... per document) to a multiple of ``multiple``,
    rows laid end to end; a final padding-only document brings the total to a multiple of ``total_multiple``."""
    if total_multiple % multiple:
        raise ValueError(f"the batch multiple {total_multiple} must be a multiple of the document one {multiple}")
    starts = document_starts(position_ids)
    lengths = torch.diff(starts, append=torch.tensor([position_ids.numel()]))
    padded = (lengths + multiple - 1) // multiple * multiple
    filler = -int(padded.sum()) % total_multiple
    if filler:
        padded = torch.cat([padded, torch.tensor([filler])])
        lengths = torch.cat([lengths, torch.tensor([0])])
        starts = torch.cat([starts, torch.tensor([0])])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), padded.cumsum(0)])
    document = torch.repeat_interleave(torch.arange(len(padded)), padded)
    offset = torch.arange(int(cu_seqlens[-1])) - cu_seqlens[document]
    source = torch.where(offset < lengths[document], starts[document] + offset, -1)
    real = source >= 0
    if not torch.equal(position_ids.reshape(-1)[source[real]], offset[real]):
        raise DataError("position_ids must count 0, 1, 2, ... within every packed document (restarting at 0 at "
                        "each document and row start); these rows do not")
    return PaddedLayout(source=source, positions=offset, cu_seqlens=cu_seqlens.to(torch.int32))


def thd_partition_index(cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Indices of context-parallel rank ``rank``'s tokens in a padded THD batch: of every document, chunks
    ``rank`` and ``2cp-1-rank`` of its 2 x cp equal chunks (TE's ``thd_get_partitioned_indices``)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = torch.diff(cu)
    if bool((lengths % (2 * cp)).any()):
        raise DataError(f"every packed document must be padded to a multiple of 2 x parallel.cp = {2 * cp}: build "
                        "batches with nemo_plugins.data.batches.local_batch")
    chunk = lengths // (2 * cp)
    document = torch.repeat_interleave(torch.arange(len(lengths)), 2 * chunk)
    local_start = torch.cat([torch.zeros(1, dtype=torch.int64), (2 * chunk).cumsum(0)])
    k = torch.arange(int(local_start[-1])) - local_start[document]
    c = chunk[document]
    within = torch.where(k < c, rank * c + k, (2 * cp - 1 - rank) * c + k - c)
    return cu[document] + within


def cu_seqlens_from_positions(positions: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """The global padded cu_seqlens (int32) of a batch from one CP rank's part of its per-document positions.

    Rank r holds, of each document of padded length 2cp x c, positions [rc, (r+1)c) then [(2cp-1-r)c, (2cp-r)c):
    on ranks r > 0 the first position gives c; on rank 0 the first run 0, 1, ... has length c. The result is
    checked by rebuilding this rank's positions from it, so rows that are not such a partition are refused.
    With ``cp == 1`` this is simply the boundaries at position 0 (and row starts).
    """
    if cp == 1:
        return cu_seqlens_of_rows(positions)
    local = positions.reshape(-1).cpu()
    flat = local.tolist()
    breaks = ((torch.diff(local) != 1).nonzero().squeeze(1) + 1).tolist() + [len(flat)]
    lengths, i = [], 0
    while i < len(flat):
        if rank == 0:
            c = breaks[bisect.bisect_right(breaks, i)] - i if flat[i] == 0 else 0
        else:
            c = flat[i] // rank if flat[i] % rank == 0 else 0
        if c < 1:
            break
        lengths.append(2 * cp * c)
        i += 2 * c
    cu = torch.tensor([0] + lengths).cumsum(0)
    expected = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.int64)
    if i != len(flat) or not torch.equal(expected[thd_partition_index(cu, cp, rank)], local):
        raise DataError(f"these position_ids are not context-parallel rank {rank}'s part of padded packed documents "
                        f"(cp={cp}); build batches with nemo_plugins.data.batches.local_batch")
    return cu.to(torch.int32)


def thd_params(cu_seqlens: torch.Tensor, device: torch.device) -> PackedSeqParams:
    """megatron's THD parameters for padded documents: real lengths == padded lengths (exact under causal
    attention, see the module docstring)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int32)
    longest = int(torch.diff(cu_seqlens).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)
