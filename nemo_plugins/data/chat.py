"""Chat conversations as token ids with a loss mask that is 1 exactly on the assistant's tokens, in two formats.

Conversations come in the usual ``messages`` form: roles system / user / assistant / tool. An assistant message
may carry ``tool_calls`` (``[{"type": "function", "function": {"name": ..., "arguments": {...} or a JSON
string}}]``) and a reasoning trace in ``thinking`` (alias ``reasoning_content``); its ``content`` is the final
answer, taken verbatim (a think block written inside the content is plain text here: reasoning goes in the
field, so each format can render it its own way). A tool message carries ``content`` and optionally ``name`` and
``tool_call_id`` (default: the oldest unanswered call of the assistant message before it).

Formats behind ``ChatFormat``:
* ``hf_template``: the model's own Hugging Face chat template (SmolLM2-Instruct: ChatML) rendered by the
  tokenizer's ``apply_chat_template``. SmolLM2's template knows nothing of tools or reasoning, so for every
  template this module writes them into the assistant content itself: the trace as ``<think>\\n...\\n</think>\\n``,
  each call in the Hermes / Qwen syntax ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; tool
  results are ``tool`` turns and the available tools are listed in the system message. The same syntax is
  rendered for training and parsed during generation.
* ``tekken``: Mistral's instruct format through PyPI ``mistral-common`` (``[SYSTEM_PROMPT]``, ``[INST]``,
  ``[AVAILABLE_TOOLS]``, ``[TOOL_CALLS]name[ARGS]{...}``, ``[TOOL_RESULTS]``, ``[THINK]...[/THINK]``), tokenizer
  version v13 or later as Ministral 3 uses.

The mask comes from rendering prefix by prefix: the conversation up to an assistant message (with the generation
prompt, e.g. ``...<|im_start|>assistant\\n``) and up to the end of that message must both tokenize as prefixes of
the whole conversation; the assistant's tokens are those in between, through the format's end-of-turn token
(``<|im_end|>``, ``</s>``: the model must learn to stop). Role headers and whatever a template writes after the
end-of-turn token are prompt. A template whose prefixes do not tokenize as prefixes of the whole is refused by
name, never given a wrong mask.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import mistral_common
from jinja2 import TemplateError
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    TextChunk,
    ThinkChunk,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, TokenizerVersion
from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV13
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import SpecialTokenInfo, Tekkenizer

from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.errors import ConfigError, DataError

# Part of every format's fingerprint (token caches): bump when this module renders any conversation differently.
RENDER_VERSION = 1
ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("hf_template", "tekken")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOLS_PREAMBLE = (
    "You may call the tools below. To call one, write\n"
    f'{CALL_OPEN}\n{{"name": <tool name>, "arguments": <arguments object>}}\n{CALL_CLOSE}\n'
    "and its result comes back in a tool message.\n<tools>\n{schemas}\n</tools>"
)

# mistral-common ships Tekken's vocabulary only in version-v3 files, which predate the control tokens Ministral 3
# uses for tool calls and reasoning. Its v13 tokenizer is that vocabulary with these control tokens added at the
# ranks of the released Magistral / Ministral 3 tekken.json files (not verifiable offline: ``tekken_file`` takes
# the released file itself where it is on disk).
SHIPPED_TEKKEN = "tekken_240911.json"
MINISTRAL3_CONTROL_TOKENS = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}
MIN_TEKKEN_VERSION = TokenizerVersion.v13


@dataclass(frozen=True)
class ChatFormatSpec:
    """Which chat format renders the conversations: ``hf_template``, ``tekken`` or ``tekken:/path/tekken.json``
    (``tekken`` alone: Ministral 3's control tokens on mistral-common's shipped vocabulary)."""

    kind: str
    tekken_file: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in FORMATS:
            raise ConfigError(f"chat format {self.kind!r} must be one of {FORMATS} (or tekken:/path/tekken.json)")
        if self.tekken_file is not None:
            if self.kind != "tekken":
                raise ConfigError(f"a tokenizer file is read only by the tekken chat format, not {self.kind!r}")
            if not Path(self.tekken_file).expanduser().is_file():
                raise ConfigError(f"chat format tekken:{self.tekken_file}: no such file")

    @classmethod
    def parse(cls, text: str) -> "ChatFormatSpec":
        kind, sep, location = str(text).partition(":")
        return cls(kind, location if sep else None)


@dataclass(frozen=True)
class EncodedChat:
    """A rendered conversation: its token ids and, per token, 1 where the assistant wrote it."""

    tokens: list[int]
    assistant_mask: list[int]


@dataclass(frozen=True)
class ParsedToolCall:
    """A tool call read from a response. ``error`` says why the call text is unusable (``name`` / ``arguments``
    are then empty); ``ended_turn`` is True when the model itself already closed its turn after the call."""

    name: str
    arguments: dict
    error: str | None = None
    ended_turn: bool = False


def normalize_messages(messages: object) -> list[dict]:
    """Checked canonical copies of a conversation's messages; a ``DataError`` names the message and the problem.

    Canonical forms: ``{"role", "content"}`` for system / user, ``{"role": "tool", "content", "name",
    "tool_call_id"}``, ``{"role": "assistant", "content", "thinking", "tool_calls": [{"id", "name",
    "arguments": dict}]}``. Calls without an id get ``call00000``-style ids (nine characters, as Mistral's
    validators want).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError('"messages" must be a non-empty list of messages')
    out: list[dict] = []
    pending: list[str] = []
    calls_seen = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {i} is not an object")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"message {i}: unknown role {role!r} (expected one of {ROLES})")
        where = f"message {i} ({role})"
        if i == 0 and role not in ("system", "user"):
            raise DataError(f"{where}: a conversation starts with a system or user message")
        if role == "assistant":
            canonical = _assistant(message, where, calls_seen)
            pending = [call["id"] for call in canonical["tool_calls"]]
            calls_seen += len(pending)
        elif role == "tool":
            canonical = {"role": "tool", "content": _text(message, "content", where),
                         "name": _optional_text(message, "name", where),
                         "tool_call_id": _answered_call(message, pending, where)}
        else:
            canonical = {"role": role, "content": _text(message, "content", where)}
            pending = []
        out.append(canonical)
    return out


