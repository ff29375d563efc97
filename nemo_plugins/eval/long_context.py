"""Long-context evaluation: perplexity by position bucket and synthetic passkey retrieval, plus their plot.

Passkey retrieval is scored teacher-forced (one forward per prompt): a hit means the model's argmax predicts
every token of the key after "The pass key is". That is exact match of greedy decoding of the key, at the
cost of one forward instead of one per generated token.

Every forward runs in the model's training layout, which is what lets it reach the long stage's contexts (a
262,144-token window only fits split over CP ranks). Rows are right-padded to a length each rank can take
(``sequence_multiple``): a causal model never attends from a real token to the padding, and the padding is never
scored. They are then cut for context parallelism exactly like training batches (``context_parallel_slice``):
each CP rank scores the positions it holds and the partial sums add up over CP (``sum_from_last_stage``).
Data-parallel ranks split the windows and the prompts.

Windows are bounded by the data (``heldout_windows``): held-out text shorter than the windows asked for gives
the longest window it holds instead, recorded with the results, never a crash before training.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state

from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.distributed import device
from nemo_plugins.errors import DataError
from nemo_plugins.eval.perplexity import token_stream
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import full_sequence, sum_from_last_stage, vocab_parallel_argmax

logger = logging.getLogger(__name__)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
IGNORE = -1  # target of a position that is not scored (padding, prompt tokens)


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    """Geometric position buckets [0, e1), [e1, e2), ... ending at ``seq_len`` (long tails get their own)."""
    edges = sorted({0, *(int(seq_len / 2 ** k) for k in range(buckets - 1, -1, -1))})
    return edges


def sequence_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """The lengths a model in this layout can take are the multiples of this: 2 x CP chunks under context
    parallelism, and each CP rank's part (``s / cp``) a multiple of TP under sequence parallelism."""
    chunk = math.lcm(2 if cp > 1 else 1, tp if sequence_parallel else 1)
    return cp * chunk


def model_multiple(model: torch.nn.Module) -> int:
    """``sequence_multiple`` of the layout ``model`` was built in."""
    config = model.config
    return sequence_multiple(config.tensor_model_parallel_size, config.context_parallel_size, config.sequence_parallel)


