"""Online DPO: labels with loops as losers, prompts from the chat mix, seeded pair sampling with tools, a tiny run
whose judge prefers a checkable property moving the policy towards it, and a bit-identical SIGKILL resume."""

import json
import math
import random
import signal
import subprocess
import sys

import pytest
import torch

from nemo_plugins.config.build import build
from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.mix import Cursor, SourceSpec
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import Response
from nemo_plugins.rl.odpo import (
    STEP_METRICS,
    ODPOSampling,
    ODPOStage,
    StepMetrics,
    pair_labels,
    run_odpo_stage,
    sample_pairs,
    strip_thinking,
    tool_calls,
    tool_hook,
)
from nemo_plugins.rl.online_stage import check_sampling_layout
from nemo_plugins.sandbox import SandboxLimits
from nemo_plugins.train.metrics import MetricsLog
from tests.conftest import save_tiny_teacher_and_student
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records


class StopJudge:
    """The checkable-property judge: a response that ends its turn beats one that runs to its length limit; two
    alike are a tie."""

    def prob_first_wins(self, conversations, responses_a, responses_b):
        assert len(conversations) == len(responses_a) == len(responses_b)
        assert all(conversation and conversation[-1]["role"] == "user" for conversation in conversations)
        a, b = ([END_OF_TURN in r for r in responses] for responses in (responses_a, responses_b))
        return torch.tensor([1.0 if x and not y else 0.0 if y and not x else 0.5 for x, y in zip(a, b)])


END_OF_TURN = "<|im_end|>"


def test_a_looping_response_loses_and_two_looping_ones_are_dropped():
    p = torch.tensor([0.9, 0.9, 0.2, 0.7, 0.4], dtype=torch.float64)
    loops_a = torch.tensor([False, True, False, True, False])
    loops_b = torch.tensor([False, False, True, True, False])
    label, keep = pair_labels(p, loops_a, loops_b, loop_as_loser=True)
    assert label.tolist()[:3] == [0.9, 0.0, 1.0] and label[4] == 0.4
    assert keep.tolist() == [True, True, True, False, True]
    label, keep = pair_labels(p, loops_a, loops_b, loop_as_loser=False)
    assert torch.equal(label, p) and bool(keep.all())


def test_thinking_is_stripped_for_the_judge_only():
    text = "[THINK]is it 4?[/THINK]It is 4.<think>\nhidden\n</think> Done.[THINK]unfinished"
    assert strip_thinking(text) == "It is 4. Done."


def test_tool_calls_are_the_injected_runs():
    assert tool_calls(Response([1], [5] * 8, [0.0] * 8, [1, 1, 0, 0, 1, 0, 1, 1])) == 2
    assert tool_calls(Response([1], [5] * 2, [0.0] * 2, [1, 1])) == 0