def normalize_tools(tools: object) -> list[dict]:
    """Available tools as OpenAI function schemas (``{"type": "function", "function": {"name", ...}}``)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise DataError('"tools" must be a list of {"type": "function", "function": {...}} schemas')
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if not named or tool.get("type", "function") != "function":
            raise DataError(f'tools[{k}] must look like '
                            '{"type": "function", "function": {"name": ..., "parameters": ...}}')
    return [dict(tool, type="function") for tool in tools]


def _text(message: dict, key: str, where: str) -> str:
    if key not in message or message[key] is None:
        raise DataError(f"{where}: missing {key}")
    if not isinstance(message[key], str):
        raise DataError(f"{where}: {key} must be a string, got {type(message[key]).__name__}")
    return message[key]


def _optional_text(message: dict, key: str, where: str) -> str | None:
    return None if message.get(key) is None else _text(message, key, where)


def _assistant(message: dict, where: str, first_call: int) -> dict:
    content = _optional_text(message, "content", where) or ""
    if message.get("thinking") is not None and message.get("reasoning_content") is not None:
        raise DataError(f"{where}: give the reasoning trace as thinking or reasoning_content, not both")
    thinking = _optional_text(message, "thinking", where) or _optional_text(message, "reasoning_content", where)
    raw_calls = message.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise DataError(f"{where}: tool_calls must be a list")
    calls = [_tool_call(call, f"{where} tool_calls[{k}]", first_call + k) for k, call in enumerate(raw_calls)]
    if not content and not calls:
        raise DataError(f"{where}: missing content (an assistant message needs content or tool_calls)")
    return {"role": "assistant", "content": content, "thinking": thinking or None, "tool_calls": calls}


def _tool_call(call: object, where: str, number: int) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or call.get("type", "function") != "function":
        raise DataError(f'{where} must look like {{"type": "function", "function": {{"name": ..., "arguments": ...}}}}')
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: function.name must be a non-empty string")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: function.arguments is a string but not valid JSON ({err.msg})") from err
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: function.arguments must be an object (or a JSON string of one)")
    call_id = call.get("id") or f"call{number:05d}"
    if not isinstance(call_id, str):
        raise DataError(f"{where}: id must be a string")
    return {"id": call_id, "name": name, "arguments": arguments}


def _answered_call(message: dict, pending: list[str], where: str) -> str:
    """The id of the call a tool message answers, removed from ``pending``."""
    given = _optional_text(message, "tool_call_id", where)
    if not pending:
        raise DataError(f"{where}: no unanswered tool call before this tool message")
    if given is None:
        return pending.pop(0)
    if given not in pending:
        raise DataError(f"{where}: tool_call_id {given!r} answers none of the open calls {pending}")
    pending.remove(given)
    return given


class ChatFormat(ABC):
    """Renders canonical conversations to token ids and reads tool calls back out of generated ids."""

    name: str  # the format and its tokenizer, for error messages
    end_of_turn_id: int  # closes an assistant turn: a target token, and where generation stops
    pad_id: int  # fills the tail of packed rows (the EOS id)
    vocab_size: int
    fingerprint: str  # changes whenever a conversation could render differently (keys token caches)

    @abstractmethod
    def render(self, messages: list[dict], tools: list[dict], add_generation_prompt: bool) -> list[int]:
        """Token ids of canonical messages; with ``add_generation_prompt`` they end where the assistant writes."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of token ids, control tokens written out."""

    @abstractmethod
    def match_tool_call(self, segment: list[int]) -> ParsedToolCall | None:
        """The tool call that the last token of ``segment`` (an assistant's ids since its turn opened) completes,
        or None while no call is complete."""

    def encode(self, messages: object, tools: object = None) -> EncodedChat:
        """The conversation's ids and its assistant mask (see the module docstring for how it is derived)."""
        messages, tools = normalize_messages(messages), normalize_tools(tools)
        tokens = self.render(messages, tools, add_generation_prompt=False)
        mask = [0] * len(tokens)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._prefix_length(tokens, self.render(messages[:i], tools, add_generation_prompt=True), i)
            end = self._prefix_length(tokens, self.render(messages[: i + 1], tools, add_generation_prompt=False), i + 1)
            closes = [k for k in range(start, end) if tokens[k] == self.end_of_turn_id]
            if not closes:
                raise ConfigError(f"{self.name} does not close assistant message {i} with its end-of-turn token "
                                  f"{self.decode([self.end_of_turn_id])!r}: the model could not learn to stop")
            mask[start : closes[-1] + 1] = [1] * (closes[-1] + 1 - start)
        return EncodedChat(tokens, mask)

    def prompt_ids(self, messages: object, tools: object = None) -> list[int]:
        """Ids that make the model write the next assistant message (the conversation + the generation prompt)."""
        return self.render(normalize_messages(messages), normalize_tools(tools), add_generation_prompt=True)

    def tool_result_ids(self, call: ParsedToolCall, content: str) -> list[int]:
        """Ids to append after a tool call: close the assistant turn (unless the model did), the tool message
        with ``content``, and the prompt that re-opens the assistant turn. Cut out of this format's own rendering
        of a conversation with that call, so they are exactly what training data renders."""
        probe = [{"role": "user", "content": "?"},
                 {"role": "assistant", "tool_calls": [
                     {"type": "function", "function": {"name": call.name or "tool", "arguments": call.arguments}}]}]
        turn = self.encode(probe)
        close = max(k for k, bit in enumerate(turn.assistant_mask) if bit)
        whole = self.prompt_ids(probe + [{"role": "tool", "content": content}])
        self._prefix_length(whole, turn.tokens[:close], 1)
        return whole[close + 1 if call.ended_turn else close :]

    def _prefix_length(self, whole: list[int], prefix: list[int], messages: int) -> int:
        if whole[: len(prefix)] != prefix:
            first = next((k for k, (a, b) in enumerate(zip(whole, prefix)) if a != b), min(len(whole), len(prefix)))
            raise ConfigError(
                f"{self.name}: the first {messages} message(s) render to tokens that are not a prefix of the whole "
                f"conversation's (first difference at token {first}), so the assistant mask cannot be derived "
                "from prefix renderings; an assistant message starting with whitespace that merges with the turn "
                "header does this (strip it), otherwise use a template whose renderings are prefix-stable"
            )
        return len(prefix)


