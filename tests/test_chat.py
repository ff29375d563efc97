"""Chat formats: renderings and assistant masks against hand-written expectations (SmolLM2's real ChatML template,
the real Tekken tokenizer of mistral-common), prefix-unstable templates refused, tool-call syntax round trips."""

import json
from pathlib import Path

import mistral_common
import pytest
from transformers import AutoTokenizer

from nemo_plugins.convert.sources import ModelSource, embedded_gguf, gguf_chat_template, tokenizer_dir
from nemo_plugins.data.chat import (
    ChatFormatSpec,
    ChatTemplateFormat,
    ParsedToolCall,
    load_chat_format,
    normalize_messages,
)
from nemo_plugins.errors import ConfigError, DataError

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
CALL = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}}}}

CONVERSATIONS = {
    "single_turn": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}],
    "multi_turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi there."},
                   {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}],
    "system_prompt": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "Bonjour"}],
    "tool": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "tool_calls": [CALL]},
             {"role": "tool", "name": "calculator", "content": "5"}, {"role": "assistant", "content": "2 + 3 = 5."}],
    "think": [{"role": "user", "content": "Is 7 prime?"},
              {"role": "assistant", "content": "Yes.", "thinking": "7 has no divisors but 1 and 7."}],
}

# (whole rendering, assistant-masked spans) written out by hand
EXPECTED = {
    "hf_template": {
        "single_turn": (SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n",
                        ["5<|im_end|>"]),
        "multi_turn": (SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
                       "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nGoodbye.<|im_end|>\n",
                       ["Hi there.<|im_end|>", "Goodbye.<|im_end|>"]),
        "system_prompt": ("<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                          "<|im_start|>assistant\nBonjour<|im_end|>\n", ["Bonjour<|im_end|>"]),
        "tool": (SMOL_SYSTEM + "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
                 '{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>\n'
                 "<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n2 + 3 = 5.<|im_end|>\n",
                 ['<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call><|im_end|>',
                  "2 + 3 = 5.<|im_end|>"]),
        "think": (SMOL_SYSTEM + "<|im_start|>user\nIs 7 prime?<|im_end|>\n<|im_start|>assistant\n"
                  "<think>\n7 has no divisors but 1 and 7.\n</think>\nYes.<|im_end|>\n",
                  ["<think>\n7 has no divisors but 1 and 7.\n</think>\nYes.<|im_end|>"]),
    },
    "tekken": {
        "single_turn": ("<s>[INST]What is 2+3?[/INST]5</s>", ["5</s>"]),
        "multi_turn": ("<s>[INST]Hi[/INST]Hi there.</s>[INST]Bye[/INST]Goodbye.</s>",
                       ["Hi there.</s>", "Goodbye.</s>"]),
        "system_prompt": ("<s>[SYSTEM_PROMPT]Answer in French.[/SYSTEM_PROMPT][INST]Hello[/INST]Bonjour</s>",
                          ["Bonjour</s>"]),
        "tool": ('<s>[INST]What is 2+3?[/INST][TOOL_CALLS]calculator[ARGS]{"expression": "2+3"}</s>'
                 "[TOOL_RESULTS]5[/TOOL_RESULTS]2 + 3 = 5.</s>",
                 ['[TOOL_CALLS]calculator[ARGS]{"expression": "2+3"}</s>', "2 + 3 = 5.</s>"]),
        "think": ("<s>[INST]Is 7 prime?[/INST][THINK]7 has no divisors but 1 and 7.[/THINK]Yes.</s>",
                  ["[THINK]7 has no divisors but 1 and 7.[/THINK]Yes.</s>"]),
    },
}


@pytest.fixture(scope="module")
def smol_dir():
    return tokenizer_dir(ModelSource.parse("embedded:smollm2"))


@pytest.fixture(scope="module")
def formats(smol_dir):
    return {"hf_template": load_chat_format("hf_template", smol_dir), "tekken": load_chat_format("tekken")}


def masked_spans(chat_format, messages, tools=None) -> tuple[str, list[str]]:
    encoded = chat_format.encode(messages, tools)
    assert len(encoded.tokens) == len(encoded.assistant_mask)
    spans, current = [], []
    for token, bit in zip(encoded.tokens + [None], encoded.assistant_mask + [0]):
        if bit:
            current.append(token)
        elif current:
            spans.append(chat_format.decode(current))
            current = []
    return chat_format.decode(encoded.tokens), spans


@pytest.mark.parametrize("kind", ["hf_template", "tekken"])
@pytest.mark.parametrize("case", list(CONVERSATIONS))
def test_assistant_mask_matches_the_hand_made_expectation(formats, kind, case):
    assert masked_spans(formats[kind], CONVERSATIONS[case]) == EXPECTED[kind][case]


def test_the_gguf_conversion_carries_smollm2_chat_template(smol_dir):
    config = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == gguf_chat_template(embedded_gguf("smollm2"))
    assert "<|im_start|>" in config["chat_template"]


def test_reasoning_content_and_json_string_arguments_are_the_same_message(formats):
    for chat_format in formats.values():
        alias = [CONVERSATIONS["think"][0], {"role": "assistant", "content": "Yes.",
                                             "reasoning_content": "7 has no divisors but 1 and 7."}]
        assert chat_format.encode(alias) == chat_format.encode(CONVERSATIONS["think"])
        as_string = json.loads(json.dumps(CONVERSATIONS["tool"]))
        as_string[1]["tool_calls"][0]["function"]["arguments"] = '{"expression": "2+3"}'
        assert chat_format.encode(as_string) == chat_format.encode(CONVERSATIONS["tool"])


def test_available_tools_are_listed_and_stay_prompt(formats):
    text, spans = masked_spans(formats["hf_template"], CONVERSATIONS["tool"], [CALCULATOR])
    assert text.startswith("<|im_start|>system\nYou may call the tools below.")
    assert "<tools>\n" + json.dumps(CALCULATOR) + "\n</tools><|im_end|>\n<|im_start|>user\nWhat is 2+3?" in text
    assert spans == EXPECTED["hf_template"]["tool"][1]
    text, spans = masked_spans(formats["tekken"], CONVERSATIONS["tool"], [CALCULATOR])
    assert text.startswith('<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "calculator"')
    assert spans == EXPECTED["tekken"]["tool"][1]


@pytest.mark.parametrize("kind", ["hf_template", "tekken"])
def test_prompt_ids_end_where_the_assistant_writes(formats, kind):
    chat_format = formats[kind]
    whole = chat_format.encode(CONVERSATIONS["multi_turn"])
    prompt = chat_format.prompt_ids(CONVERSATIONS["multi_turn"][:3])
    assert whole.tokens[: len(prompt)] == prompt
    assert chat_format.decode(whole.tokens[len(prompt):]).startswith("Goodbye.")
    assert whole.assistant_mask[len(prompt) - 1] == 0 and whole.assistant_mask[len(prompt)] == 1


def _with_template(smol_dir, template: str) -> ChatTemplateFormat:
    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    tokenizer.chat_template = template
    return ChatTemplateFormat(tokenizer)


def test_a_template_whose_prefixes_are_not_prefixes_is_refused_by_name(smol_dir):
    counting = ("{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ConfigError, match=f"chat template of {smol_dir}.*not a prefix of the whole"):
        _with_template(smol_dir, counting).encode(CONVERSATIONS["single_turn"])


def test_a_template_that_never_ends_the_turn_is_refused(smol_dir):
    plain = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    refusal = "does not close assistant message 1 with its end-of-turn token '<\\|im_end\\|>'"
    with pytest.raises(ConfigError, match=refusal):
        _with_template(smol_dir, plain).encode(CONVERSATIONS["single_turn"])


def test_leading_whitespace_that_merges_with_the_header_is_refused_not_mismasked(formats):
    with pytest.raises(ConfigError, match="not a prefix.*starting with whitespace"):
        formats["hf_template"].encode([{"role": "user", "content": "x"}, {"role": "assistant", "content": "\n\nHi"}])


def test_a_tokenizer_without_template_and_a_pre_v13_tekken_are_refused(smol_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(smol_dir))
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="has no chat template"):
        ChatTemplateFormat(tokenizer)
    old = Path(mistral_common.__file__).parent / "data" / "tekken_240718.json"
    with pytest.raises(ConfigError, match="needs a Tekken tokenizer of version v13 or later.*got v3"):
        load_chat_format(f"tekken:{old}")


@pytest.mark.parametrize("spec, match", [("chatml", "must be one of"), ("tekken:/no/such/tekken.json", "no such file"),
                                         ("hf_template:/x", "read only by the tekken")])
def test_format_spec_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        ChatFormatSpec.parse(spec)


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: unknown role 'bot'"),
    ([{"role": "user"}, {"role": "assistant", "content": "b"}], r"message 0 \(user\): missing content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"message 1 \(assistant\): missing content"),
    ([{"role": "assistant", "content": "b"}], "starts with a system or user message"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "5"}], "no unanswered tool call"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}],
     "arguments is a string but not valid JSON"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "content": "b", "thinking": "t", "reasoning_content": "t"}],
     "thinking or reasoning_content, not both"),
    ([], "non-empty list"),
])
def test_bad_messages_name_the_message_and_the_problem(messages, match):
    with pytest.raises(DataError, match=match):
        normalize_messages(messages)