def test_stage_settings_are_checked():
    train = {"seq_len": 64, "micro_batch_size": 1, "global_batch_size": 2, "train_tokens": 128}
    with pytest.raises(ConfigError, match="no room for a prompt"):
        build(ODPOStage, {"name": "odpo", "train": train, "optimizer": {}, "sampling": {"max_new_tokens": 64}}, "stage")
    with pytest.raises(ConfigError, match="sampling.temperature must be > 0"):
        ODPOSampling(temperature=0.0)
    with pytest.raises(ConfigError, match="parallel.pp=2"):
        check_sampling_layout(ParallelConfig(pp=2), "online DPO")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny student, and ``policy``: the same model with its end-of-turn output row planted along the mean
    final hidden state, so that about a quarter of its 12-token responses end their turn (a random model's never do)."""
    root = tmp_path_factory.mktemp("odpo")
    save_tiny_teacher_and_student(root)
    source = ModelSource.parse(f"megatron:{root / 'student'}")
    config, model = load_model(source, ParallelConfig())
    end_of_turn = load_chat_format("hf_template", tokenizer_dir(source)).end_of_turn_id
    ids = torch.randint(100, 40_000, (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean = model(ids, torch.arange(40).expand(8, -1), return_hidden=True).reshape(-1, config.hidden_size).mean(0)
        model.output_weight()[end_of_turn] = mean / (mean @ mean) * 0.2 * math.log(0.06 * config.vocab_size / 0.94)
    megatron_checkpoint.save_model(model, config, root / "policy", tokenizer_dir=tokenizer_dir(source))
    return root


@pytest.fixture(scope="module")
def chat(root):
    chat_format = load_chat_format("hf_template", tokenizer_dir(ModelSource.parse(f"megatron:{root / 'student'}")))
    mix = build_chat_mix(chat_format, [SourceSpec("arithmetic", ["builtin:arithmetic?count=100"], 1.0),
                                       SourceSpec("tools", ["builtin:arithmetic_tools?count=20"], 0.5)],
                         root / "chat", 0.2)
    return chat_format, mix


def test_prompts_are_the_conversations_before_their_first_answer_read_once(chat):
    chat_format, mix = chat
    prompts = ChatPrompts(mix, seed=7, start=Cursor(), per_step=4)
    first, seed_1, step_1, cursor = prompts.next_rows(Cursor(), 4, 0)
    second, seed_2, step_2, after = prompts.next_rows(cursor, 4, 0)
    again = prompts.next_rows(Cursor(), 4, 0)
    assert (step_1, step_2) == (1, 2) and seed_1 != seed_2 and again[1] == seed_1 and again[0] == first
    plain = [p for p in first + second if len(p.messages) == 1]  # the tool source's prompts also list the tools
    assert plain and all(list(p.ids) == chat_format.prompt_ids(p.messages) for p in plain)
    assert sum(after.rows.values()) == 8 and set(after.rows) == {"arithmetic", "tools"}
    assert len({p.ids for p in first + second}) == 8, "each conversation is read once"
    heldout = prompts.heldout(6)
    assert len(heldout) == 6 and not {p.ids for p in heldout} & {p.ids for p in first + second}
    assert prompts.rows_left(after, 0, 10_000) == 80 + 16 - 8


def test_pairs_are_seeded_and_a_prompt_without_room_is_skipped(root, chat):
    chat_format, mix = chat
    _, model = load_model(ModelSource.parse(f"megatron:{root / 'student'}"), ParallelConfig())
    prompts, _, _, _ = ChatPrompts(mix, 0, Cursor(), 3).next_rows(Cursor(), 3, 0)
    sampling = ODPOSampling(max_new_tokens=6, tools=False)
    room = max(len(p.ids) for p in prompts) + 6 - 1  # the longest prompt does not fit
    pairs = sample_pairs(model, prompts, [10, 20, 30], chat_format, sampling, room)
    longest = max(range(3), key=lambda i: len(prompts[i].ids))
    assert pairs[longest] is None and sum(p is None for p in pairs) == 1
    kept = [p for p in pairs if p is not None]
    assert all(p.a.token_ids != p.b.token_ids for p in kept), "the two samples of a prompt must differ"
    again = sample_pairs(model, prompts, [10, 20, 30], chat_format, sampling, room)
    assert [(p.a.token_ids, p.b.token_ids) for p in kept] == [(p.a.token_ids, p.b.token_ids) for p in again if p]


def test_a_hanging_tool_is_stopped_by_the_sandbox_and_answered(chat):
    chat_format, _ = chat
    hook = tool_hook(chat_format, ODPOSampling(sandbox=SandboxLimits(cpu_seconds=1, wall_seconds=2.0)))
    call = '<tool_call>\n{"name": "python", "arguments": {"code": "while True:\\n    pass"}}\n</tool_call>'
    injected = hook(0, chat_format.tokenizer.encode(call, add_special_tokens=False))
    message = chat_format.decode(injected)
    assert "timeout" in message and "tool" in message


def _stage(steps: int, **changes) -> ODPOStage:
    values = {"name": "odpo",
              "train": {"seq_len": 92, "micro_batch_size": 2, "global_batch_size": 4, "train_tokens": 92 * 4 * steps,
                        "save_interval": 0, "seed": 3},
              "optimizer": {"lr": 0.01, "min_lr": 0.01, "weight_decay": 0.0, "warmup_fraction": 0.0},
              "dpo": {"beta": 0.1},
              "sampling": {"max_new_tokens": 12, "tools": False, "truncation_is_loop": False,
                           "loop": {"ngram": 2, "repeats": 3}},
              "eval_prompts": 24, **changes}
    return build(ODPOStage, values, "stage.odpo")


@pytest.mark.slow
def test_a_judge_preferring_a_property_moves_the_policy_towards_it(root, chat, tmp_path):
    """The judge prefers responses that end their turn. At step 0 policy and reference sample the same responses
    (a win rate of 0.5 exactly); for this judge win rate = 0.5 + (policy's stop rate - reference's) / 2, so a
    win rate of 0.65 or more after 4 steps is a stop rate risen by 0.3 or more on held-out prompts."""
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)
    manifest = run_odpo_stage(_stage(4), source, source, {"judge": "stop"}, StopJudge, mix, chat_format, tok, tok,
                              Cursor(), tmp_path / "odpo", ParallelConfig())
    start, end = manifest["eval_start"], manifest["eval"]
    assert start["win_rate"] == 0.5 and start["response_tokens"] < 12, "the policy must stop sometimes at the start"
    assert end["win_rate"] >= 0.65, (start, end)
    assert end["response_tokens"] < start["response_tokens"]
    assert end["loop_rate"] <= start["loop_rate"]
    steps = StepMetrics.read(tmp_path / "odpo" / STEP_METRICS)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert sum(r["skipped_prompts"] for r in steps) > 0, "prompts longer than seq_len - max_new_tokens are skipped"
    assert all(r["pairs"] == 4 - r["skipped_prompts"] for r in steps), "no pair loops here: every sampled one counts"


def _command(root, out_dir, steps):
    return [sys.executable, "-m", "recipes.odpo", "model=tiny", f"policy=megatron:{root / 'student'}",
            "judge={_target_: tests.test_odpo.StopJudge}", f"chat_data.cache_dir={root / 'chat'}",
            "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=100'], weight: 1.0}]",
            "chat_data.heldout_fraction=0.2", "stage.odpo.train.seq_len=92", "stage.odpo.train.micro_batch_size=1",
            "stage.odpo.train.global_batch_size=2", f"stage.odpo.train.train_tokens={92 * 2 * steps}",
            "stage.odpo.train.save_interval=1", "stage.odpo.optimizer.lr=0.05", "stage.odpo.sampling.max_new_tokens=6",
            "stage.odpo.sampling.truncation_is_loop=false", "stage.odpo.eval_prompts=2", f"output_dir={out_dir}"]


@pytest.mark.slow
def test_a_sigkilled_odpo_run_resumes_bit_identically(root, tmp_path):
    steps, env = 4, recipe_env()
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(root, reference, steps), check=True, env=env, capture_output=True)
    kill_after = random.randrange(1, steps - 1)
    interrupted = tmp_path / "interrupted"
    code, _ = interrupt_after_step(_command(root, interrupted, steps), interrupted, kill_after + 1, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job finished before the kill after step {kill_after + 1}"
    subprocess.run(_command(root, interrupted, steps), check=True, env=env, capture_output=True)
    assert train_records(interrupted) == train_records(reference), f"killed after step {kill_after + 1}"
    assert StepMetrics.read(interrupted / STEP_METRICS) == StepMetrics.read(reference / STEP_METRICS)
    evals = [r for r in MetricsLog.read(reference / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r for r in MetricsLog.read(interrupted / "metrics.jsonl") if r["kind"] == "eval"] == evals
    resumed, manifest = (json.loads((d / "manifest.json").read_text()) for d in (interrupted, reference))
    assert resumed["cursor_end"] == manifest["cursor_end"] and resumed["eval"] == manifest["eval"]
