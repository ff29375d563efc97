"""Instruct stage 2: online DPO with soft two-sided labels on the one training loop.

Per step and prompt, two responses from the current policy (temperature 0.7 by default) through the generation
engine, tools executed during sampling; a judge (the calibrated pairwise reward model) gives p = P(first wins);
a looping response (the engine's loop detector; a response cut at its length limit "never stops" and counts
too) loses against a clean one whatever the judge says, and a pair where both loop is dropped and counted. The
loss is ``dpo_loss.soft_dpo_loss`` on the policy-minus-reference log-ratio margin of the two responses'
sequence log-probs (``logprobs``: policy tokens only, injected tool output masked out); the reference is the
frozen starting (SFT) model, co-located in the policy's layout and run forward-only, with no optimizer state.

Prompts are the chat mix's conversations cut before their first assistant turn (``data/chat_prompts.py``), read in one
pass with the mix's cursor, so the data continues where SFT stopped. A step's sampling seeds are derived from
the cursor it starts at: a run resumed after a SIGKILL samples, scores and trains exactly as the uninterrupted
one. A prompt that leaves no room for ``max_new_tokens`` in ``train.seq_len`` is skipped and counted.

Simplifications: the generation engine decodes one token per step, so the policy trains in the layouts it can
generate in (TP x DP; no pipeline, context or sequence parallelism); every DP rank samples its own prompts.
The loop's metrics hold the loss; the step's other numbers (margin, mean |p - 0.5|, loop/drop/skip rates,
response length, tool calls) go to ``odpo_metrics.jsonl`` (rank 0, one record per step; a resumed run rewrites
the steps it repeats with the same values).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.chat_prompts import ChatPrompts, Prompt
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.thinking import strip_thinking
from nemo_plugins.distill.stage import prepare_stage
from nemo_plugins.distill.step import require_per_token_loss, use_per_token_loss
from nemo_plugins.distributed import ParallelConfig, device, initialize
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.generation.engine import Response, SamplingParams
from nemo_plugins.generation.loops import NO_STOP, LoopConfig
from nemo_plugins.manifest import write_manifest
from nemo_plugins.parallel_ops import summed_logs
from nemo_plugins.rl.dpo_loss import DPOOptions, log_ratio_margin, soft_dpo_loss
from nemo_plugins.rl.logprobs import frozen_sequence_logprobs, micro_batches, sample_rows, sequence_logprobs
from nemo_plugins.rl.online_stage import (
    StepMetrics,
    checked_policy,
    frozen_model,
    run_summary,
)
from nemo_plugins.rl.rollouts import sample_groups, tool_calls, tool_hook
from nemo_plugins.sandbox import SandboxLimits
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.loop import TrainingRun
from nemo_plugins.vision.checkpoint import load_source_model

logger = logging.getLogger(__name__)

STEP_METRICS = "odpo_metrics.jsonl"


class Judge(Protocol):
    def prob_first_wins(self, conversations: list[list[dict]], responses_a: list[str],
                        responses_b: list[str]) -> torch.Tensor:
        """[n] probabilities that ``responses_a[i]`` is the better answer to ``conversations[i]`` (the messages
        before the assistant's turn). Called on every rank with the same arguments within a DP rank's group."""
        ...


@dataclass
class ODPOSampling:
    """How the two responses per prompt are drawn, and what counts as looping."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    tools: bool = True  # offer nothing new: run the calls the policy writes (calculator, sandboxed Python)
    max_tool_calls: int = 4
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    loop: LoopConfig = field(default_factory=LoopConfig)
    truncation_is_loop: bool = True  # a response cut at max_new_tokens never stopped: a loop
    strip_thinking: bool = False  # [THINK]...[/THINK] (or <think>...</think>) removed before the judge reads
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError("sampling.temperature must be > 0 (two greedy samples are one response), "
                              f"got {self.temperature}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        if self.max_tool_calls < 0 or self.max_batch_size < 1:
            raise ConfigError("sampling.max_tool_calls must be >= 0 and sampling.max_batch_size >= 1")

    def params(self, seed: int, stop_id: int) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              stop_token_ids=(stop_id,), seed=seed, loop=self.loop)


@dataclass
class ODPOStage:
    name: str
    train: TrainSettings  # global_batch_size: prompts per step; micro_batch_size: pairs per micro-batch
    optimizer: OptimizerSettings
    dpo: DPOOptions = field(default_factory=DPOOptions)
    sampling: ODPOSampling = field(default_factory=ODPOSampling)
    loop_as_loser: bool = True  # False: the judge alone decides, looping or not (the ablation)
    eval_prompts: int = 16  # held-out prompts for the win rate against the reference

    def __post_init__(self) -> None:
        if self.sampling.max_new_tokens >= self.train.seq_len:
            raise ConfigError(f"sampling.max_new_tokens={self.sampling.max_new_tokens} leaves no room for a prompt in "
                              f"train.seq_len={self.train.seq_len}: raise seq_len or lower max_new_tokens")
        if self.eval_prompts < 1:
            raise ConfigError(f"eval_prompts must be >= 1, got {self.eval_prompts}")


# ----------------------------------------------------------------------------------------------- sampling
@dataclass
class Pair:
    prompt: Prompt
    a: Response
    b: Response


def sample_pairs(model: torch.nn.Module, prompts: Sequence[Prompt], seeds: Sequence[int], chat_format: ChatFormat,
                 sampling: ODPOSampling, seq_len: int) -> list[Pair | None]:
    """Two responses per prompt (request seeds ``seed`` and ``seed + 1``); None for a prompt with no room for
    ``max_new_tokens`` in ``seq_len`` (a counted skip). A collective over the model's TP group."""
    groups = sample_groups(model, prompts, seeds, 2, chat_format, sampling, seq_len, tool_hook(chat_format, sampling))
    return [Pair(prompt, *group) if group is not None else None for prompt, group in zip(prompts, groups)]


def loops(response: Response, sampling: ODPOSampling) -> bool:
    verdict = response.loop
    return verdict is not None and (sampling.truncation_is_loop or verdict.reason != NO_STOP)


def judged(judge: Judge, chat_format: ChatFormat, sampling: ODPOSampling,
           items: Sequence[tuple[Prompt, Response, Response]]) -> torch.Tensor:
    """The judge's P(first wins) for (prompt, first, second) triples, on the decoded (thinking-stripped) text."""
    if not items:
        return torch.zeros(0, dtype=torch.float64)

    def text(response: Response) -> str:
        decoded = chat_format.decode(response.token_ids)
        return strip_thinking(decoded) if sampling.strip_thinking else decoded

    p = judge.prob_first_wins([list(prompt.messages) for prompt, _, _ in items], [text(a) for _, a, _ in items],
                              [text(b) for _, _, b in items])
    return torch.as_tensor(p, dtype=torch.float64).reshape(-1).cpu()


def pair_labels(p: torch.Tensor, loops_a: torch.Tensor, loops_b: torch.Tensor,
                loop_as_loser: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(label, keep) per pair: a looping response loses against a clean one (p = 0 or 1) and a pair where both
    loop is dropped; without ``loop_as_loser`` the judge's p stands and every pair is kept."""
    if not loop_as_loser:
        return p, torch.ones_like(p, dtype=torch.bool)
    label = torch.where(loops_a & ~loops_b, torch.zeros_like(p), torch.where(loops_b & ~loops_a, torch.ones_like(p), p))
    return label, ~(loops_a & loops_b)


# ----------------------------------------------------------------------------------------------- the step
@dataclass
class ODPOStep:
    """``step(ddp, (prompts, seed, step)) -> mean loss per kept pair of the global batch`` for the training loop."""

    reference: torch.nn.Module
    judge: Judge
    chat_format: ChatFormat
    stage: ODPOStage
    metrics: StepMetrics

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        policy = ddp.module
        require_per_token_loss(policy, "pair")
        prompts, seed, step = batch
        train, sampling = self.stage.train, self.stage.sampling
        per_rank = len(prompts) // parallel_state.get_data_parallel_world_size()
        first = parallel_state.get_data_parallel_rank() * per_rank
        mine = prompts[first : first + per_rank]
        pairs = sample_pairs(policy, mine, [seed + 2 * (first + i) for i in range(per_rank)], self.chat_format,
                             sampling, train.seq_len)
        label, keep, stats = self._labels(pairs)
        rows = sample_rows([s for pair in pairs for s in _row_samples(pair)], train.seq_len, self.chat_format.pad_id)
        batches = micro_batches(rows, 2 * train.micro_batch_size)
        reference = (frozen_sequence_logprobs(self.reference, batches).to(torch.float32)
                     .split(2 * train.micro_batch_size))
        groups = list(zip(label.split(train.micro_batch_size), keep.split(train.micro_batch_size), reference))
        kept = torch.tensor([float(keep.sum())], device=device())
        dist.all_reduce(kept, group=parallel_state.get_data_parallel_group())
        # no pair left anywhere (every prompt skipped or every pair looping): no backward, zero gradients
        totals = self._train(ddp, batches, groups) if kept.item() > 0 else torch.zeros(3, dtype=torch.float64)
        loss_sum, pairs_kept, margin_sum = totals.tolist()
        self._record(step, stats, pairs_kept, margin_sum, loss_sum)
        return loss_sum / max(pairs_kept, 1.0)

    def _labels(self, pairs: list[Pair | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Labels and keep flags per pair (skipped prompts: not kept) and this rank's counts for the metrics."""
        sampling = self.stage.sampling
        present = [pair for pair in pairs if pair is not None]
        p = judged(self.judge, self.chat_format, sampling, [(x.prompt, x.a, x.b) for x in present])
        loops_a = torch.tensor([loops(x.a, sampling) for x in present], dtype=torch.bool)
        loops_b = torch.tensor([loops(x.b, sampling) for x in present], dtype=torch.bool)
        p_present, keep_present = pair_labels(p, loops_a, loops_b, self.stage.loop_as_loser)
        label, keep = torch.full((len(pairs),), 0.5, dtype=torch.float64), torch.zeros(len(pairs), dtype=torch.bool)
        index = torch.tensor([i for i, pair in enumerate(pairs) if pair is not None], dtype=torch.long)
        label[index], keep[index] = p_present, keep_present
        responses = [r for x in present for r in (x.a, x.b)]
        stats = torch.tensor([len(pairs), len(pairs) - len(present), len(responses),
                              float(loops_a.sum() + loops_b.sum()), float((~keep_present).sum()),
                              float(((p_present - 0.5).abs() * keep_present).sum()),
                              float(sum(sum(r.policy_mask) for r in responses)),
                              float(sum(tool_calls(r) for r in responses))], dtype=torch.float64)
        return label, keep, stats

    def _train(self, ddp: torch.nn.Module, batches: list[dict], groups: list[tuple]) -> torch.Tensor:
        """Forward + backward of every micro-batch through megatron's schedule; (loss sum, kept pairs, margin
        sum) over the global batch."""
        dpo = self.stage.dpo

        def forward_step(data_iterator, chunk):
            index, batch = next(data_iterator)
            label, keep, reference = groups[index]
            output = chunk(batch["tokens"], batch["positions"], labels=batch["labels"])

            def loss_func(per_token_loss):
                logp = sequence_logprobs(per_token_loss, batch["mask"])
                margin = log_ratio_margin(logp[0::2], reference[0::2], logp[1::2], reference[1::2])
                weight = keep.to(margin.device, margin.dtype)
                loss_sum = (soft_dpo_loss(margin, label.to(margin.device, margin.dtype), dpo) * weight).sum()
                count = keep.sum().to(torch.int)
                return loss_sum, count, {"loss_sum": loss_sum.detach().clone(), "pairs": count,
                                         "margin_sum": (margin.detach() * weight).sum()}

            return output, loss_func

        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(enumerate(batches)), model=[ddp],
            num_microbatches=len(batches), seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=2 * self.stage.train.micro_batch_size, forward_only=False)
        return torch.tensor(summed_logs(outputs, ("loss_sum", "pairs", "margin_sum")), dtype=torch.float64)

    def _record(self, step: int, stats: torch.Tensor, pairs_kept: float, margin_sum: float, loss_sum: float) -> None:
        totals = stats.to(device())
        dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        prompts, skipped, responses, looping, dropped, confidence, tokens, calls = totals.tolist()
        sampled = max(prompts - skipped, 1.0)
        self.metrics.record({"step": step, "loss": loss_sum / max(pairs_kept, 1.0),
                             "margin": margin_sum / max(pairs_kept, 1.0),
                             "label_confidence": confidence / max(sampled - dropped, 1.0),
                             "loop_rate": looping / max(responses, 1.0), "drop_rate": dropped / sampled,
                             "skipped_prompts": skipped, "pairs": pairs_kept,
                             "response_tokens": tokens / max(responses, 1.0),
                             "tool_calls": calls / max(responses, 1.0)})


def _row_samples(pair: Pair | None) -> list:
    if pair is None:
        return [None, None]
    return [(pair.prompt.ids, r.token_ids, r.policy_mask) for r in (pair.a, pair.b)]


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class WinRate:
    """The policy against the reference on held-out prompts: one response each per prompt (the same seeds, so
    before any step they are the same response), judged with the loop rule (both looping: a tie). The reference
    is frozen, so its responses are sampled once."""

    policy: torch.nn.Module
    reference: torch.nn.Module
    judge: Judge
    chat_format: ChatFormat
    stage: ODPOStage
    prompts: list[Prompt]
    _reference_responses: list[Response | None] | None = None

    def __call__(self) -> dict:
        if self._reference_responses is None:
            self._reference_responses = self._responses(self.reference)
        mine = self._responses(self.policy)
        both = [(prompt, a, b) for prompt, a, b in zip(self.prompts, mine, self._reference_responses) if a is not None]
        if not both:
            raise DataError(f"no held-out prompt fits train.seq_len={self.stage.train.seq_len} with "
                            f"max_new_tokens={self.stage.sampling.max_new_tokens}")
        sampling = self.stage.sampling
        p = judged(self.judge, self.chat_format, sampling, both)
        loops_policy = torch.tensor([loops(a, sampling) for _, a, _ in both])
        loops_reference = torch.tensor([loops(b, sampling) for _, _, b in both])
        label, keep = pair_labels(p, loops_policy, loops_reference, True)
        return {"win_rate": float(torch.where(keep, label, 0.5).mean()),
                "loop_rate": float(loops_policy.double().mean()),
                "reference_loop_rate": float(loops_reference.double().mean()),
                "response_tokens": float(np.mean([sum(a.policy_mask) for _, a, _ in both])),
                "prompts": float(len(both))}

    def _responses(self, model: torch.nn.Module) -> list[Response | None]:
        seeds = [self.stage.train.seed + 2 * i for i in range(len(self.prompts))]
        pairs = sample_pairs(model, self.prompts, seeds, self.chat_format, self.stage.sampling,
                             self.stage.train.seq_len)
        return [pair.a if pair is not None else None for pair in pairs]


# ----------------------------------------------------------------------------------------------- the stage
def stage_facts(stage: ODPOStage, policy_source: ModelSource, reference_source: ModelSource, judge: dict,
                prompts: ChatPrompts, chat_format: ChatFormat) -> dict:
    """What an ODPO stage adds to the loop's fingerprint: loss and sampling settings, the models, the judge's
    config, the chat format and the prompts' identity."""
    return {"stage": {"name": stage.name, "dpo": dataclasses.asdict(stage.dpo),
                      "sampling": dataclasses.asdict(stage.sampling), "loop_as_loser": stage.loop_as_loser,
                      "eval_prompts": stage.eval_prompts},
            "policy": str(policy_source), "reference": str(reference_source), "judge": judge,
            "chat_format": chat_format.name, "data": prompts.identity()}


def run_odpo_stage(stage: ODPOStage, policy_source: ModelSource, reference_source: ModelSource,
                   judge_config: dict, make_judge: Callable[[], Judge], chat: ChatMix, chat_format: ChatFormat,
                   tokenizer_dir: Path, reference_tokenizer_dir: Path, cursor: Cursor, out_dir: Path,
                   parallel: ParallelConfig, manifest_extra: dict | None = None, resume_with_changes: bool = False,
                   before_work: Callable[[], None] | None = None) -> dict:
    """Online DPO of ``policy_source`` against the frozen ``reference_source`` on the chat mix's prompts, judged
    by ``make_judge()`` (built once the process group exists; ``judge_config`` is its fingerprint). Returns the
    stage's manifest (``checkpoint``: the trained policy); a finished stage with the same fingerprint is returned
    as it is."""
    started = time.monotonic()
    config = checked_policy("online DPO", "stage.odpo.reference", parallel, policy_source, chat_format, tokenizer_dir,
                            reference_tokenizer_dir)
    prompts = ChatPrompts(chat, stage.train.seed, cursor, stage.train.global_batch_size)
    facts, done = prepare_stage(stage.name, stage.train, stage.optimizer,
                                stage_facts(stage, policy_source, reference_source, judge_config, prompts, chat_format),
                                prompts, cursor, out_dir, resume_with_changes, before_work)
    if done is not None:
        return done
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    initialize(parallel, stage.train.seed)
    reference = frozen_model(reference_source, parallel, dtype)
    _, policy = load_source_model(policy_source, parallel, dtype, speed=stage.train.speed)
    judge = make_judge()
    use_per_token_loss(policy)
    evaluate = WinRate(policy, reference, judge, chat_format, stage, prompts.heldout(stage.eval_prompts))
    step = ODPOStep(reference, judge, chat_format, stage, StepMetrics(Path(out_dir) / STEP_METRICS))
    run = TrainingRun(policy, config, stage.train, stage.optimizer, Path(out_dir), tokenizer_dir, stage.name, facts)
    result = run.run(step, prompts, evaluate, cursor)
    manifest = {**(manifest_extra or {}), "stage": stage.name, "config": dataclasses.asdict(stage),
                "policy_input": str(policy_source), "reference": str(reference_source), "judge": judge_config,
                "model_config": config.to_dict(), **result, **run_summary(Path(out_dir), Path(out_dir) / STEP_METRICS),
                "wall_seconds": time.monotonic() - started}
    if dist.get_rank() == 0:
        write_manifest(out_dir, manifest)
        logger.info("%s done: win rate vs reference %.3f (start %.3f), loop rate %.3f, %.0f s", stage.name,
                    result["eval"]["win_rate"], (manifest["eval_start"] or {}).get("win_rate", float("nan")),
                    result["eval"]["loop_rate"], manifest["wall_seconds"])
    dist.barrier()
    return manifest
