"""The glue from a chat format's tool-call syntax and a tool registry to the generation engine's ``ToolHook``.

The engine calls the hook after every sampled token with (request index, that response's ids so far). The hook
reads the response since its assistant turn last opened; when the last token completes a tool call in the
format's syntax (``ChatFormat.match_tool_call``) it runs the call through the registry and returns the ids that
close the assistant turn, carry the tool message and re-open the assistant turn (``ChatFormat.tool_result_ids``,
cut from the format's own rendering, so a rollout reads exactly like a training conversation). The engine
appends them as non-policy tokens and decoding continues. A malformed call gets a tool message with the parse
error (ok=False) instead of a crash; after ``max_calls`` calls in one response nothing more is injected and the
response ends the usual way.

A hook keeps per-response state (calls made, where the current assistant segment starts): make one per
``generate`` call.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import ToolHook
from nemo_plugins.generation.tools import ToolCall, ToolRegistry, ToolResult


@dataclass
class _Progress:
    calls: int = 0
    segment_start: int = 0  # where the assistant turn last (re)opened in the response


def make_tool_hook(chat_format: ChatFormat, registry: ToolRegistry, max_calls: int) -> ToolHook:
    """A hook that executes the tool calls ``chat_format`` reads in a response, at most ``max_calls`` each."""
    if max_calls < 0:
        raise ConfigError(f"max_calls={max_calls} must be >= 0 (0 executes no tool call)")
    progress: dict[int, _Progress] = {}

    def hook(index: int, ids: list[int]) -> list[int] | None:
        state = progress.setdefault(index, _Progress())
        if len(ids) < state.segment_start:  # the index now holds a new response
            state = progress[index] = _Progress()
        if state.calls >= max_calls:
            return None
        call = chat_format.match_tool_call(ids[state.segment_start :])
        if call is None:
            return None
        if call.error is not None:
            result = ToolResult(f"malformed tool call: {call.error}", False)
        else:
            result = registry.call(ToolCall(call.name, call.arguments))
        injected = chat_format.tool_result_ids(call, result.content)
        state.calls += 1
        state.segment_start = len(ids) + len(injected)
        return injected

    return hook
