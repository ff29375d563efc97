"""Perplexity of a (TP/PP/DP-parallel) megatron model on token windows, through megatron's schedules.

A non-finite result is an error naming the non-finite weights (if any), never a ``nan`` in a report."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from nemo_plugins.distributed import device
from nemo_plugins.errors import DataError, NonFiniteError
from nemo_plugins.model.forward import forward_only


def token_stream(tokenizer, documents: Iterable[tuple[str, str]], limit: int) -> list[int]:
    """The EOS-joined token stream of ``documents``, read until it holds ``limit`` tokens (or the text ends)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for _, text in documents:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        if len(stream) >= limit:
            break
    return stream


def token_windows(tokenizer, documents: Iterable[tuple[str, str]], seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len + 1]`` windows of the EOS-joined token stream (inputs + shifted labels)."""
    stream = token_stream(tokenizer, documents, max_windows * (seq_len + 1))
    n = min(max_windows, len(stream) // (seq_len + 1))
    if n == 0:
        raise DataError(f"only {len(stream)} tokens of text: fewer than one window of {seq_len + 1}")
    return torch.tensor(stream[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


@dataclass(frozen=True)
class PerplexityResult:
    tokens: int
    mean_nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "mean_nll": self.mean_nll, "perplexity": self.perplexity}


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, windows: torch.Tensor, micro_batch_size: int = 4,
                        progress: bool = True) -> PerplexityResult:
    """Mean next-token NLL over all windows; data-parallel ranks take interleaved windows."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = windows[dp_rank::dp_size]
    seq_len = windows.shape[1] - 1
    positions = torch.arange(seq_len).expand(micro_batch_size, -1)
    bar = tqdm(total=len(mine) * seq_len, unit="tok", unit_scale=True, desc="perplexity",
               disable=not progress or dist.get_rank() != 0)

    def batches():
        for i in range(0, len(mine), micro_batch_size):
            batch = mine[i : i + micro_batch_size]
            yield batch[:, :-1], positions[: len(batch)], batch[:, 1:]
            bar.update(batch.numel() - len(batch))

    outputs = forward_only(model, batches(), lambda loss: {"nll_sum": loss.double().sum(), "tokens": loss.numel()})
    bar.close()
    totals = torch.zeros(2, dtype=torch.float64, device=device())
    if parallel_state.get_tensor_model_parallel_rank() == 0:  # TP ranks hold the same loss
        for out in outputs:
            totals[0] += out["nll_sum"]
            totals[1] += out["tokens"]
    dist.all_reduce(totals)
    result = PerplexityResult(tokens=int(totals[1].item()), mean_nll=(totals[0] / totals[1]).item())
    if not math.isfinite(result.mean_nll):
        bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
        listed = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        cause = f"the model holds non-finite weights ({listed})" if bad else "the logits overflow (try dtype=float32)"
        raise NonFiniteError(f"the mean NLL over {result.tokens} tokens is {result.mean_nll}: {cause}")
    return result
