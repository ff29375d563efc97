"""Greedy chat answers of a model to a few user prompts, rendered with the model's chat format: what a run report
shows before and after a post-training stage. With ``tools`` the prompts offer the default tools (calculator,
sandboxed Python) and the calls the model makes are executed during generation, their output part of the answer."""

from __future__ import annotations

from typing import Protocol

import torch

from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.generation.engine import Request, SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.generation.tool_hook import make_tool_hook
from nemo_plugins.generation.tools import default_tools
from nemo_plugins.generation.torch_engine import TorchEngine

MAX_TOOL_CALLS = 4


class SampleSettings(Protocol):
    prompts: list[str]
    max_new_tokens: int
    tools: bool


def chat_samples(model: torch.nn.Module, chat_format: ChatFormat, settings: SampleSettings) -> list[dict]:
    """``[{"prompt", "response", "finish_reason"}]``, one per prompt; the response stops at the end of the
    assistant turn or after ``max_new_tokens`` (a looping answer runs to the end, as a report should show it)."""
    if not settings.prompts:
        return []
    params = SamplingParams(temperature=0.0, max_new_tokens=settings.max_new_tokens,
                            stop_token_ids=(chat_format.end_of_turn_id,), loop=LoopConfig(stop_on_loop=False))
    registry = default_tools() if settings.tools else None
    schemas = registry.schemas() if registry else None
    requests = [Request(tuple(chat_format.prompt_ids([{"role": "user", "content": prompt}], schemas)), params)
                for prompt in settings.prompts]
    hook = make_tool_hook(chat_format, registry, MAX_TOOL_CALLS) if registry else None
    responses = TorchEngine(model, pad_id=chat_format.pad_id).generate(requests, hook)
    return [{"prompt": prompt, "response": chat_format.decode(response.token_ids),
             "finish_reason": response.finish_reason}
            for prompt, response in zip(settings.prompts, responses)]
