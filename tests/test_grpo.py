"""GRPO: settings named when wrong, the filtered problem stream, a planted reward moving a tiny policy towards it,
zero-advantage groups dropped and counted (no update), problem filtering counted, the recipe's problems asked with
the policy's SFT system prompt, and a bit-identical SIGKILL resume of the recipe."""

import json
import random
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from nemo_plugins.config.build import build
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.rl.grpo import (
    STEP_METRICS,
    FilteredPrompts,
    GRPOStage,
    GRPOStep,
    problem_key,
    run_grpo_stage,
)
from nemo_plugins.rl.online_stage import StepMetrics
from nemo_plugins.rl.rollouts import sample_groups
from nemo_plugins.train.metrics import MetricsLog
from tests import distributed_worker, grpo_worker, test_odpo
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records

# the tiny student, its end-of-turn row planted so that some 12-token responses stop early; the chat mix of
# arithmetic problems (records with meta.answer) and calculator conversations
root = test_odpo.root
chat = test_odpo.chat

LONG = 64  # characters


class ShortReward:
    """The planted reward: the shorter the response the better (1 - characters / LONG, at least 0): ending the
    turn early pays, and so do short tokens. Checks that every item carries its problem's meta."""

    def __call__(self, items):
        assert all(item.meta.get("answer") is not None for item in items), "the problem's meta must reach the reward"
        assert all(item.messages[-1]["role"] == "user" for item in items)
        return [max(0.0, 1.0 - len(item.response) / LONG) for item in items]


class SortingReward(ShortReward):
    """Planted verdicts for the problem filter: a question whose length is 0 mod 3 is always solved (1), 1 mod 3
    never (0), the rest earn the short reward."""

    def __call__(self, items):
        short = super().__call__(items)
        return [(1.0, 0.0, value)[len(item.messages[-1]["content"]) % 3] for item, value in zip(items, short)]


class ConstantReward:
    value = 0.5

    def __call__(self, items):
        return [self.value] * len(items)


class NothingSolved(ConstantReward):
    value = 0.0


def _stage(steps: int, **changes) -> GRPOStage:
    values = {"name": "grpo",
              "train": {"seq_len": 92, "micro_batch_size": 2, "global_batch_size": 4, "train_tokens": 92 * 4 * steps,
                        "save_interval": 0, "seed": 3},
              "optimizer": {"lr": 0.01, "min_lr": 0.01, "weight_decay": 0.0, "warmup_fraction": 0.0},
              "sampling": {"group_size": 4, "max_new_tokens": 12, "loop": {"ngram": 2, "repeats": 3}},
              "eval_prompts": 24, "eval_temperature": 1.0, **changes}
    return build(GRPOStage, values, "stage.grpo")


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"stage.grpo.loss.eps_hi\b"):
        _stage(1, loss={"eps_hi": 0.3})
    with pytest.raises(ConfigError, match="no room for a prompt"):
        _stage(1, sampling={"max_new_tokens": 92})
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        _stage(1, sampling={"group_size": 1})
    with pytest.raises(ConfigError, match="problem_filter.samples"):
        _stage(1, problem_filter={"samples": 1})
    with pytest.raises(ConfigError, match="stage.grpo.sampling.temperature"):
        _stage(1, sampling={"temperature": "hot"})
    with pytest.raises(ConfigError, match="solved_at"):
        _stage(1, solved_at=0.0)


def test_the_paper_presets_compose():
    from recipes._entry import compose_typed

    stem, general = (compose_typed("grpo", f"stage@stage.grpo={name}", "dtype=bfloat16").stage.grpo
                     for name in ("grpo_stem", "grpo_general"))
    assert (stem.name, general.name) == ("grpo_stem", "grpo_general")
    assert stem.sampling.max_new_tokens == 32768 and general.sampling.max_new_tokens == 81920
    assert general.sampling.group_size == stem.sampling.group_size == 16, "general inherits stem's settings"
    assert stem.problem_filter.samples > 0 and general.train.precision == "bfloat16", "the one dtype setting"


