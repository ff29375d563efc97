"""Reasoning stage 2: GRPO with verifiable (math, code) and rubric-judge rewards on the one training loop.

Per step and prompt, G responses from the current policy through the generation engine (tools optional, the
stage's temperature, ``max_new_tokens``); each is graded by ``rl.rewards`` from the problem's ``meta`` (math
answer, code tests, rubric items), the decoded text without its end-of-turn token. Advantages are the rewards
minus the group mean (optionally over the group std); a group whose rewards are all equal has no signal: it is
dropped and counted. The loss is ``grpo_loss.grpo_token_loss`` (clip-higher surrogate, optional k3 KL to the
frozen starting model, off by default), summed over the kept groups' response tokens and divided by their
global count through megatron's per-token-loss path (token-level normalisation). The training forward runs the
output layer on the response tokens only (``logprobs.target_token_losses``).

Off-policy-ness: none beyond numerics. A step samples with the weights it then updates, and the loop takes one
optimizer step per sampled batch, so the old policy IS the current one. The ratio's denominator is the
engine's own log-prob of each sampled token (plain distribution, recorded while decoding), not a second
forward pass: the ratio then measures exactly the sampler/trainer mismatch (KV-cached decode vs full-sequence
forward; on GPUs bf16 kernels and the inference engine, where it is known to reach tens of percent on rare
tokens), and the clip bounds how far such a token can push an update. On CPU in fp32 the ratio is 1 to about
1e-6, nothing is clipped (the clip fraction in the metrics says so) and the loss is the token-level policy
gradient; on CPU in bf16 (the arithmetic bench) 1e-4 to 2e-3 of the trained tokens are clipped per step.
Several optimizer steps per sampled batch (PPO-style reuse, where the clip does its classic work) would need the
loop to step the optimizer more than once per step: left out.

Problem filtering (``problem_filter.samples`` = k > 0): before training, the starting policy answers each
upcoming training problem k times; problems it always solves (every reward >= ``solved_at``) or never solves
(every reward 0) are dropped, counted in the manifest, and skipped by the training stream. Screening as many
problems as the stage needs without keeping one stops with a DataError: the data gives that policy no signal, and
screening on would sample k answers to every problem of the mix (what kept a bench run of the parent on problems
it never solves "generating" for tens of minutes before its first step). Enough problems are
screened for the stage's steps; the result is saved in the stage's folder (``problem_filter.json``) and read
back by a resumed run.

Prompts are the chat mix's problems cut before their first assistant turn, read in one pass with the mix's
cursor; a step's sampling seeds derive from the cursor it starts at, so a run resumed after a SIGKILL samples,
grades and trains exactly as the uninterrupted one (rewards with wall-clock limits aside). A prompt without
room for ``max_new_tokens`` in ``train.seq_len`` is skipped and counted. Rewards are computed on every rank
(the rubric judge is a model, a collective over its TP group) and TP rank 0's are used by all.

Simplifications: the policy trains in the layouts the engine generates in (TP x DP); every DP rank samples its
own prompts. Step metrics (reward mean, pass rate, response length, truncation rate, clip fraction, kept and
zero-advantage groups, skipped prompts, KL) go to ``grpo_metrics.jsonl`` (rank 0, one record per step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.chat_prompts import ChatPrompts, Prompt
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.stage import prepare_stage
from nemo_plugins.distill.step import require_per_token_loss, use_per_token_loss
from nemo_plugins.distributed import ParallelConfig, device, initialize
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.generation.engine import Response, SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.manifest import write_json_atomic, write_manifest
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import summed_logs
from nemo_plugins.rl.grpo_loss import GRPOLossOptions, group_advantages, grpo_token_loss
from nemo_plugins.rl.logprobs import sample_rows, target_token_losses
from nemo_plugins.rl.online_stage import (
    StepMetrics,
    checked_policy,
    frozen_model,
    run_summary,
)
from nemo_plugins.rl.rewards import RewardItem, Rewards, RewardSettings
from nemo_plugins.rl.rollouts import response_text, sample_groups, tool_calls, tool_hook
from nemo_plugins.sandbox import SandboxLimits
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.loop import TrainingRun
from nemo_plugins.vision.checkpoint import load_source_model

logger = logging.getLogger(__name__)

STEP_METRICS = "grpo_metrics.jsonl"
FILTER_FILE = "problem_filter.json"


@dataclass
class GRPOSampling:
    """How the G responses per prompt are drawn."""

    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    tools: bool = False  # run the calls the policy writes (calculator, sandboxed Python)
    max_tool_calls: int = 4
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    loop: LoopConfig = field(default_factory=LoopConfig)
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ConfigError(f"sampling.group_size must be >= 2 (the advantage is a reward minus its group's mean), "
                              f"got {self.group_size}")
        if not self.temperature > 0:
            raise ConfigError(f"sampling.temperature must be > 0 (greedy samples of a group are one response), "
                              f"got {self.temperature}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        if self.max_tool_calls < 0 or self.max_batch_size < 1:
            raise ConfigError("sampling.max_tool_calls must be >= 0 and sampling.max_batch_size >= 1")

    def params(self, seed: int, stop_id: int, temperature: float | None = None) -> SamplingParams:
        return SamplingParams(temperature=self.temperature if temperature is None else temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, stop_token_ids=(stop_id,), seed=seed, loop=self.loop)


@dataclass
class ProblemFilter:
    """``samples`` responses per problem from the starting policy (0: no filtering); which verdicts drop it."""

    samples: int = 0
    drop_always_solved: bool = True
    drop_never_solved: bool = True

    def __post_init__(self) -> None:
        if self.samples < 0 or self.samples == 1:
            raise ConfigError(f"problem_filter.samples must be 0 (off) or >= 2 (one sample cannot tell 'always' "
                              f"from 'sometimes'), got {self.samples}")


@dataclass
class GRPOStage:
    name: str
    train: TrainSettings  # global_batch_size: problems per step; micro_batch_size: groups (G rows each) per micro-batch
    optimizer: OptimizerSettings
    loss: GRPOLossOptions = field(default_factory=GRPOLossOptions)
    sampling: GRPOSampling = field(default_factory=GRPOSampling)
    rewards: RewardSettings = field(default_factory=RewardSettings)
    problem_filter: ProblemFilter = field(default_factory=ProblemFilter)
    solved_at: float = 1.0  # a reward at least this solves the problem (pass rate, filtering)
    eval_prompts: int = 16  # held-out problems: pass@1 and mean reward
    eval_temperature: float = 0.0  # 0: greedy pass@1

    def __post_init__(self) -> None:
        if self.sampling.max_new_tokens >= self.train.seq_len:
            raise ConfigError(f"sampling.max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in "
                              f"train.seq_len={self.train.seq_len}: raise seq_len or lower max_new_tokens")
        if not 0 < self.solved_at <= 1:
            raise ConfigError(f"solved_at must be in (0, 1] (rewards lie in [0, 1]), got {self.solved_at}")
        if self.eval_prompts < 1 or self.eval_temperature < 0:
            raise ConfigError(f"eval_prompts must be >= 1 and eval_temperature >= 0 (0: greedy), got "
                              f"{self.eval_prompts} and {self.eval_temperature}")


# ----------------------------------------------------------------------------------------------- grading
def graded(rewards: Rewards, chat_format: ChatFormat, prompts: Sequence[Prompt],
           groups: Sequence[Sequence[Response]]) -> torch.Tensor:
    """[len(groups), n] rewards of every response, TP rank 0's values on every rank of its TP group."""
    items = [RewardItem(list(prompt.messages), dict(prompt.meta), response_text(chat_format, r))
             for prompt, group in zip(prompts, groups) for r in group]
    values = torch.tensor(rewards(items) if items else [], dtype=torch.float64)
    if not bool(((values >= 0) & (values <= 1)).all()):
        raise ValueError(f"rewards must lie in [0, 1], got {values.min().item()} .. {values.max().item()}")
    if parallel_state.get_tensor_model_parallel_world_size() > 1 and values.numel():
        values = values.to(device())
        dist.broadcast(values, parallel_state.get_tensor_model_parallel_src_rank(),
                       group=parallel_state.get_tensor_model_parallel_group())
        values = values.cpu()
    return values.reshape(len(groups), len(groups[0]) if groups else 0)  # a DP rank may have no prompt with room


