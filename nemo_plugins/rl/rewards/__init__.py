"""Rewards of GRPO and of the problems evaluation: a problem record's ``meta["reward"]`` names how a response is
graded, in [0, 1].

- ``math``: the final answer, checked against ``meta["answer"]`` by math-verify (``rewards/math.py``);
- ``code``: the response's program against ``meta["tests"]`` in the sandbox, fraction passed (``rewards/code.py``);
- ``rubric``: an LLM judge's yes/no on each of ``meta["rubric"]``'s items, fraction satisfied (``rewards/rubric.py``).

Rewards are called on a batch (the rubric judge is a model: one forward per micro-batch, not per item); the
dispatcher groups a batch by kind, calls each kind once and puts the rewards back in the batch's order. Each
item carries the decoded response with its thinking: each kind strips what it must.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.sandbox import SandboxLimits


@dataclass(frozen=True)
class RewardItem:
    """One response to grade: the prompt's messages, the problem's meta (how to grade) and the decoded response."""

    messages: list[dict]
    meta: dict
    response: str


class Rewards(Protocol):
    def __call__(self, items: Sequence[RewardItem]) -> list[float]: ...


@dataclass
class MathRewardSettings:
    """``format_weight`` w: reward = (1 - w) * correct + w * well_formed (a closed think block, then an answer
    line); 0 grades correctness alone."""

    format_weight: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.format_weight < 1.0:
            raise ConfigError(f"rewards.math.format_weight={self.format_weight} must be in [0, 1): it is the share "
                              "of the reward given to a well-formed response; 0 turns the format reward off")


@dataclass
class CodeRewardSettings:
    """The sandbox limits of one response's run (its program and all its tests: ``sandbox.SandboxLimits``), the
    alarm of each test (and of the program's own top level), and how many runs go at once (each is a process that
    mostly waits, so a few per core)."""

    limits: SandboxLimits = field(default_factory=SandboxLimits)
    test_seconds: float = 2.0
    workers: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"rewards.code.workers={self.workers!r} must be a positive integer (sandbox runs at "
                              "once)")
        if not 0 < self.test_seconds <= self.limits.wall_seconds:
            raise ConfigError(f"rewards.code.test_seconds={self.test_seconds} must be positive and at most "
                              f"rewards.code.limits.wall_seconds={self.limits.wall_seconds:g} (one test's alarm "
                              "within the run's wall clock)")


DEFAULT_JUDGE_TEMPLATE = (
    "You check one requirement of an answer.\n\nQuestion:\n{prompt}\n\nAnswer:\n{response}\n\n"
    "Requirement: {item}\nDoes the answer satisfy the requirement? Reply yes or no.\nReply:"
)


@dataclass
class RubricRewardSettings:
    """The judge's prompt (``{prompt}``, ``{response}`` and ``{item}`` are filled in), the two answer strings whose
    next-token logits are compared (their first token each), and the judge's micro-batch size."""

    template: str = DEFAULT_JUDGE_TEMPLATE
    yes: str = " yes"
    no: str = " no"
    micro_batch_size: int = 8

    def __post_init__(self) -> None:
        missing = [name for name in ("{prompt}", "{response}", "{item}") if name not in self.template]
        if missing:
            raise ConfigError(f"rewards.rubric.template lacks {missing}: the judge must see the question, the "
                              "answer and the rubric item")
        try:
            self.template.format(prompt="", response="", item="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(f"rewards.rubric.template does not format ({type(err).__name__}: {err}): write other "
                              "braces doubled ({{ and }})") from None
        if not self.yes or not self.no or self.yes == self.no:
            raise ConfigError(f"rewards.rubric.yes={self.yes!r} and no={self.no!r} must be two different "
                              "non-empty strings (the judge's two answers)")
        if isinstance(self.micro_batch_size, bool) or not isinstance(self.micro_batch_size, int) \
                or self.micro_batch_size < 1:
            raise ConfigError(f"rewards.rubric.micro_batch_size={self.micro_batch_size!r} must be a positive "
                              "integer")


@dataclass
class RewardSettings:
    """Each kind's settings (``rewards:`` in a stage config)."""

    math: MathRewardSettings = field(default_factory=MathRewardSettings)
    code: CodeRewardSettings = field(default_factory=CodeRewardSettings)
    rubric: RubricRewardSettings = field(default_factory=RubricRewardSettings)


class _Dispatch:
    """Groups a batch by ``meta["reward"]``, grades each group with its kind in one call, restores the order."""

    def __init__(self, kinds: dict[str, Rewards | None]):
        self.kinds = kinds

    def __call__(self, items: Sequence[RewardItem]) -> list[float]:
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            kind = item.meta.get("reward")
            if kind not in self.kinds:
                raise DataError(f"meta.reward={kind!r} of a problem is not one of {sorted(self.kinds)}: fix the "
                                "problem records (each names how its responses are graded)")
            groups.setdefault(kind, []).append(index)
        rewards: list[float] = [0.0] * len(items)
        for kind, indices in groups.items():
            grade = self.kinds[kind]
            if grade is None:
                raise ConfigError("rubric-graded problems need a judge model: build_rewards(settings, judge=...) "
                                  "(the stage's judge source), or leave rubric problems out of the data")
            for index, reward in zip(indices, grade([items[i] for i in indices]), strict=True):
                rewards[index] = reward
        return rewards


def build_rewards(settings: RewardSettings, judge: Any = None) -> Rewards:
    """The batched reward of every kind; ``judge`` (a ``rubric.Judge``) grades rubric items and may be None when
    the data has none."""
    # imported here: math-verify loads sympy (seconds), which a run without math problems need not pay for
    from nemo_plugins.rl.rewards.code import CodeReward
    from nemo_plugins.rl.rewards.math import MathReward
    from nemo_plugins.rl.rewards.rubric import RubricReward

    return _Dispatch({
        "math": MathReward(settings.math),
        "code": CodeReward(settings.code),
        "rubric": None if judge is None else RubricReward(settings.rubric, judge),
    })