def test_the_recipe_asks_the_problems_with_the_policys_sft_system_prompt(tmp_path):
    """Standalone as in the cascade: the reasoning SFT stage's system prompt goes first in every problem the policy
    reads (it was trained with it; the judge's messages stay the record's own), and ``stage.sft_kd.system_prompt=null``
    (a policy SFT'd without one) leaves the problems as they are."""
    from transformers import AutoTokenizer

    from recipes._entry import compose_typed
    from recipes.grpo import load_problems

    base = ["model=tiny", f"chat_data.cache_dir={tmp_path}", "chat_data.heldout_fraction=0.2",
            "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=20'], weight: 1.0}]"]
    screened, plain = (compose_typed("grpo", *base, *extra) for extra in ([], ["stage.sft_kd.system_prompt=null"]))
    system = compose_typed("sft", "stage@stage.sft_kd=reasoning_sft").stage.sft_kd.system_prompt
    tokenizer = tokenizer_dir(ModelSource.parse("embedded:smollm2"))
    asked, bare = (ChatPrompts(load_problems(cfg, tokenizer)[1], 0, Cursor(), 1).heldout(4)
                   for cfg in (screened, plain))
    decode = AutoTokenizer.from_pretrained(tokenizer).decode
    assert system and all(system in decode(p.ids) for p in asked)
    assert not any(system in decode(p.ids) for p in bare)
    assert [p.messages for p in asked] == [p.messages for p in bare], "the same problems"


def test_the_filtered_stream_skips_dropped_problems_once(chat):
    _, mix = chat
    prompts = ChatPrompts(mix, seed=7, start=Cursor(), per_step=3)
    cursor, keys, plain = Cursor(), [], []
    for _ in range(9):
        (prompt,), _, _, after = prompts.next_rows(cursor, 1, 0)
        keys.append(problem_key(cursor, after))
        plain.append(prompt)
        cursor = after
    assert len(set(keys)) == 9
    dropped = {keys[1], keys[4]}
    stream = FilteredPrompts(prompts, dropped, Cursor(), per_step=3)
    first, seed_1, step_1, cursor = stream.next_rows(Cursor(), 3, 0)
    second, seed_2, step_2, cursor = stream.next_rows(cursor, 3, 0)
    kept = [p for k, p in zip(keys, plain) if k not in dropped]
    assert first + second == kept[:6] and (step_1, step_2) == (1, 2)
    assert seed_1 == prompts.next_rows(Cursor(), 3, 0)[1] and seed_2 != seed_1
    assert sum(cursor.rows.values()) == 8, "the dropped problems are read (single pass) but not served"
    assert stream.next_rows(cursor, 1, 0)[2] == 3


@pytest.mark.slow
def test_a_planted_reward_moves_the_policy_towards_it(root, chat, tmp_path):
    """Short responses earn more. The held-out mean reward (one sampled answer per problem, fixed seeds) must rise
    by 0.1 or more in 4 steps."""
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)
    manifest = run_grpo_stage(_stage(4), source, source, {"rewards": "short"}, ShortReward, mix, chat_format, tok, tok,
                              Cursor(), tmp_path / "grpo", ParallelConfig())
    start, end = manifest["eval_start"], manifest["eval"]
    assert 0 < start["reward"] < 0.6, "the policy must sometimes answer short at the start"
    assert end["reward"] >= start["reward"] + 0.1, (start, end)
    assert end["response_tokens"] < start["response_tokens"]
    steps = StepMetrics.read(tmp_path / "grpo" / STEP_METRICS)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["kept_groups"] + r["zero_advantage_groups"] + r["skipped_prompts"] == 4 for r in steps)
    assert sum(r["kept_groups"] for r in steps) > 0 and sum(r["skipped_prompts"] for r in steps) > 0
    assert all(0 <= r["truncation_rate"] <= 1 for r in steps) and steps[0]["truncation_rate"] > 0
    assert all(r["clip_fraction"] < 0.01 for r in steps), "one update per sampled batch: the ratio is ~1 on CPU"


@pytest.mark.slow
def test_zero_advantage_groups_are_dropped_and_counted_and_nothing_moves(root, chat, tmp_path):
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)
    manifest = run_grpo_stage(_stage(1, train={"seq_len": 92, "micro_batch_size": 2, "global_batch_size": 4,
                                               "train_tokens": 92 * 4, "seed": 3}, eval_prompts=2),
                              source, source, {"rewards": "constant"}, ConstantReward, mix, chat_format, tok, tok,
                              Cursor(), tmp_path / "grpo", ParallelConfig())
    (record,) = StepMetrics.read(tmp_path / "grpo" / STEP_METRICS)
    assert record["kept_groups"] == 0 and record["trained_tokens"] == 0 and record["loss"] == 0
    assert record["zero_advantage_groups"] == 4 - record["skipped_prompts"] > 0
    _, before = load_model(source, ParallelConfig())
    _, after = load_model(ModelSource.parse(f"megatron:{manifest['checkpoint']}"), ParallelConfig())
    for (name, a), b in zip(before.named_parameters(), after.parameters()):
        assert torch.equal(a, b), name


