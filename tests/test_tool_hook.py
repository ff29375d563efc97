"""The tool hook with a scripted policy (no model): a call in the format's syntax is executed and its rendered
result continues the response exactly as a training conversation renders it; malformed calls answer with an
error; max_calls stops injecting."""

import pytest

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.tool_hook import make_tool_hook
from nemo_plugins.generation.tools import Tool, ToolRegistry, ToolResult

CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}
CONVERSATION = [{"role": "user", "content": "What is 2+3?"},
                {"role": "assistant", "content": "Let me compute.", "tool_calls": [CALL]},
                {"role": "tool", "name": "calculator", "content": "5"},
                {"role": "assistant", "content": "2 + 3 = {5}."}]


@pytest.fixture(scope="module")
def formats():
    return {"hf_template": load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2"))),
            "tekken": load_chat_format("tekken")}


@pytest.fixture
def registry():
    """A one-tool registry that records the expressions it was asked for and answers with a fixed result."""
    asked = []

    def calculator(expression: str) -> ToolResult:
        asked.append(expression)
        return ToolResult("5", True)

    tools = ToolRegistry({"calculator": Tool("Evaluate arithmetic.", {"expression": "the expression"}, calculator)})
    tools.asked = asked
    return tools


def run_scripted(hook, policy_tokens: list[int], index: int = 0) -> tuple[list[int], list[int]]:
    """What the engine does: append each sampled token, call the hook, append what it returns as non-policy."""
    ids, policy = [], []
    for token in policy_tokens:
        ids.append(token)
        policy.append(1)
        injected = hook(index, list(ids)) or []
        ids += injected
        policy += [0] * len(injected)
    return ids, policy


def assistant_spans(encoded) -> list[list[int]]:
    spans, current = [], []
    for token, bit in zip(encoded.tokens + [None], encoded.assistant_mask + [0]):
        if bit:
            current.append(token)
        elif current:
            spans, current = spans + [current], []
    return spans


@pytest.mark.parametrize("kind", ["hf_template", "tekken"])
def test_a_call_is_executed_and_the_response_reads_like_the_training_rendering(formats, registry, kind):
    chat_format = formats[kind]
    encoded = chat_format.encode(CONVERSATION)
    call_turn, answer = assistant_spans(encoded)
    # the policy writes the call (the hook fires before it would close the turn), then the final answer
    response, policy = run_scripted(make_tool_hook(chat_format, registry, max_calls=4), call_turn[:-1] + answer)
    prompt = chat_format.prompt_ids(CONVERSATION[:1])
    assert encoded.tokens[len(prompt) : len(prompt) + len(response)] == response
    assert registry.asked == ["2+3"]
    injected = [k for k, bit in enumerate(policy) if not bit]
    tool_turn = list(range(len(call_turn) - 1, len(response) - len(answer)))
    assert injected == tool_turn, "exactly the tool turn is non-policy"
    expected = {"hf_template": "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n",
                "tekken": "</s>[TOOL_RESULTS]5[/TOOL_RESULTS]"}[kind]
    assert chat_format.decode([response[k] for k in injected]) == expected


@pytest.mark.parametrize("kind, text, expected", [
    ("hf_template", '<tool_call>\n{"name": "calculator", "arguments": {2+3}}\n</tool_call>',
     "<|im_end|>\n<|im_start|>tool\nmalformed tool call: the tool call is not valid JSON"),
    ("tekken", None, "[TOOL_RESULTS]malformed tool call: the arguments of tool call 'calculator' are not valid JSON"),
])
def test_a_malformed_call_gets_an_error_message_and_no_tool_runs(formats, registry, kind, text, expected):
    chat_format = formats[kind]
    if kind == "tekken":
        tekken = chat_format.tokenizer.instruct_tokenizer.tokenizer
        script = [tekken.get_special_token("[TOOL_CALLS]"), *tekken.encode("calculator", bos=False, eos=False),
                  tekken.get_special_token("[ARGS]"), *tekken.encode("{2+3}", bos=False, eos=False), tekken.eos_id]
    else:
        script = chat_format.tokenizer(text, add_special_tokens=False)["input_ids"]
    response, policy = run_scripted(make_tool_hook(chat_format, registry, max_calls=1), script)
    assert registry.asked == []
    tail = chat_format.decode(response[len(script) :])
    assert tail.startswith(expected)
    assert policy == [1] * len(script) + [0] * (len(response) - len(script))


@pytest.mark.parametrize("kind", ["hf_template", "tekken"])
def test_after_max_calls_nothing_is_injected(formats, registry, kind):
    chat_format = formats[kind]
    call_turn = assistant_spans(chat_format.encode(CONVERSATION))[0][:-1]
    hook = make_tool_hook(chat_format, registry, max_calls=2)
    response, policy = run_scripted(hook, call_turn * 3)
    assert registry.asked == ["2+3", "2+3"]
    assert policy.count(1) == 3 * len(call_turn)
    assert response[-len(call_turn) :] == call_turn and all(policy[-len(call_turn) :])
    # the same index with a new, shorter response starts counting again
    run_scripted(hook, call_turn)
    assert len(registry.asked) == 3


def test_negative_max_calls_is_a_config_error(formats, registry):
    with pytest.raises(ConfigError, match="max_calls=-1"):
        make_tool_hook(formats["tekken"], registry, max_calls=-1)
