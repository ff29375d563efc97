"""Per-sequence log-probs of sampled responses under a megatron model: what preference losses compare.

A sample (prompt ids, response ids, policy mask) becomes one training row: prompt + response, padded, positions
0..n-1 (one document). The rows of one call are as wide as its longest sample, rounded up to ``ROW_MULTIPLE``, not
``seq_len``: ``seq_len`` must hold the longest possible response (the paper's 32K then 80K generation limits) while
most responses are far shorter, and every pad column costs attention, MLP and vocabulary work forward and backward.
A row's target mask is 1 at position t iff token t + 1 is a response token the policy sampled: tool output the
engine injected (policy mask 0) is context, never scored, and neither are prompt and padding. The row's log-prob
is the sum over those targets of log p(token).

log p comes from the model's own label path: ``model(tokens, positions, labels=...)`` returns megatron's
per-token cross-entropy, computed by ``vocab_parallel_cross_entropy`` on each TP rank's vocabulary slice of the
logits (fp32), so the full-vocabulary logits never exist on one rank, sequence and pipeline parallelism work
as in pretraining, and the gradient is megatron's. Context parallelism is refused: a row's sum would be split
over the CP ranks, and the DPO loss is not linear in it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.data.batches import local_batch
from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError

Sample = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt ids, response ids, response policy mask)
# a row's width is a multiple of this: FP8 GEMMs need token counts divisible by 16, sequence parallelism by TP
ROW_MULTIPLE = 16


def check_layout() -> None:
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ConfigError("sequence log-probs sum a row's response tokens on one rank: parallel.cp must be 1 for "
                          "preference training (the DPO loss is not linear in the per-rank partial sums)")


def sample_rows(samples: Sequence[Sample | None], seq_len: int, pad_id: int) -> tuple[torch.Tensor, ...]:
    """``(tokens, positions, target_mask)`` [n, width] for ``samples``, width the longest sample rounded up to
    ``ROW_MULTIPLE`` and at most ``seq_len``; a ``None`` sample is a padding row with no target (so every rank runs
    the same number of rows whatever it skipped)."""
    lengths = [len(s[0]) + len(s[1]) for s in samples if s is not None]
    if max(lengths, default=0) > seq_len:
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit in a row of {seq_len}")
    width = min(seq_len, -(-max(lengths, default=1) // ROW_MULTIPLE) * ROW_MULTIPLE)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    target_mask = torch.zeros(len(samples), width)
    for row, sample in enumerate(samples):
        if sample is None:
            continue
        prompt, response, policy = sample
        length = len(prompt) + len(response)
        tokens[row, :length] = torch.tensor([*prompt, *response])
        target_mask[row, len(prompt) - 1 : length - 1] = torch.tensor(policy, dtype=torch.float32)
    positions = torch.arange(width).expand(len(samples), -1).contiguous()
    return tokens, positions, target_mask


def target_token_losses(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """megatron's per-token cross-entropy ``[b, s]`` from the final hidden states ``[s, b, h]`` (``forward(...,
    return_hidden=True)``), with the output layer and the loss run on the target positions (``mask > 0``) only;
    zero elsewhere. A row of a GRPO batch is a prompt, then a response: the prompt's positions are never scored,
    yet had their logits made and their fp32 cross-entropy over the vocabulary computed (SmolLM2's demo child in
    bf16 on 2 CPU cores, 16 rows of 96 tokens with 40 scored: forward + backward 3.84 s -> 3.31 s).
    The same layer and loss function run on fewer rows, so each scored position's value and gradient are the full
    forward's. Needs whole rows on this rank: no sequence or context parallelism (the generation engine's
    layouts)."""
    if model.config.sequence_parallel or parallel_state.get_context_parallel_world_size() > 1:
        raise ConfigError("target-position logits need each row's hidden states on one rank: parallel.cp must be 1 "
                          "and sequence_parallel false")
    where = mask > 0
    scored = hidden.transpose(0, 1)[where]  # [n, h], row-major over [b, s] like ``labels[where]``
    logits, _ = model.output_layer(scored[:, None], weight=model.output_weight())  # [n, 1, vocab / tp]
    losses = model.compute_language_model_loss(labels[where][None], logits)  # [1, n]
    return losses.new_zeros(mask.shape).masked_scatter(where, losses[0])


def micro_batches(rows: tuple[torch.Tensor, ...], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of ``size`` rows as the model takes them (labels, mask, this rank's device)."""
    return [local_batch(*part) for part in zip(*(t.split(size) for t in rows))]


def sequence_logprobs(per_token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b] sums of log p over each row's targets, from megatron's per-token cross-entropy [b, s]."""
    return -(per_token_loss.float() * mask).sum(-1)


@torch.no_grad()
def frozen_sequence_logprobs(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sequence log-probs of every row of ``batches`` under a frozen model (the reference), on every rank of its
    pipeline: all micro-batches go through one forward-only schedule (the pipeline fills once), then the last
    stage's sums are shared over the pipeline group."""
    check_layout()

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        loss = chunk(batch["tokens"], batch["positions"], labels=batch["labels"])

        def keep(per_token_loss):
            zero = torch.zeros((), device=per_token_loss.device)
            return zero, {"sums": sequence_logprobs(per_token_loss, batch["mask"])}

        return loss, keep

    first = batches[0]["tokens"]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
        seq_length=first.shape[1], micro_batch_size=first.shape[0], forward_only=True)
    rows = sum(b["tokens"].shape[0] for b in batches)
    if parallel_state.is_pipeline_last_stage():
        sums = torch.cat([out["sums"] for out in outputs]).to(device(), torch.float32)
    else:
        sums = torch.zeros(rows, device=device())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    return sums
