"""The math reward: the response's final answer, verified against the problem's ``meta["answer"]`` by math-verify.

The final answer is taken from the response without its thinking (a think block left open, i.e. a response cut
at its length limit, leaves no answer), in this order:

1. the last ``Answer: ...`` line (``Final answer:`` and markdown bold around the label accepted): what the
   demo's problems ask for;
2. else the last ``\\boxed{...}`` (balanced braces): the convention of LaTeX-trained models;
3. else the last number in the text (``-3``, ``2.5``, ``7/3``, ``1,000``).

math-verify parses the extracted answer and the gold one (plain expressions and LaTeX) and compares them with
sympy, so 1/2 == 0.5 == \\frac{1}{2} while 7/3 != 2.33 (its float rounding is to 6 places). Its parse and verify
time-outs use SIGALRM, which only the main thread may set: elsewhere they are off.

Where the gold answer is one number (an integer, a decimal, a fraction), the answer must be one number too
(``x = 12``, ``12 cm``, ``\\frac{7}{3}``, or a computation ending ``= 12``): sympy evaluates an expression, so
without this ``Answer: 15 + 2`` verifies as 17. A GRPO run learnt exactly that, restating each question as its
answer, from 0.02 to 1.00 held-out "pass@1" in 24 steps (bench/RESULTS.md).

The optional format reward gives a share ``w`` of the reward to a well-formed response: one closed think block
first, then an answer line: reward = (1 - w) * correct + w * well_formed.
"""

from __future__ import annotations

import re
import threading
from typing import Sequence

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from nemo_plugins.data.thinking import THINK_SPANS, split_thinking
from nemo_plugins.errors import DataError
from nemo_plugins.rl.rewards import MathRewardSettings, RewardItem

_ANSWER_LINE = re.compile(r"^[ \t*_#>]*(?:final[ \t]+)?answer[ \t*_]*[:：][ \t*_]*(.*?)[ \t*_.]*$",
                          re.IGNORECASE | re.MULTILINE)
_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")
_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())


def _last_boxed(text: str) -> str | None:
    """The inside of the last ``\\boxed{...}`` whose braces balance, else None."""
    start = text.rfind(_BOXED)
    while start >= 0:
        depth, begin = 1, start + len(_BOXED)
        for index in range(begin, len(text)):
            depth += {"{": 1, "}": -1}.get(text[index], 0)
            if depth == 0:
                return text[begin:index].strip()
        start = text.rfind(_BOXED, 0, start)
    return None


def final_answer(response: str) -> str | None:
    """The final answer of ``response`` (thinking stripped) by the module's documented order, else None."""
    _, answer = split_thinking(response)
    lines = [match.group(1).strip() for match in _ANSWER_LINE.finditer(answer)]
    if lines and lines[-1]:
        return lines[-1]
    boxed = _last_boxed(answer)
    if boxed:
        return boxed
    numbers = _NUMBER.findall(answer)
    return numbers[-1].replace(",", "") if numbers else None


def well_formed(response: str) -> bool:
    """One think block, opening the response and closed, then a non-empty ``Answer:`` line after it."""
    text = response.lstrip()
    for open_, close in THINK_SPANS:
        if text.startswith(open_) and text.count(open_) == 1 and text.count(close) == 1:
            after = text.split(close, 1)[1]
            return any(match.group(1).strip() for match in _ANSWER_LINE.finditer(after))
    return False


def _parse(text: str, timeout: int | None) -> list:
    # a bare number or expression is not LaTeX-anchored; math-verify tries both extractors on it
    return parse(text, extraction_config=_EXTRACTION, parsing_timeout=timeout)


_LATEX_FRACTION = re.compile(r"\\d?frac\{\s*(-?\d+)\s*\}\{\s*(\d+)\s*\}")
_ONE_NUMBER = re.compile(rf"\D*(?:{_NUMBER.pattern})\D*")  # the last-number extraction's number, alone


def is_one_number(text: str) -> bool:
    """Whether ``text`` holds one number: ``-4``, ``2.5``, ``1,000``, ``7/3``, ``\\frac{7}{3}``, with words or
    units around it (``x is 12 cm``), and no second number (``15 + 2`` holds two)."""
    return _ONE_NUMBER.fullmatch(_LATEX_FRACTION.sub(r"\1/\2", text).strip()) is not None


def is_correct(answer: str | None, gold: str) -> bool:
    """Whether ``answer`` equals ``gold`` by math-verify (sympy equivalence); no answer is wrong. Where the gold is
    one number, what follows the answer's last ``=`` is compared and must be one number too (the module's
    docstring)."""
    if not answer:
        return False
    if is_one_number(gold):
        answer = answer.rsplit("=", 1)[-1]
        if not is_one_number(answer):
            return False
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold_parsed = _parse(gold, timeout)
    if not gold_parsed:
        raise DataError(f"meta.answer={gold!r} does not parse as a math answer: fix the problem record")
    return bool(verify(gold_parsed, _parse(answer, timeout), timeout_seconds=timeout))


class MathReward:
    """Correct final answer (and, with a format weight, a well-formed response) -> reward in [0, 1]."""

    def __init__(self, settings: MathRewardSettings):
        self.settings = settings

    def __call__(self, items: Sequence[RewardItem]) -> list[float]:
        weight = self.settings.format_weight
        rewards = []
        for item in items:
            if "answer" not in item.meta:
                raise DataError("a math problem's meta has no 'answer': each math record needs its exact answer")
            correct = is_correct(final_answer(item.response), str(item.meta["answer"]))
            rewards.append((1.0 - weight) * float(correct) + weight * float(well_formed(item.response)))
        return rewards
