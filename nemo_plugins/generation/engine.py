"""What every generation backend takes and returns: requests, sampling parameters, responses, tool hooks.

A backend knows nothing about tokenisation, chat formats or losses: token ids in, token ids out, plus what
the losses need per generated token (its log-prob, and whether the policy produced it). Tools stay out of
the engine too: the chat-format layer supplies a ``ToolHook`` that recognises a finished tool call in the
response so far, runs the tool and returns the rendered tool message as ids to inject.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.generation.loops import LoopConfig, LoopVerdict

FINISH_REASONS = ("stop", "length", "loop")

# Called after every sampled token with (request index, that response's ids so far); ids it returns are
# appended to the response (policy_mask 0, log-prob 0), run through the model, and decoding continues.
ToolHook = Callable[[int, list[int]], "list[int] | None"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 are off.

    ``seed`` makes a request reproducible whatever else is in the batch: requests that must differ (the G
    samples of one prompt in GRPO) need different seeds. ``max_new_tokens`` bounds the whole response,
    injected tool output included, so a request's KV cache has a known size.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"sampling.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if len(self.prompt_ids) == 0:
            raise DataError("a generation request needs at least one prompt token (e.g. BOS): its prompt rendered "
                            "to nothing")
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))


@dataclass
class Response:
    """One request's result. ``token_ids`` is everything after the prompt, the stop token and injected tool
    output included. ``logprobs[i]`` is log p(token_ids[i]) under the model's plain distribution (temperature
    1, no top-k/top-p): what policy-gradient and DPO losses need, whatever the sampling settings were; 0 for
    injected tokens. ``policy_mask[i]`` is 1 where the model sampled the token, 0 where it was injected."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    policy_mask: list[int] = field(default_factory=list)
    finish_reason: str = ""
    loop: LoopVerdict | None = None


class GenerationBackend(Protocol):
    def generate(self, requests: Sequence[Request], tool_hook: ToolHook | None = None) -> list[Response]:
        """Responses in the order of ``requests``; a collective over the tensor-parallel group."""
        ...
