"""The next token of each request from full-vocabulary logits: greedy, temperature, top-k, top-p, seeded.

Each request draws its randomness from its own CPU ``torch.Generator`` (seeded from ``SamplingParams.seed``),
one uniform number per sampled token, so its tokens do not depend on the other requests in the batch or on
their order, nor on the device. The token is where that number falls in the request's cumulative distribution
(inverse-CDF sampling, what ``multinomial`` does for one draw; the sum runs in float64 so that no token's share
is off by the sum's rounding): token i with probability p_i. One draw per token, not one per vocabulary entry:
an exponential race over the vocabulary drew 49,152 numbers per token and took 2/3 of the CPU sampling time at
128 rows. The numbers are drawn ``RequestDraws.BLOCK`` at a time (one ``torch.rand`` call per request per
block, not per token: 128 scalar draws per decode step were 6 % of a GRPO-shaped decode). Every TP rank holds
the same full-vocabulary logits and the same draws, so every rank picks the same token.

The returned log-prob is under the model's plain distribution (temperature 1, no top-k/top-p filtering):
the quantity the policy losses compare against a training forward, independent of the sampling settings.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nemo_plugins.generation.engine import SamplingParams


class RequestDraws:
    """One request's stream of float64 uniforms in [0, 1): a seeded CPU generator read ``BLOCK`` numbers at a time."""

    BLOCK = 64

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.block: list[float] = []
        self.used = 0

    def next_uniform(self) -> float:
        if self.used == len(self.block):
            self.block = torch.rand(self.BLOCK, dtype=torch.float64, generator=self.generator).tolist()
            self.used = 0
        self.used += 1
        return self.block[self.used - 1]


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``-inf`` outside each row's top-k and then outside the smallest set of those whose mass reaches top-p
    (the order transformers applies them). ``top_k`` [n] (0 = off), ``top_p`` [n] (1 = off)."""
    if not bool((top_k > 0).any()) and not bool((top_p < 1).any()):
        return logits
    ordered, order = logits.sort(-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = (top_k[:, None] > 0) & (ranks[None] >= top_k[:, None])
    ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop = drop | ((top_p[:, None] < 1) & (mass_before >= top_p[:, None]))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered.masked_fill(drop, float("-inf")))


def choose_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  draws: Sequence[RequestDraws]) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` [n, vocab] fp32 for n requests -> (token ids [n], their plain log-probs [n]); a sampled
    request takes the next number of its ``draws``, a greedy one none."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        top_k = torch.tensor([params[i].top_k for i in sampled], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
        chosen_logits = logits if len(sampled) == len(params) else logits.index_select(0, index)
        probs = filter_top_k_top_p(chosen_logits / temperature[:, None], top_k, top_p).softmax(-1)
        cumulative = probs.to(torch.float64).cumsum(-1)
        uniform = torch.tensor([draws[i].next_uniform() for i in sampled], dtype=torch.float64,
                               device=logits.device)
        # right=True: the first entry whose cumulative mass exceeds the draw, never a token of probability 0
        chosen = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True)[:, 0]
        tokens[index] = chosen.clamp(max=logits.shape[-1] - 1)
    logprobs = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    return tokens, logprobs