def pad_rows(tokens: torch.Tensor, targets: torch.Tensor, multiple: int) -> tuple[torch.Tensor, ...]:
    """``[b, s]`` tokens and targets right-padded to a multiple of ``multiple``, with their positions (which run
    on through the padding: one document, whose real tokens never see its tail)."""
    length = -(-tokens.shape[1] // multiple) * multiple
    extra = length - tokens.shape[1]
    positions = torch.arange(length).expand(tokens.shape[0], -1)
    return F.pad(tokens, (0, extra), value=0), positions, F.pad(targets, (0, extra), value=IGNORE)


def model_rows(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(tokens, positions, targets) as this rank feeds them to ``model``: padded for its layout, its CP part."""
    cp_size, cp_rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
    return tuple(context_parallel_slice(t, cp_size, cp_rank).to(device())
                 for t in pad_rows(tokens, targets, model_multiple(model)))


def bucket_sums(nll: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """``[buckets, 2]`` (NLL sum, token count) of the scored tokens of ``[b, s]`` by position bucket; any subset of
    a row's positions (one CP rank's) gives its part of the row's sums."""
    scored = targets != IGNORE
    bucket = torch.bucketize(positions[scored], torch.tensor(edges[1:-1], device=positions.device), right=True)
    sums = torch.zeros(len(edges) - 1, 2, dtype=torch.float64, device=nll.device)
    sums[:, 0].index_add_(0, bucket, nll[scored].double())
    sums[:, 1].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    return sums


@torch.no_grad()
def perplexity_by_position(model: torch.nn.Module, windows: torch.Tensor, buckets: int = 4,
                           micro_batch_size: int = 1) -> list[dict]:
    """Next-token perplexity of ``[n, seq_len + 1]`` windows, per bucket of target position."""
    seq_len = windows.shape[1] - 1
    edges = bucket_edges(seq_len, buckets)
    totals = torch.zeros(len(edges) - 1, 2, dtype=torch.float64)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    for rows in windows[dp_rank::dp_size].split(micro_batch_size):
        tokens, positions, targets = model_rows(model, rows[:, :-1], rows[:, 1:])
        for out in forward_only(model, [(tokens, positions, targets.clamp(min=0))],
                                lambda nll, p=positions, t=targets: {"sums": bucket_sums(nll, p, t, edges).cpu()}):
            totals += out["sums"]
    totals = sum_from_last_stage(totals.flatten()).view(-1, 2).cpu()
    return [{"start": a, "end": b, "perplexity": math.exp(s / c)}
            for (a, b), (s, c) in zip(zip(edges, edges[1:]), totals.tolist())]


def heldout_windows(tokenizer, documents: Iterable[tuple[str, str]], seq_len: int, count: int, multiple: int,
                    source: str) -> tuple[torch.Tensor, dict]:
    """Up to ``count`` ``[seq_len + 1]`` windows of the EOS-joined text, and what was evaluated. Text shorter than
    that gives the longest window it holds (a multiple of ``multiple``, the layout's), as many as fit: the
    numbers stay comparable between models evaluated on the same text. Less than one ``multiple``: a DataError
    naming ``source`` (the config key of the text)."""
    stream = token_stream(tokenizer, documents, count * (seq_len + 1))
    length = seq_len if len(stream) >= seq_len + 1 else (len(stream) - 1) // multiple * multiple
    if length < multiple:
        raise DataError(f"{source} holds {len(stream)} tokens of text: too few for a long-context window (at least "
                        f"{multiple + 1} tokens); add held-out text there")
    n = min(count, len(stream) // (length + 1))
    record = {"window_tokens": length, "windows": n, "asked": {"window_tokens": seq_len, "windows": count},
              "text_tokens": len(stream)}
    if length < seq_len:
        logger.warning("%s holds %d tokens of text, less than one window of %d: evaluating %d window(s) of %d tokens",
                       source, len(stream), seq_len + 1, n, length)
    windows = torch.tensor(stream[: n * (length + 1)], dtype=torch.long).view(n, length + 1)
    return windows, record


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids of about ``length`` tokens with the key hidden at ``depth`` of the filler, key ids)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    fixed = len(tokenizer(needle + question, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - fixed - 8) // per_filler)
    before = int(repeats * depth)
    text = FILLER * before + needle + FILLER * (repeats - before) + question
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    return prompt, tokenizer(" " + key, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def answer_tokens_right(model: torch.nn.Module, examples: list[tuple[list[int], list[int]]]) -> list[int]:
    """Per ``(prompt, answer)``: how many answer tokens the model's argmax predicts, teacher-forced (one forward
    of ``prompt + answer[:-1]``). Data-parallel ranks split the examples; every rank returns the whole list."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    wrong, scored = torch.zeros(len(examples), dtype=torch.float64), torch.zeros(len(examples), dtype=torch.float64)
    for i in range(dp_rank, len(examples), dp_size):
        prompt, answer = examples[i]
        ids = torch.tensor([prompt + answer[:-1]])
        targets = torch.full_like(ids, IGNORE)
        targets[0, len(prompt) - 1:] = torch.tensor(answer)
        tokens, positions, targets = model_rows(model, ids, targets)

        def reduce(hidden, targets=targets):
            predicted = vocab_parallel_argmax(model, full_sequence(hidden, model.config.sequence_parallel)[:, 0])
            mask = targets[0] != IGNORE
            return {"wrong": (predicted[mask] != targets[0, mask]).sum().item(), "scored": mask.sum().item()}

        for out in forward_only(model, [(tokens, positions, None)], reduce, forward_kwargs={"return_hidden": True}):
            wrong[i], scored[i] = out["wrong"], out["scored"]
    wrong, scored = sum_from_last_stage(torch.cat([wrong, scored])).cpu().view(2, -1)
    return [int(s - w) for w, s in zip(wrong.tolist(), scored.tolist())]


def passkey_accuracy(model: torch.nn.Module, tokenizer, lengths: list[int], samples: int, seed: int = 0) -> list[dict]:
    """Per length: the fraction of prompts whose key the model reproduces exactly (teacher-forced argmax), and of
    key tokens it gets right."""
    rng = random.Random(seed)
    results = []
    for length in lengths:
        examples = [passkey_prompt(tokenizer, length, depth=(i + 0.5) / samples,
                                   key="".join(rng.choice("0123456789") for _ in range(5))) for i in range(samples)]
        right = answer_tokens_right(model, examples)
        keys = [len(answer) for _, answer in examples]
        results.append({"length": length, "accuracy": sum(r == k for r, k in zip(right, keys)) / samples,
                        "token_accuracy": sum(right) / sum(keys), "samples": samples})
    return results


def plot_long_context(curves: dict[str, dict], path: str | Path) -> None:
    """Perplexity by position bucket and passkey accuracy by length, one line per evaluated model state."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, result in curves.items():
        buckets = result["position_perplexity"]
        left.plot([b["end"] for b in buckets], [b["perplexity"] for b in buckets], marker="o", label=label)
        keys = result["passkey"]
        right.plot([k["length"] for k in keys], [k["accuracy"] for k in keys], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="target position (bucket end)", ylabel="perplexity",
             title="perplexity by position")
    right.set(xscale="log", ylim=(-0.05, 1.05), xlabel="prompt length (tokens)", ylabel="accuracy",
              title="passkey retrieval")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
