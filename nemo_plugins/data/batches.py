"""Training rows as one rank feeds them to the model: next-token targets, loss masks, the CP part, the device."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.distributed import device
from nemo_plugins.model.masks import is_single_document
from nemo_plugins.model.packed_sequences import pad_documents, thd_multiples, thd_partition_index


def next_token_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (the next token in the row) and a mask that drops each row's last position, which has none."""
    labels = torch.roll(tokens, -1, dims=1)
    mask = torch.ones_like(tokens, dtype=torch.float32)
    mask[:, -1] = 0.0
    return labels, mask


def packed_context_parallel_part(rows: dict[str, torch.Tensor], cp_size: int, cp_rank: int,
                                 tp_size: int) -> dict[str, torch.Tensor]:
    """This CP rank's THD part of packed rows: every document padded to 2 x cp (pads continue its positions, are
    never targets), the rows laid end to end as one ``[1, T / cp]`` row, then each document's chunks r and
    2cp-1-r. The model reads the document boundaries back from these positions."""
    multiple, total_multiple = thd_multiples(cp_size, tp_size)
    layout = pad_documents(rows["positions"], multiple, total_multiple)
    index = thd_partition_index(layout.cu_seqlens, cp_size, cp_rank)
    part = {name: layout.gather(value)[:, index] for name, value in rows.items() if name != "positions"}
    part["positions"] = layout.positions[None, index]
    return part


def local_batch(tokens: torch.Tensor, positions: torch.Tensor,
                target_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch as this rank feeds it to the model: targets made on the whole rows, then every tensor
    cut to this context-parallel rank's part, on this rank's device.

    Under context parallelism, rows that are one document each are cut in megatron's zigzag ``[b, s / cp]``;
    rows of packed documents go to the THD layout (``packed_context_parallel_part``, one row). ``target_mask``
    [b, s] (1 where the token at t+1 is a target, e.g. an assistant token of a conversation) narrows the loss to
    those positions; without it every next token of the row counts.
    """
    labels, mask = next_token_targets(tokens)
    if target_mask is not None:
        mask = mask * target_mask.to(mask.dtype)
    rows = {"tokens": tokens, "positions": positions, "labels": labels, "mask": mask}
    cp_size, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    if cp_size > 1 and not is_single_document(positions):
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        part = packed_context_parallel_part(rows, cp_size, cp_rank, tp_size)
    else:
        part = {name: context_parallel_slice(value, cp_size, cp_rank) for name, value in rows.items()}
    return {name: value.to(device()) for name, value in part.items()}
