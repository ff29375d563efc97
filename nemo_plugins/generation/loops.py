"""Loop detection: a response that repeats a span verbatim, or runs to its length limit without stopping.

Online DPO makes a looping response the loser automatically and GRPO/SFT filters drop them, so the engine
reports a verdict for every response (and, by default, stops a looping one early instead of spending the
rest of its token budget).

The rule is one count: a response loops when some n-gram of ``ngram`` tokens has occurred ``repeats`` times
(occurrences may overlap). A cycle of any period p repeats each of its n-grams once per period, so every
verbatim cycle is caught after about ``repeats`` periods (``ngram + (repeats - 1) * p`` tokens when p <= n),
while natural text almost never repeats a 16-token span 5 times. Counting costs one dict update per token,
so the engine checks every sampled token as it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from nemo_plugins.errors import ConfigError

REPEATED_NGRAM = "repeated_ngram"
NO_STOP = "no_stop"


@dataclass
class LoopConfig:
    """``ngram`` tokens seen ``repeats`` times is a loop; ``stop_on_loop`` ends generation there ("loop")."""

    ngram: int = 16
    repeats: int = 5
    stop_on_loop: bool = True

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ConfigError(f"loop.ngram must be >= 1, got {self.ngram}")
        if self.repeats < 2:
            raise ConfigError(f"loop.repeats must be >= 2 (one occurrence is not a repetition), got {self.repeats}")


@dataclass(frozen=True)
class LoopVerdict:
    """Why a response is flagged. ``position``: index (in the response's sampled tokens) where it was detected;
    for ``repeated_ngram`` also the n-gram and how often it had occurred."""

    reason: str
    position: int
    ngram: tuple[int, ...] = ()
    count: int = 0


class NgramCounter:
    """Occurrence counts of every n-gram seen so far, fed one token at a time."""

    def __init__(self, config: LoopConfig) -> None:
        self.config = config
        self.tokens: list[int] = []
        self.counts: dict[tuple[int, ...], int] = {}

    def push(self, token: int) -> LoopVerdict | None:
        """Add a token; the verdict when the n-gram it completes reaches the threshold."""
        self.tokens.append(token)
        n = self.config.ngram
        if len(self.tokens) < n:
            return None
        key = tuple(self.tokens[-n:])
        count = self.counts.get(key, 0) + 1
        self.counts[key] = count
        if count >= self.config.repeats:
            return LoopVerdict(REPEATED_NGRAM, len(self.tokens) - 1, key, count)
        return None


def find_loop(tokens: Iterable[int], config: LoopConfig) -> LoopVerdict | None:
    """The first point at which ``tokens`` loop, or None."""
    counter = NgramCounter(config)
    for token in tokens:
        verdict = counter.push(token)
        if verdict is not None:
            return verdict
    return None


def no_stop(sampled: int) -> LoopVerdict:
    """The verdict for a response that reached its length limit without a stop token."""
    return LoopVerdict(NO_STOP, max(sampled - 1, 0))
