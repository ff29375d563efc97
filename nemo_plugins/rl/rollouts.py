"""Sampling from the policy being trained: n seeded responses per prompt through the generation engine, with the
policy's tool calls executed. Online DPO draws pairs (n = 2), GRPO draws groups (n = G).

Request j of prompt i has seed ``seeds[i] + j``: a step's responses depend only on its seeds (derived from the
data cursor), never on the batch they were decoded in, so a resumed run samples exactly what the uninterrupted
one did. A prompt that leaves no room for ``max_new_tokens`` in ``seq_len`` gets no responses (None): the caller
counts it as skipped.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_prompts import Prompt
from nemo_plugins.generation.engine import Request, Response, SamplingParams, ToolHook
from nemo_plugins.generation.tool_hook import make_tool_hook
from nemo_plugins.generation.tools import default_tools
from nemo_plugins.generation.torch_engine import TorchEngine
from nemo_plugins.sandbox import SandboxLimits


class Sampling(Protocol):
    """What sampling needs from a stage's settings (``ODPOSampling``, ``GRPOSampling``)."""

    max_new_tokens: int
    max_batch_size: int
    tools: bool
    max_tool_calls: int
    sandbox: SandboxLimits

    def params(self, seed: int, stop_id: int) -> SamplingParams: ...


def tool_calls(response: Response) -> int:
    """Injected tool messages in a response: runs of non-policy tokens."""
    mask = response.policy_mask
    return sum(1 for i, bit in enumerate(mask) if bit == 0 and (i == 0 or mask[i - 1] == 1))


def response_text(chat_format: ChatFormat, response: Response) -> str:
    """What a reward reads: the decoded response (thinking and tool turns included), its end-of-turn removed."""
    ids = response.token_ids
    if ids and ids[-1] == chat_format.end_of_turn_id:
        ids = ids[:-1]
    return chat_format.decode(ids)


def tool_hook(chat_format: ChatFormat, sampling: Sampling) -> ToolHook | None:
    """The hook that runs the policy's tool calls during sampling (default tools, the stage's sandbox limits:
    a call that hangs comes back as a timeout message and the response goes on)."""
    if not sampling.tools:
        return None
    return make_tool_hook(chat_format, default_tools(sampling.sandbox), sampling.max_tool_calls)


def sample_groups(model: torch.nn.Module, prompts: Sequence[Prompt], seeds: Sequence[int], n: int,
                  chat_format: ChatFormat, sampling: Sampling, seq_len: int,
                  hook: ToolHook | None) -> list[list[Response] | None]:
    """``n`` responses per prompt (request seeds ``seed .. seed + n - 1``), None for a prompt without room. A
    collective over the model's TP group."""
    room = seq_len - sampling.max_new_tokens
    fits = [i for i, p in enumerate(prompts) if len(p.ids) <= room]
    requests = [Request(prompts[i].ids, sampling.params(seeds[i] + j, chat_format.end_of_turn_id))
                for i in fits for j in range(n)]
    responses = (TorchEngine(model, sampling.max_batch_size, chat_format.pad_id).generate(requests, hook)
                 if requests else [])
    groups: list[list[Response] | None] = [None] * len(prompts)
    for k, i in enumerate(fits):
        groups[i] = responses[n * k : n * (k + 1)]
    return groups