def test_tool_messages_answer_calls_in_order_and_calls_get_ids():
    messages = normalize_messages([
        {"role": "user", "content": "a"},
        {"role": "assistant", "tool_calls": [CALL, dict(CALL, id="mine")]},
        {"role": "tool", "content": "x", "tool_call_id": "mine"}, {"role": "tool", "content": "y"}])
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["call00000", "mine"]
    assert [m["tool_call_id"] for m in messages[2:]] == ["mine", "call00000"]


@pytest.mark.parametrize("kind", ["hf_template", "tekken"])
def test_a_rendered_call_parses_back_exactly_when_its_last_token_arrives(formats, kind):
    chat_format = formats[kind]
    encoded = chat_format.encode(CONVERSATIONS["tool"])
    start = encoded.assistant_mask.index(1)
    close = encoded.tokens.index(chat_format.end_of_turn_id, start)
    call_ids = encoded.tokens[start:close]
    found = [chat_format.match_tool_call(call_ids[:j]) for j in range(1, len(call_ids) + 1)]
    assert found[:-1] == [None] * (len(call_ids) - 1)
    assert found[-1] == ParsedToolCall("calculator", {"expression": "2+3"})


def test_tekken_call_closed_by_the_end_of_turn_and_malformed_calls(formats):
    tekken = formats["tekken"]
    encoded = tekken.encode(CONVERSATIONS["tool"])
    start = encoded.assistant_mask.index(1)
    closed = encoded.tokens[start : encoded.tokens.index(tekken.end_of_turn_id, start) + 1]
    assert tekken.match_tool_call(closed) == ParsedToolCall("calculator", {"expression": "2+3"}, ended_turn=True)
    tekkenizer = tekken.tokenizer.instruct_tokenizer.tokenizer
    tool_calls, args = tekkenizer.get_special_token("[TOOL_CALLS]"), tekkenizer.get_special_token("[ARGS]")
    bad = [tool_calls, *tekkenizer.encode("calculator", bos=False, eos=False), args,
           *tekkenizer.encode('{"expression": 2+}', bos=False, eos=False)]
    assert tekken.match_tool_call(bad) is None  # could still be completed
    parsed = tekken.match_tool_call(bad + [tekken.end_of_turn_id])
    assert parsed.ended_turn and "not valid JSON" in parsed.error
    assert "without [ARGS]" in tekken.match_tool_call([tool_calls, 1234, tekken.end_of_turn_id]).error


def test_chatml_malformed_call_is_an_error_not_a_crash(formats):
    chatml = formats["hf_template"]
    text = "Let me compute.\n<tool_call>\n{\"name\": calculator}\n</tool_call>"
    ids = chatml.tokenizer(text, add_special_tokens=False)["input_ids"]
    parsed = chatml.match_tool_call(ids)
    assert parsed.name == "" and "not valid JSON" in parsed.error
    no_name = chatml.tokenizer('<tool_call>{"arguments": {}}</tool_call>', add_special_tokens=False)["input_ids"]
    assert 'needs a string "name"' in chatml.match_tool_call(no_name).error


@pytest.mark.parametrize("kind, ended, expected", [
    ("hf_template", False, "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n"),
    ("tekken", False, "</s>[TOOL_RESULTS]5[/TOOL_RESULTS]"),
    ("tekken", True, "[TOOL_RESULTS]5[/TOOL_RESULTS]"),
])
def test_tool_result_ids_close_the_turn_add_the_result_and_reopen(formats, kind, ended, expected):
    call = ParsedToolCall("calculator", {"expression": "2+3"}, ended_turn=ended)
    assert formats[kind].decode(formats[kind].tool_result_ids(call, "5")) == expected