class ChatTemplateFormat(ChatFormat):
    """The tokenizer's own Hugging Face chat template; tools and reasoning written into the content (see above)."""

    def __init__(self, tokenizer, end_of_turn_id: int | None = None) -> None:
        template = tokenizer.chat_template
        if not isinstance(template, str) or not template:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path} has no chat template (tokenizer_config.json "
                              "\"chat_template\"): give the model's instruct tokenizer, or the tekken chat format")
        self.tokenizer = tokenizer
        self.name = f"the chat template of {tokenizer.name_or_path}"
        self.end_of_turn_id = tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id
        self.pad_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        key = (f"hf_template:{RENDER_VERSION}:{tokenizer.name_or_path}:{self.vocab_size}:{self.end_of_turn_id}:"
               f"{template}")
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    @classmethod
    def from_dir(cls, path: str | Path) -> "ChatTemplateFormat":
        return cls(load_tokenizer(path))

    def render(self, messages: list[dict], tools: list[dict], add_generation_prompt: bool) -> list[int]:
        rows = [_template_row(m) for m in messages]
        if tools:
            listing = TOOLS_PREAMBLE.replace("{schemas}", "\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
            if rows[0]["role"] == "system":
                rows[0] = {"role": "system", "content": f"{rows[0]['content']}\n\n{listing}"}
            else:
                rows.insert(0, {"role": "system", "content": listing})
        try:
            text = self.tokenizer.apply_chat_template(rows, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as err:
            raise ConfigError(f"{self.name} cannot render the conversation: {err}") from err
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def match_tool_call(self, segment: list[int]) -> ParsedToolCall | None:
        # a token decodes to at least one character: the last len(CALL_CLOSE) tokens hold the marker if it ends there
        if not segment or not self.decode(segment[-len(CALL_CLOSE) :]).endswith(CALL_CLOSE):
            return None
        text = self.decode(segment)[: -len(CALL_CLOSE)]
        opened = text.rfind(CALL_OPEN)
        if opened < 0:
            return ParsedToolCall("", {}, error=f"{CALL_CLOSE} without a {CALL_OPEN} before it")
        return _parse_call(text[opened + len(CALL_OPEN) :])


def _template_row(message: dict) -> dict:
    """A canonical message as a chat template reads it (reasoning and tool calls inside the content)."""
    if message["role"] != "assistant":
        return {"role": message["role"], "content": message["content"]}
    text = f"{THINK_OPEN}\n{message['thinking']}\n{THINK_CLOSE}\n" if message["thinking"] else ""
    text += message["content"]
    for call in message["tool_calls"]:
        if text and not text.endswith("\n"):
            text += "\n"
        body = json.dumps({"name": call["name"], "arguments": call["arguments"]}, ensure_ascii=False)
        text += f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"
    return {"role": "assistant", "content": text}


def _parse_call(text: str) -> ParsedToolCall:
    """``{"name": ..., "arguments": {...}}`` (arguments may be a JSON string of an object)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError as err:
        return ParsedToolCall("", {}, error=f"the tool call is not valid JSON ({err.msg}): {text.strip()[:200]!r}")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return ParsedToolCall("", {}, error=f'the tool call needs a string "name": {text.strip()[:200]!r}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return ParsedToolCall("", {}, error=f'the "arguments" of tool call {call["name"]!r} must be an object')
    return ParsedToolCall(call["name"], arguments)


class TekkenFormat(ChatFormat):
    """Mistral's instruct format (v13+) encoded by ``mistral-common``; validation in its pipeline-agnostic mode
    so that the prefixes of a conversation encode as well as the whole."""

    def __init__(self, tokenizer: MistralTokenizer, label: str) -> None:
        tekken = tokenizer.instruct_tokenizer.tokenizer
        if not isinstance(tekken, Tekkenizer) or tekken.version < MIN_TEKKEN_VERSION:
            raise ConfigError(f"{label}: the tekken chat format needs a Tekken tokenizer of version "
                              f"{MIN_TEKKEN_VERSION.value} or later (Ministral 3's), got {tekken.version.value}")
        self.tokenizer, self._tekken = tokenizer, tekken
        self.name = f"the Mistral instruct format of {label} ({tekken.version.value})"
        self.end_of_turn_id = self.pad_id = tekken.eos_id
        self.vocab_size = tekken.n_words
        self._tool_calls = tekken.get_special_token("[TOOL_CALLS]")
        self._args = tekken.get_special_token("[ARGS]")
        specials = [tekken.id_to_piece(i) for i in range(tekken.num_special_tokens)]
        key = f"tekken:{RENDER_VERSION}:{label}:{tekken.version.value}:{self.vocab_size}:{specials}"
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path) -> "TekkenFormat":
        path = Path(path).expanduser()
        try:
            tokenizer = MistralTokenizer.from_file(str(path), mode=ValidationMode.agnostic)
        except (MistralCommonException, ValueError, AssertionError) as err:
            raise ConfigError(f"cannot load a Mistral tokenizer from {path}: {err}") from err
        return cls(tokenizer, path.name)

    @classmethod
    def ministral3(cls) -> "TekkenFormat":
        return cls(_ministral3_tokenizer(), f"ministral3 ({SHIPPED_TEKKEN} + v13 control tokens)")

    def render(self, messages: list[dict], tools: list[dict], add_generation_prompt: bool) -> list[int]:
        # the assistant writes right after [/INST] or [/TOOL_RESULTS]: no generation prompt to add
        try:
            request = ChatCompletionRequest(messages=[_mistral_message(m) for m in messages],
                                            tools=[Tool.model_validate(t) for t in tools] or None)
            return self.tokenizer.encode_chat_completion(request).tokens
        except (MistralCommonException, ValueError, AssertionError) as err:
            raise ConfigError(f"{self.name} cannot encode the conversation: {err}") from err

    def decode(self, ids: list[int]) -> str:
        return self._tekken.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)

    def match_tool_call(self, segment: list[int]) -> ParsedToolCall | None:
        # [TOOL_CALLS]name[ARGS]{json}: complete when the arguments parse as an object, or when the turn ends;
        # only a closing brace or the end-of-turn token can complete one, which keeps the per-token cost flat
        ended = bool(segment) and segment[-1] == self.end_of_turn_id
        if not segment or not (ended or "}" in self.decode(segment[-1:])) or self._tool_calls not in segment:
            return None
        last = len(segment) - 1 - segment[::-1].index(self._tool_calls)
        body = segment[last + 1 : -1] if ended else segment[last + 1 :]
        if self._args not in body:
            return ParsedToolCall("", {}, error="a tool call without [ARGS]", ended_turn=True) if ended else None
        split = body.index(self._args)
        name, arguments = self.decode(body[:split]).strip(), self.decode(body[split + 1 :])
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError as err:
            if not ended:
                return None
            return ParsedToolCall("", {}, error=f"the arguments of tool call {name!r} are not valid JSON ({err.msg})",
                                  ended_turn=True)
        if not isinstance(parsed, dict) or not name:
            return ParsedToolCall("", {}, error=f"tool call {name!r} needs a name and an object of arguments",
                                  ended_turn=ended)
        return ParsedToolCall(name, parsed, ended_turn=ended)


def _mistral_message(message: dict):
    role = message["role"]
    if role == "system":
        return SystemMessage(content=message["content"])
    if role == "user":
        return UserMessage(content=message["content"])
    if role == "tool":
        return ToolMessage(content=message["content"], tool_call_id=message["tool_call_id"], name=message["name"])
    content = message["content"] or None
    if message["thinking"]:
        text = [TextChunk(text=content)] if content else []
        content = [ThinkChunk(thinking=message["thinking"], closed=True)] + text
    calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"],
                                                        arguments=json.dumps(c["arguments"], ensure_ascii=False)))
             for c in message["tool_calls"]]
    return AssistantMessage(content=content, tool_calls=calls or None)


@functools.lru_cache(maxsize=1)
def _ministral3_tokenizer() -> MistralTokenizer:
    """Ministral 3's v13 instruct tokenizer on the Tekken vocabulary shipped in mistral-common (see above)."""
    data = json.loads((Path(mistral_common.__file__).parent / "data" / SHIPPED_TEKKEN).read_text())
    config = data["config"]
    named = ({int(t["rank"]): str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
             | MINISTRAL3_CONTROL_TOKENS)
    specials = [SpecialTokenInfo(rank=r, token_str=named.get(r, Tekkenizer.SPECIAL_TOKEN_TEMPLATE.format(id=r)),
                                 is_control=True)
                for r in range(max(named) + 1)]
    tekken = Tekkenizer(data["vocab"], specials, config["pattern"], config["default_vocab_size"],
                        config["default_num_special_tokens"], MIN_TEKKEN_VERSION, name="ministral3-tekken")
    return MistralTokenizer(InstructTokenizerV13(tekken),
                            validator=get_validator(MIN_TEKKEN_VERSION, ValidationMode.agnostic),
                            request_normalizer=get_normalizer(MIN_TEKKEN_VERSION))


def load_chat_format(spec: str | ChatFormatSpec, tokenizer_dir: str | Path | None = None) -> ChatFormat:
    """The format a spec names; ``hf_template`` renders with the model's tokenizer in ``tokenizer_dir``."""
    spec = spec if isinstance(spec, ChatFormatSpec) else ChatFormatSpec.parse(spec)
    if spec.kind == "tekken":
        return TekkenFormat.from_file(spec.tekken_file) if spec.tekken_file else TekkenFormat.ministral3()
    if tokenizer_dir is None:
        raise ConfigError("the hf_template chat format renders with the model's own tokenizer: no tokenizer "
                          "directory given")
    return ChatTemplateFormat.from_dir(tokenizer_dir)