def response_counts(responses: Sequence[Response]) -> list[float]:
    """(responses, policy tokens, truncated, tool calls) of some responses."""
    return [len(responses), float(sum(sum(r.policy_mask) for r in responses)),
            float(sum(r.finish_reason == "length" for r in responses)), float(sum(tool_calls(r) for r in responses))]


def dp_sum(values: Sequence[float]) -> list[float]:
    """Totals over the data-parallel ranks (float64)."""
    totals = torch.tensor(list(values), dtype=torch.float64, device=device())
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    return totals.tolist()


def my_share(items: Sequence, seed: int, n: int) -> tuple[list, list[int]]:
    """This DP rank's part of a batch and its request seeds (item i of the batch: ``seed + n * i``)."""
    per_rank = len(items) // parallel_state.get_data_parallel_world_size()
    first = parallel_state.get_data_parallel_rank() * per_rank
    return list(items[first : first + per_rank]), [seed + n * (first + i) for i in range(per_rank)]


# ----------------------------------------------------------------------------------------------- the step
@dataclass
class GRPOStep:
    """``step(ddp, (prompts, seed, step)) -> mean loss per kept response token`` for the training loop."""

    rewards: Rewards
    chat_format: ChatFormat
    stage: GRPOStage
    metrics: StepMetrics
    reference: torch.nn.Module | None = None  # the frozen start: only with loss.kl_beta > 0

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        policy = ddp.module
        require_per_token_loss(policy, "response token")
        prompts, seed, step = batch
        train, sampling = self.stage.train, self.stage.sampling
        mine, seeds = my_share(prompts, seed, sampling.group_size)
        groups = sample_groups(policy, mine, seeds, sampling.group_size, self.chat_format, sampling, train.seq_len,
                               tool_hook(self.chat_format, sampling))
        present = [(prompt, group) for prompt, group in zip(mine, groups) if group is not None]
        rewards = graded(self.rewards, self.chat_format, [p for p, _ in present], [g for _, g in present])
        advantages = group_advantages(rewards, self.stage.loss.scale_by_std)
        keep = (advantages != 0).any(dim=1)
        kept = [(prompt, group, advantage) for (prompt, group), advantage, k in zip(present, advantages, keep) if k]
        batches, extras = self._rows(kept)
        responses = [r for _, group in present for r in group]
        stats = dp_sum([len(mine), len(mine) - len(present), float(keep.sum()), float(rewards.sum()),
                        float((rewards >= self.stage.solved_at).sum()), *response_counts(responses)])
        kept_tokens = dp_sum([float(sum(b["mask"].sum() for b in batches))])[0]
        # no group with signal anywhere: no backward, zero gradients (only Adam's momentum still moves the weights)
        totals = self._train(ddp, batches, extras) if kept_tokens > 0 else [0.0, 0.0, 0.0, 0.0]
        self._record(step, stats, totals)
        return totals[0] / max(totals[1], 1.0)

    def _rows(self, kept: list[tuple[Prompt, list[Response], torch.Tensor]]) -> tuple[list[dict], list[tuple]]:
        """Micro-batches of the kept groups' responses, each as wide as its own longest response (``sample_rows``;
        megatron's schedule without a pipeline takes micro-batches of any length, and GRPO has no pipeline: its
        policy trains in the engine's layout) and, per micro-batch, (old log-probs [b, s], advantages [b], reference
        log-probs [b, s] or None); a rank with nothing kept runs one row without targets."""
        train = self.stage.train
        rows = [(prompt, response, value) for prompt, group, advantage in kept
                for response, value in zip(group, advantage)] or [None]
        size = train.micro_batch_size * self.stage.sampling.group_size
        batches, olds, advantages = [], [], []
        for first in range(0, len(rows), size):
            part = rows[first : first + size]
            samples = [None if row is None else (row[0].ids, row[1].token_ids, row[1].policy_mask) for row in part]
            batch = local_batch(*sample_rows(samples, train.seq_len, self.chat_format.pad_id))
            old = torch.zeros(len(part), batch["tokens"].shape[1])
            for i, row in enumerate(part):
                if row is not None:
                    start = len(row[0].ids) - 1
                    old[i, start : start + len(row[1].logprobs)] = torch.tensor(row[1].logprobs)
            batches.append(batch)
            olds.append(old)
            advantages.append(torch.tensor([0.0 if row is None else float(row[2]) for row in part],
                                           dtype=torch.float64))
        reference = (self._reference_logprobs(batches) if self.stage.loss.kl_beta > 0
                     else [None] * len(batches))
        return batches, list(zip(olds, advantages, reference))

    def _reference_logprobs(self, batches: list[dict]) -> list[torch.Tensor]:
        outputs = forward_only(self.reference, [(b["tokens"], b["positions"], b["labels"]) for b in batches],
                               reduce=lambda per_token_loss: {"logp": -per_token_loss.float()})
        return [out["logp"] for out in outputs]

    def _train(self, ddp: torch.nn.Module, batches: list[dict], extras: list[tuple]) -> list[float]:
        """Forward + backward of every micro-batch through megatron's schedule; (loss sum, tokens, clipped
        tokens, KL sum) over the global batch."""
        options = self.stage.loss

        def forward_step(data_iterator, chunk):
            index, batch = next(data_iterator)
            old, advantages, reference = extras[index]
            hidden = chunk(batch["tokens"], batch["positions"], return_hidden=True)

            def loss_func(hidden):
                logp = -target_token_losses(ddp.module, hidden, batch["labels"], batch["mask"]).float()
                out = grpo_token_loss(logp, old.to(logp.device), advantages.to(logp.device), batch["mask"], options,
                                      reference)
                count = out.tokens.to(torch.int)
                return out.loss_sum, count, {"loss_sum": out.loss_sum.detach().clone(), "tokens": count,
                                             "clipped": out.clipped, "kl_sum": out.kl_sum}

            return hidden, loss_func

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(enumerate(batches)), model=[ddp],
            num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0], forward_only=False)
        return summed_logs(outputs, ("loss_sum", "tokens", "clipped", "kl_sum"))

    def _record(self, step: int, stats: list[float], totals: list[float]) -> None:
        prompts, skipped, kept, reward_sum, solved, responses, tokens, truncated, calls = stats
        loss_sum, trained_tokens, clipped, kl_sum = totals
        self.metrics.record({"step": step, "loss": loss_sum / max(trained_tokens, 1.0),
                             "reward": reward_sum / max(responses, 1.0), "pass_rate": solved / max(responses, 1.0),
                             "kept_groups": kept, "zero_advantage_groups": prompts - skipped - kept,
                             "skipped_prompts": skipped, "response_tokens": tokens / max(responses, 1.0),
                             "truncation_rate": truncated / max(responses, 1.0),
                             "clip_fraction": clipped / max(trained_tokens, 1.0),
                             "kl": kl_sum / max(trained_tokens, 1.0), "trained_tokens": trained_tokens,
                             "tool_calls": calls / max(responses, 1.0)})


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class HeldoutPass:
    """pass@1 on held-out problems: one response each (``eval_temperature``, 0 = greedy; fixed seeds), graded."""

    policy: torch.nn.Module
    rewards: Rewards
    chat_format: ChatFormat
    stage: GRPOStage
    prompts: list[Prompt]

    def __call__(self) -> dict:
        stage, sampling = self.stage, self.stage.sampling
        room = stage.train.seq_len - sampling.max_new_tokens
        fitting = [p for p in self.prompts if len(p.ids) <= room]
        if not fitting:
            raise DataError(f"no held-out problem fits train.seq_len={stage.train.seq_len} with "
                            f"max_new_tokens={sampling.max_new_tokens}")
        groups = sample_groups(self.policy, fitting, [stage.train.seed + i for i in range(len(fitting))], 1,
                               self.chat_format, EvalSampling(sampling, stage.eval_temperature), stage.train.seq_len,
                               tool_hook(self.chat_format, sampling))
        responses = [group[0] for group in groups]
        rewards = graded(self.rewards, self.chat_format, fitting, [[r] for r in responses]).reshape(-1)
        count, tokens, truncated, _ = response_counts(responses)
        return {"pass_at_1": float((rewards >= stage.solved_at).double().mean()), "reward": float(rewards.mean()),
                "response_tokens": tokens / count, "truncation_rate": truncated / count, "problems": float(count)}