def test_problem_filtering_stops_when_the_policy_solves_none_of_what_the_stage_needs(root, chat, tmp_path):
    """Screening as many problems as the stage trains on without keeping one is an error naming the counts, not
    a pass over the whole mix."""
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)
    stage = _stage(1, train={"seq_len": 400, "micro_batch_size": 1, "global_batch_size": 4, "train_tokens": 400 * 4,
                             "seed": 3}, sampling={"group_size": 2, "max_new_tokens": 4}, problem_filter={"samples": 2})
    with pytest.raises(DataError, match=r"kept none of the first 4 problems \(0 always solved, 4 never solved in 2"):
        run_grpo_stage(stage, source, source, {"rewards": "none"}, NothingSolved, mix, chat_format, tok, tok, Cursor(),
                       tmp_path / "grpo", ParallelConfig())


def test_rows_align_the_engines_log_probs_with_the_trainers_targets(root, chat):
    """The ratio's denominator (the engine's log-prob of each sampled token) sits at the position whose target is
    that token: the trainer's own log-probs there agree to 1e-4 (ratio 1 on the same weights), and so do the
    reference's (the same model here); positions that are no target carry nothing."""
    chat_format, mix = chat
    _, model = load_model(ModelSource.parse(f"megatron:{root / 'policy'}"), ParallelConfig())
    stage = _stage(1, loss={"kl_beta": 0.1}, sampling={"group_size": 2, "max_new_tokens": 12})
    prompts, seed, _, _ = ChatPrompts(mix, 0, Cursor(), 4).next_rows(Cursor(), 4, 0)
    short = [p for p in prompts if len(p.ids) <= stage.train.seq_len - 12][:2]
    groups = sample_groups(model, short, [seed, seed + 2], 2, chat_format, stage.sampling, stage.train.seq_len, None)
    advantages = torch.tensor([[0.5, -0.5], [1.0, -1.0]], dtype=torch.float64)
    step = GRPOStep(ConstantReward(), chat_format, stage, None, reference=model)
    batches, extras = step._rows(list(zip(short, groups, advantages)))
    assert [b["tokens"].shape[0] for b in batches] == [4], "micro_batch_size groups of G rows per micro-batch"
    longest = max(len(p.ids) + len(r.token_ids) for p, g in zip(short, groups) for r in g)
    assert batches[0]["tokens"].shape[1] == min(stage.train.seq_len, -(-longest // 16) * 16), "no pad columns"
    (old, rows_advantage, reference), batch = extras[0], batches[0]
    assert rows_advantage.tolist() == [0.5, -0.5, 1.0, -1.0]
    with torch.no_grad():
        trainer = -model(batch["tokens"], batch["positions"], labels=batch["labels"]).float()
    mask = batch["mask"] > 0
    assert mask.sum() == sum(len(r.token_ids) for g in groups for r in g)
    torch.testing.assert_close(old[mask], trainer[mask], rtol=0, atol=1e-4)
    torch.testing.assert_close(reference[mask], trainer[mask], rtol=0, atol=1e-5)
    assert bool((old[~mask] == 0).all())


def _command(root, out_dir, steps, filter_samples=2, dtype="float32"):
    """The recipe with problem filtering and a KL term to a reference other than the policy (the student, without
    the planted end-of-turn row): the reference is loaded, and the KL is > 0 from the first step."""
    return [sys.executable, "-m", "recipes.grpo", "model=tiny", f"dtype={dtype}", f"policy=megatron:{root / 'policy'}",
            f"reference=megatron:{root / 'student'}", "stage.grpo.loss.kl_beta=0.05", "stage.sft_kd.system_prompt=null",
            "rewards={_target_: tests.test_grpo.SortingReward}", f"chat_data.cache_dir={root / 'chat'}",
            "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=100'], weight: 1.0}]",
            "chat_data.heldout_fraction=0.2", "stage.grpo.train.seq_len=92", "stage.grpo.train.micro_batch_size=1",
            "stage.grpo.train.global_batch_size=2", f"stage.grpo.train.train_tokens={92 * 2 * steps}",
            "stage.grpo.train.save_interval=1", "stage.grpo.train.eval_interval=0", "stage.grpo.optimizer.lr=0.01",
            "stage.grpo.optimizer.min_lr=0.01", "stage.grpo.sampling.group_size=3",
            "stage.grpo.sampling.max_new_tokens=6", f"stage.grpo.problem_filter.samples={filter_samples}",
            "stage.grpo.eval_prompts=2", "stage.grpo.eval_temperature=1.0", f"output_dir={out_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_sigkilled_grpo_run_with_a_kl_term_resumes_bit_identically(root, chat, tmp_path, dtype):
    """bfloat16: megatron's mixed-precision optimizer, its fp32 main weights saved and loaded (what GPU runs
    without the distributed optimizer take)."""
    steps, env = 4, recipe_env()
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(root, reference, steps, dtype=dtype), check=True, env=env, capture_output=True)
    kill_after = random.randrange(1, steps - 1)
    interrupted = tmp_path / "interrupted"
    code, _ = interrupt_after_step(_command(root, interrupted, steps, dtype=dtype), interrupted, kill_after + 1,
                                   signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job finished before the kill after step {kill_after + 1}"
    resumed_run = subprocess.run(_command(root, interrupted, steps, dtype=dtype), env=env, capture_output=True,
                                 text=True)
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]  # a refusal names its reason
    assert train_records(interrupted) == train_records(reference), f"killed after step {kill_after + 1}"
    steps_metrics = StepMetrics.read(reference / STEP_METRICS)
    assert StepMetrics.read(interrupted / STEP_METRICS) == steps_metrics
    trained = [r for r in steps_metrics if r["trained_tokens"] > 0]
    assert trained and all(r["kl"] > 1e-6 for r in trained), "the KL to the reference is in the loss and the metrics"
    evals = [r for r in MetricsLog.read(reference / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r for r in MetricsLog.read(interrupted / "metrics.jsonl") if r["kind"] == "eval"] == evals
    resumed, manifest = (json.loads((d / "manifest.json").read_text()) for d in (interrupted, reference))
    assert resumed["cursor_end"] == manifest["cursor_end"] and resumed["eval"] == manifest["eval"]
    counts = manifest["problem_filter"]
    assert resumed["problem_filter"] == counts
    assert counts["screened"] == counts["kept"] + counts["always_solved"] + counts["never_solved"] + counts["no_room"]
    assert counts["kept"] >= 2 * steps and counts["always_solved"] > 0 and counts["never_solved"] > 0
    assert sum(manifest["cursor_end"]["rows"].values()) > 2 * steps, "screened-out problems are passed over"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trained_problems(log, ranks, heldout: set[str]) -> list[set[str]]:
    """Per rank, the questions its reward graded outside the held-out evaluation."""
    return [{json.loads(line) for line in open(f"{log}.rank{rank}")} - heldout for rank in ranks]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_two_ranks_train_like_one(root, chat, tmp_path, tp):
    """One step on two gloo processes against one process on the same problems and seeds. TP=2: the same
    problems graded, the same rewards, loss and gradient norm. DP=2: each rank samples its own half of the step's
    problems (disjoint, together the single run's), and the update is the average over both ranks' tokens: the
    same rewards, loss (token-level over the global batch) and gradient norm as one process over all of them."""
    chat_format, mix = chat
    stage = _stage(1, train={"seq_len": 400, "micro_batch_size": 1, "global_batch_size": 4, "train_tokens": 400 * 4,
                             "save_interval": 0, "seed": 3}, eval_prompts=2)  # every prompt fits: no rank idle
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)
    single, two = tmp_path / "single", tmp_path / "two"
    run_grpo_stage(stage, source, source, {"rewards": "short"}, lambda: grpo_worker.GradedProblems(f"{single}.graded"),
                   mix, chat_format, tok, tok, Cursor(), single, ParallelConfig())
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, _port(), grpo_worker.grpo_stage, (str(root), stage, str(two), f"{two}.graded", tp)))
    (one,), (both,) = StepMetrics.read(single / STEP_METRICS), StepMetrics.read(two / STEP_METRICS)
    assert one["kept_groups"] > 0 and one["skipped_prompts"] == 0, "the step must train on every problem's group"
    for key in ("reward", "kept_groups", "zero_advantage_groups", "skipped_prompts", "trained_tokens"):
        assert both[key] == one[key], key
    assert both["loss"] == pytest.approx(one["loss"], rel=1e-4, abs=1e-6)
    (norm_one,), (norm_two,) = ([r["grad_norm"] for r in train_records(d)] for d in (single, two))
    assert norm_two == pytest.approx(norm_one, rel=1e-4)
    heldout = {p.messages[-1]["content"] for p in ChatPrompts(mix, 0, Cursor(), 4).heldout(2)}
    (alone,), (rank0, rank1) = (_trained_problems(f"{single}.graded", [0], heldout),
                                _trained_problems(f"{two}.graded", [0, 1], heldout))
    if tp == 2:
        assert rank0 == rank1 == alone, "every TP rank grades the same responses"
    else:
        assert rank0 and rank1 and not rank0 & rank1, "each DP rank samples its own problems"
        assert rank0 | rank1 == alone
