"""Forward-only passes over micro-batches through megatron's schedules (so PP/TP/DP all work)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.distributed import device


@torch.no_grad()
def forward_only(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    reduce: Callable[[torch.Tensor], dict] | None = None,
    forward_kwargs: dict | None = None,
) -> list[dict]:
    """Run ``(tokens, position_ids, labels|None)`` batches; on the last stage ``reduce(output)`` per batch.

    ``output`` is megatron's per-token loss ``[b, s]`` when labels are given, else the logits (or, with
    ``forward_kwargs={"return_hidden": True}``, the final hidden states). Returns the reduced dicts on the
    last pipeline stage, an empty list elsewhere. Batches are this CP rank's part (``local_batch``): the schedule
    is told the whole row's length, which it divides by the CP size for the pipeline's tensor shapes.
    """
    model.eval()
    results: list[dict] = []
    forward_backward = get_forward_backward_func()

    def forward_step(data_iterator, chunk):
        tokens, positions, labels = (t.to(device()) if t is not None else None for t in next(data_iterator))
        output = chunk(tokens, positions, labels=labels, **(forward_kwargs or {}))

        def loss_func(out):
            return torch.zeros((), device=out.device), (reduce(out) if reduce else {})

        return output, loss_func

    for batch in batches:
        tokens = batch[0]
        results.extend(
            forward_backward(
                forward_step_func=forward_step,
                data_iterator=iter([batch]),
                model=[model],
                num_microbatches=1,
                seq_length=tokens.shape[1] * parallel_state.get_context_parallel_world_size(),
                micro_batch_size=tokens.shape[0],
                forward_only=True,
            )
        )
    return results