@dataclass(frozen=True)
class EvalSampling:
    """The stage's sampling at the evaluation's temperature (0: greedy, which the training groups refuse)."""

    sampling: GRPOSampling
    temperature: float

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def max_batch_size(self) -> int:
        return self.sampling.max_batch_size

    def params(self, seed: int, stop_id: int) -> SamplingParams:
        return self.sampling.params(seed, stop_id, self.temperature)


# ----------------------------------------------------------------------------------------------- problem filter
def problem_key(before: Cursor, after: Cursor) -> str:
    """``source:row`` of the one problem read between two cursors (its row in the source's single pass)."""
    source = next(name for name, rows in after.rows.items() if rows != before.rows.get(name, 0))
    return f"{source}:{before.rows.get(source, 0)}"


class FilteredPrompts:
    """``ChatPrompts`` whose training stream skips the screened-out problems (they are read and passed, so the
    cursor stays single-pass); seeds derive from the cursor a step starts at, as in ``ChatPrompts``."""

    def __init__(self, prompts: ChatPrompts, dropped: set[str], start: Cursor, per_step: int) -> None:
        self.prompts, self.dropped, self.start, self.per_step = prompts, dropped, start, per_step

    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple[list[Prompt], int, int, Cursor]:
        taken, seed = [], None
        step = self._accepted_before(cursor) // self.per_step + 1
        while len(taken) < rows:
            (prompt,), problem_seed, _, after = self.prompts.next_rows(cursor, 1, seq_len)
            seed = problem_seed if seed is None else seed
            if problem_key(cursor, after) not in self.dropped:
                taken.append(prompt)
            cursor = after
        return taken, seed, step, cursor

    def _accepted_before(self, cursor: Cursor) -> int:
        read = sum(cursor.rows.values()) - sum(self.start.rows.values())
        return read - sum(1 for key in self.dropped if _row_of(key) < cursor.rows.get(_source_of(key), 0))

    def rows_left(self, cursor: Cursor, seq_len: int, limit: int) -> int:
        return self.prompts.rows_left(cursor, seq_len, limit)

    def heldout(self, count: int) -> list[Prompt]:
        return self.prompts.heldout(count)

    def identity(self) -> dict:
        return self.prompts.identity()


