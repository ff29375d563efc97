"""A tool call end to end: the generation engine, SmolLM2's real chat format, the real tool registry (calculator
and sandboxed Python). A scripted policy writes the call; the tool's real output must be what continues the
response, masked out of the policy, and the whole response must read exactly like the training rendering."""

import types

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.generation.engine import Request, SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.generation.tool_hook import make_tool_hook
from nemo_plugins.generation.tools import SandboxLimits, default_tools
from nemo_plugins.generation.torch_engine import TorchEngine

DIGITS = 256  # token ids are written in two base-256 digits: a hidden state of 2 x 256 one-hots


class PositionScriptedModel(torch.nn.Module):
    """Stand-in for MistralGPTModel: at position p it predicts ``script[p + 1]``, whatever it was fed (teacher
    forcing of one fixed rendering). Where the script holds a wrong token, only injected ids can be right."""

    uses_transformer_engine = False

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script = script
        self.config = types.SimpleNamespace(pipeline_model_parallel_size=1, context_parallel_size=1,
                                            sequence_parallel=False, params_dtype=torch.float32)
        self.decoder = types.SimpleNamespace(layers=[])
        ids = torch.arange(vocab_size)
        self.weight = torch.cat([torch.nn.functional.one_hot(ids // DIGITS, vocab_size // DIGITS + 1),
                                 torch.nn.functional.one_hot(ids % DIGITS, DIGITS)], 1).float()

    def forward(self, tokens, positions, attention_mask=None, inference_context=None, return_hidden=False):
        nxt = torch.tensor([self.script[p + 1] for p in positions[:, -1].tolist()])
        return 20.0 * self.weight[nxt][None]

    def output_weight(self) -> torch.Tensor:
        return self.weight


@pytest.fixture(scope="module")
def chat_format():
    return load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))


@pytest.mark.parametrize("name,arguments,output", [
    ("calculator", {"expression": "12 * 7 + 1/4"}, "84.25"),
    ("python", {"code": "print(sum(range(10)))"}, "45\n"),  # what the program prints, newline included
])
def test_the_models_tool_call_runs_and_its_real_output_continues_the_response(chat_format, name, arguments, output):
    registry = default_tools(SandboxLimits(cpu_seconds=2, wall_seconds=10))
    tools = registry.schemas()
    call = {"type": "function", "function": {"name": name, "arguments": arguments}}
    conversation = [{"role": "user", "content": "Work it out, please."},
                    {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
                    {"role": "tool", "name": name, "content": output},
                    {"role": "assistant", "content": f"The result is {output.strip()}."}]
    rendered = chat_format.encode(conversation, tools)
    prompt = chat_format.prompt_ids(conversation[:1], tools)
    start = next(k for k in range(len(prompt) + 1, len(rendered.tokens))  # the token after the call's last one
                 if chat_format.match_tool_call(rendered.tokens[len(prompt):k]) is not None)
    tool_turn = chat_format.tool_result_ids(chat_format.match_tool_call(rendered.tokens[len(prompt):start]), output)
    assert rendered.tokens[start: start + len(tool_turn)] == tool_turn, "the rendering of training data"
    script = list(rendered.tokens)
    for k in range(start, start + len(tool_turn) - 1):
        script[k] = chat_format.end_of_turn_id  # the policy would stop here: only the injected tool turn is right
    model = PositionScriptedModel(script, chat_format.vocab_size)

    params = SamplingParams(temperature=0.0, max_new_tokens=len(rendered.tokens),
                            stop_token_ids=(chat_format.end_of_turn_id,), loop=LoopConfig(stop_on_loop=False))
    [response] = TorchEngine(model, pad_id=chat_format.pad_id).generate(
        [Request(tuple(prompt), params)], make_tool_hook(chat_format, registry, max_calls=2))

    expected = rendered.tokens[len(prompt):]
    expected = expected[: expected.index(chat_format.end_of_turn_id, start - len(prompt) + len(tool_turn)) + 1]
    assert response.token_ids == expected, chat_format.decode(response.token_ids)
    assert response.finish_reason == "stop"
    injected = [i for i, bit in enumerate(response.policy_mask) if not bit]
    assert chat_format.decode([response.token_ids[i] for i in injected]) == chat_format.decode(tool_turn)
    assert output in chat_format.decode(tool_turn) and all(response.logprobs[i] == 0.0 for i in injected)
