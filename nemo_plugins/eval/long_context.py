"""Long-context evaluation: perplexity by position bucket and synthetic passkey retrieval, plus their plot.

Passkey retrieval is scored teacher-forced (one forward per prompt): a hit means the model's argmax predicts
every token of the key after "The pass key is". That is exact match of greedy decoding of the key, at the
cost of one forward instead of one per generated token.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from nemo_plugins.distributed import device
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import full_sequence, sum_from_last_stage, vocab_parallel_argmax

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def bucket_edges(seq_len: int, buckets: int) -> list[int]:
    """Geometric position buckets [0, e1), [e1, e2), ... ending at ``seq_len`` (long tails get their own)."""
    edges = sorted({0, *(int(seq_len / 2 ** k) for k in range(buckets - 1, -1, -1))})
    return edges


@torch.no_grad()
def perplexity_by_position(model: torch.nn.Module, windows: torch.Tensor, buckets: int = 4,
                           micro_batch_size: int = 1) -> list[dict]:
    """Next-token perplexity of ``[n, seq_len + 1]`` windows, per bucket of target position."""
    seq_len = windows.shape[1] - 1
    edges = bucket_edges(seq_len, buckets)
    totals = torch.zeros(len(edges) - 1, 2, dtype=torch.float64)
    positions = torch.arange(seq_len).expand(micro_batch_size, -1)

    def reduce(loss):  # [b, s] per-token NLL
        per_position = loss.double().sum(0).cpu()
        return {"sums": torch.stack([per_position[a:b].sum() for a, b in zip(edges, edges[1:])]),
                "count": torch.tensor([loss.shape[0] * (b - a) for a, b in zip(edges, edges[1:])], dtype=torch.float64)}

    batches = [(w[:, :-1].to(device()), positions[: len(w)].to(device()), w[:, 1:].to(device()))
               for w in windows.split(micro_batch_size)]
    for out in forward_only(model, batches, reduce):
        totals[:, 0] += out["sums"]
        totals[:, 1] += out["count"]
    totals = sum_from_last_stage(totals.flatten()).view(-1, 2).cpu()
    return [{"start": a, "end": b, "perplexity": math.exp(s / c)} for (a, b), (s, c) in zip(zip(edges, edges[1:]), totals.tolist())]


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> tuple[list[int], list[int]]:
    """(prompt ids of about ``length`` tokens with the key hidden at ``depth`` of the filler, key ids)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    fixed = len(tokenizer(needle + question, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    repeats = max(1, (length - fixed - 8) // per_filler)
    before = int(repeats * depth)
    text = FILLER * before + needle + FILLER * (repeats - before) + question
    return tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer(" " + key, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def passkey_accuracy(model: torch.nn.Module, tokenizer, lengths: list[int], samples: int, seed: int = 0) -> list[dict]:
    """Fraction of prompts per length whose key the model reproduces exactly (teacher-forced argmax)."""
    rng = random.Random(seed)
    results = []
    for length in lengths:
        hits = 0
        for i in range(samples):
            key = "".join(rng.choice("0123456789") for _ in range(5))
            prompt, answer = passkey_prompt(tokenizer, length, depth=(i + 0.5) / samples, key=key)
            ids = torch.tensor([prompt + answer[:-1]], device=device())
            positions = torch.arange(ids.shape[1], device=device())[None]
            targets = torch.tensor(answer, device=device())
            span = slice(len(prompt) - 1, len(prompt) - 1 + len(answer))
            outputs = forward_only(model, [(ids, positions, None)],
                                   lambda hidden: {"hit": _argmax_matches(model, full_sequence(hidden, model.config.sequence_parallel)[span, 0], targets)},
                                   forward_kwargs={"return_hidden": True})
            hits += int(sum_from_last_stage(torch.tensor([float(outputs[0]["hit"]) if outputs else 0.0])).item() > 0)
        results.append({"length": length, "accuracy": hits / samples, "samples": samples})
    return results


def _argmax_matches(model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> bool:
    return bool((vocab_parallel_argmax(model, hidden) == targets).all())


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