def _source_of(key: str) -> str:
    return key.rsplit(":", 1)[0]


def _row_of(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def screen_problems(policy: torch.nn.Module, rewards: Rewards, chat_format: ChatFormat, stage: GRPOStage,
                    prompts: ChatPrompts, start: Cursor, needed: int) -> dict:
    """Read problems from ``start`` until ``needed`` pass the filter: each answered ``problem_filter.samples``
    times by ``policy``; returns the counts and the dropped keys (``problem_key``). A collective over the world."""
    train = stage.train
    counts = {"screened": 0.0, "always_solved": 0.0, "never_solved": 0.0, "no_room": 0.0, "kept": 0.0}
    dropped: list[str] = []
    cursor = start
    while counts["kept"] < needed:
        chunk, keys = [], []
        while len(chunk) < train.global_batch_size and prompts.rows_left(cursor, train.seq_len, 1) > 0:
            (prompt,), seed, _, after = prompts.next_rows(cursor, 1, train.seq_len)
            chunk.append((prompt, seed))
            keys.append(problem_key(cursor, after))
            cursor = after
        if len(chunk) < train.global_batch_size:
            raise DataError(f"problem filtering kept {counts['kept']:.0f} of {counts['screened']:.0f} problems before "
                            f"the chat mix ran out, {needed} needed: add problems, lower the stage's train_tokens "
                            "or turn problem_filter.samples off")
        verdicts = _verdicts(policy, rewards, chat_format, stage, chunk)
        for key, verdict in zip(keys, verdicts):
            counts["screened"] += 1
            counts[verdict] += 1
            if verdict != "kept":
                dropped.append(key)
        logger.info("problem filter: %d screened, %d kept (%d needed), %d always solved, %d never solved, %d without "
                    "room", counts["screened"], counts["kept"], needed, counts["always_solved"], counts["never_solved"],
                    counts["no_room"])
        if counts["kept"] == 0 and counts["screened"] >= needed:
            raise DataError(f"problem filtering kept none of the first {counts['screened']:.0f} problems "
                            f"({counts['always_solved']:.0f} always solved, {counts['never_solved']:.0f} never "
                            f"solved in {stage.problem_filter.samples} answers each): the policy gets no signal "
                            "from this data, and screening on would read the whole mix; choose problems it "
                            "sometimes solves, or turn problem_filter.samples off")
    counts["dropped"] = sorted(dropped)
    return counts


_VERDICTS = ("kept", "always_solved", "never_solved", "no_room")


def _verdicts(policy, rewards: Rewards, chat_format: ChatFormat, stage: GRPOStage,
              chunk: list[tuple[Prompt, int]]) -> list[str]:
    """Each problem's verdict; the DP ranks screen their shares and share the results."""
    k, problem_filter = stage.problem_filter.samples, stage.problem_filter
    mine, _ = my_share(chunk, 0, 1)
    groups = sample_groups(policy, [p for p, _ in mine], [seed for _, seed in mine], k, chat_format, stage.sampling,
                           stage.train.seq_len, tool_hook(chat_format, stage.sampling))
    present = [(p, g) for (p, _), g in zip(mine, groups) if g is not None]
    scores = iter(graded(rewards, chat_format, [p for p, _ in present], [g for _, g in present]))
    codes = []
    for group in groups:
        if group is None:
            codes.append(_VERDICTS.index("no_room"))
            continue
        score = next(scores)
        if problem_filter.drop_always_solved and bool((score >= stage.solved_at).all()):
            codes.append(_VERDICTS.index("always_solved"))
        elif problem_filter.drop_never_solved and bool((score == 0).all()):
            codes.append(_VERDICTS.index("never_solved"))
        else:
            codes.append(_VERDICTS.index("kept"))
    shares = [torch.zeros(len(mine), dtype=torch.long, device=device())
              for _ in range(parallel_state.get_data_parallel_world_size())]
    dist.all_gather(shares, torch.tensor(codes, dtype=torch.long, device=device()),
                    group=parallel_state.get_data_parallel_group())
    return [_VERDICTS[int(c)] for share in shares for c in share.tolist()]


def filtered_prompts(policy, rewards: Rewards, chat_format: ChatFormat, stage: GRPOStage, prompts: ChatPrompts,
                     start: Cursor, out_dir: Path) -> tuple[ChatPrompts | FilteredPrompts, dict | None]:
    """The training stream and the filter's counts (None when off); a saved screening of this stage is reused."""
    if stage.problem_filter.samples == 0:
        return prompts, None
    saved = Path(out_dir) / FILTER_FILE
    if saved.exists():
        counts = json.loads(saved.read_text())
    else:
        counts = screen_problems(policy, rewards, chat_format, stage, prompts, start,
                                 stage.train.steps * stage.train.global_batch_size)
        if dist.get_rank() == 0:
            write_json_atomic(saved, counts)
        dist.barrier()
    return FilteredPrompts(prompts, set(counts["dropped"]), start, stage.train.global_batch_size), counts


# ----------------------------------------------------------------------------------------------- the stage
def stage_facts(stage: GRPOStage, policy_source: ModelSource, reference_source: ModelSource, rewards: dict,
                prompts: ChatPrompts, chat_format: ChatFormat) -> dict:
    """What a GRPO stage adds to the loop's fingerprint: its settings, the models, the rewards' config, the chat
    format and the prompts' identity."""
    return {"stage": dataclasses.asdict(stage), "policy": str(policy_source), "reference": str(reference_source),
            "rewards": rewards, "chat_format": chat_format.name, "data": prompts.identity()}


def run_grpo_stage(stage: GRPOStage, policy_source: ModelSource, reference_source: ModelSource, rewards_config: dict,
                   make_rewards: Callable[[], Rewards], chat: ChatMix, chat_format: ChatFormat, tokenizer_dir: Path,
                   reference_tokenizer_dir: Path, cursor: Cursor, out_dir: Path, parallel: ParallelConfig,
                   manifest_extra: dict | None = None, resume_with_changes: bool = False,
                   before_work: Callable[[], None] | None = None) -> dict:
    """GRPO of ``policy_source`` on the chat mix's problems, graded by ``make_rewards()`` (built once the process
    group exists; ``rewards_config`` is its fingerprint). The reference is loaded only for a KL term. Returns the
    stage's manifest (``checkpoint``: the trained policy); a finished stage with the same fingerprint is returned
    as it is."""
    started = time.monotonic()
    config = checked_policy("GRPO", "reference", parallel, policy_source, chat_format, tokenizer_dir,
                            reference_tokenizer_dir)
    prompts = ChatPrompts(chat, stage.train.seed, cursor, stage.train.global_batch_size)
    facts, done = prepare_stage(stage.name, stage.train, stage.optimizer,
                                stage_facts(stage, policy_source, reference_source, rewards_config, prompts,
                                            chat_format),
                                prompts, cursor, out_dir, resume_with_changes, before_work)
    if done is not None:
        return done
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    initialize(parallel, stage.train.seed)
    reference = frozen_model(reference_source, parallel, dtype) if stage.loss.kl_beta > 0 else None
    _, policy = load_source_model(policy_source, parallel, dtype, speed=stage.train.speed)
    rewards = make_rewards()
    use_per_token_loss(policy)
    stream, filter_counts = filtered_prompts(policy, rewards, chat_format, stage, prompts, cursor, Path(out_dir))
    evaluate = HeldoutPass(policy, rewards, chat_format, stage, prompts.heldout(stage.eval_prompts))
    step = GRPOStep(rewards, chat_format, stage, StepMetrics(Path(out_dir) / STEP_METRICS), reference)
    run = TrainingRun(policy, config, stage.train, stage.optimizer, Path(out_dir), tokenizer_dir, stage.name, facts)
    result = run.run(step, stream, evaluate, cursor)
    manifest = {**(manifest_extra or {}), "stage": stage.name, "config": dataclasses.asdict(stage),
                "policy_input": str(policy_source), "reference": str(reference_source), "rewards": rewards_config,
                "model_config": config.to_dict(), **result,
                "problem_filter": {k: v for k, v in filter_counts.items() if k != "dropped"} if filter_counts else None,
                **run_summary(Path(out_dir), Path(out_dir) / STEP_METRICS),
                "wall_seconds": time.monotonic() - started}
    if dist.get_rank() == 0:
        write_manifest(out_dir, manifest)
        logger.info("%s done: held-out pass@1 %.3f (start %.3f), truncation rate %.3f, %.0f s", stage.name,
                    result["eval"]["pass_at_1"], (manifest["eval_start"] or {}).get("pass_at_1", float("nan")),
                    result["eval"]["truncation_rate"], manifest["wall_seconds"])
    dist.barrier()
    return manifest
