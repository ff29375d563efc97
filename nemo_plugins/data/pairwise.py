"""Offline pairwise preference data with a verifiable reason for every pair: what the pairwise reward model learns.

No preference data set is reachable, so the project builds pairs whose winner a program can check, from what
every machine with Python has. Four kinds:

* ``arithmetic``: generated word problems (``instruct_sources.word_problems``, exact answers); the response whose
  final ``Answer:`` equals the exact value beats one whose answer does not;
* ``code``: functions of the standard library (``CODE_FUNCTIONS``); a candidate passes when it agrees with the real
  function on seeded inputs, run in the sandbox (``nemo_plugins.sandbox``, one run for the whole batch, each
  candidate under a 1 s alarm); the real source beats a mutant (one AST mutation: a comparison, an operator, a
  constant) that fails at least one case. Both are ``ast.unparse``-d, so the one mutation is the only difference;
* ``loops``: a clean answer beats the same answer looping (a span repeated until the detector of
  ``generation.loops`` flags it, on words) or truncated mid-answer (a strict prefix, its last line missing);
* ``format``: an instruction with a checkable format constraint (lowercase, a JSON object, answer tags, a word
  limit); a response that follows it beats the same content that does not.

Responses come from a model's own samples where possible (``Sampler``: the generation engine on the policy, so
the reward model sees the policy's distribution): a sample that passes the kind's check can be the chosen one
(arithmetic, code), a sample that fails it is the rejected one. Where no sample qualifies, or no sampler is
given, the rejected response is a programmatic perturbation of the reference and the chosen one the reference;
``Pair.origin`` records which, and the recipe reports the share of each.

``Pair.target`` is the probability that ``chosen`` is the better response: 1 for these verified reasons (soft
targets come from files written by others). The last ``heldout_fraction`` of every kind is held out. Pairs are
cached as JSONL (one pair per line, its reason included) under a name that digests the settings, this module,
the word-problem generator and the sampler's identity.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import string
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol, Sequence

from nemo_plugins.data import instruct_sources
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.generation import tools
from nemo_plugins.generation.loops import LoopConfig, find_loop
from nemo_plugins.sandbox import SandboxLimits, run_python

KINDS = ("arithmetic", "code", "loops", "format")
CHOSEN_ORIGINS = ("reference", "sampled")
REJECTED_ORIGINS = ("perturbed", "sampled")
WORD_LOOP = LoopConfig(ngram=6, repeats=4)  # loops in words: a 6-word span seen 4 times


@dataclass(frozen=True)
class Pair:
    """A conversation (the messages before the assistant's answer) and two answers, ``chosen`` the better one."""

    kind: str
    messages: list[dict]
    chosen: str
    rejected: str
    reason: str
    origin: dict[str, str]
    target: float = 1.0
    split: str = "train"
    meta: dict = field(default_factory=dict)  # what re-checking the reason needs (the answer, the code's cases, ...)

    def __post_init__(self) -> None:
        if not 0.0 <= self.target <= 1.0:
            raise DataError(f"pair target {self.target} is not a probability")
        if self.split not in ("train", "heldout"):
            raise DataError(f"pair split {self.split!r} must be train or heldout")

    @classmethod
    def from_json(cls, line: str, where: str) -> "Pair":
        try:
            return cls(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise DataError(f"{where}: not a pair record ({err})") from err


@dataclass(frozen=True)
class Sample:
    """A sampled answer and the engine's loop verdict (``None``: it stopped cleanly)."""

    text: str
    loop: str | None = None


class Sampler(Protocol):
    def sample(self, conversations: list[list[dict]]) -> list[list[Sample]]:
        """Some answers of the model to each conversation (a collective over its tensor-parallel group)."""
        ...


@dataclass(frozen=True)
class PairwiseSettings:
    """How many pairs of each kind, the held-out share and the seed. ``counts`` keys are ``KINDS``."""

    counts: dict[str, int] = field(default_factory=lambda: {"arithmetic": 200, "code": 64, "loops": 120, "format": 120})
    heldout_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.counts) - set(KINDS))
        if unknown:
            raise ConfigError(f"pairs.counts: unknown kind(s) {unknown}; choose from {list(KINDS)}")
        if any(n < 0 for n in self.counts.values()) or not sum(self.counts.values()):
            raise ConfigError(f"pairs.counts must be >= 0 and not all 0, got {self.counts}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"pairs.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


@dataclass(frozen=True)
class Task:
    """One prompt of a kind: its conversation, the reference answer, and what the kind's check needs."""

    kind: str
    messages: list[dict]
    reference: str
    check: dict


# --------------------------------------------------------------------------------------------- arithmetic
_ANSWER = re.compile(r"Answer:\s*(-?[0-9][0-9./]*)")
_ANSWER_INSTRUCTION = "\nShow your steps and end with a line 'Answer: <value>'."


def final_answer(text: str) -> Fraction | None:
    """The value of the last ``Answer: <number>`` in ``text`` (integer, decimal or p/q), or None."""
    found = _ANSWER.findall(text)
    if not found:
        return None
    try:
        return Fraction(found[-1].rstrip("."))
    except (ValueError, ZeroDivisionError):
        return None


def _arithmetic_tasks(count: int, seed: int) -> list[Task]:
    return [Task("arithmetic", [{"role": "user", "content": problem.question + _ANSWER_INSTRUCTION}],
                 problem.solution(), {"answer": tools.format_exact(problem.answer), "expression": problem.expression})
            for problem in instruct_sources.word_problems(count, seed, stream="pairwise_arithmetic")]


def _wrong_solution(task: Task, rng: random.Random) -> tuple[str, str]:
    """The reference with its last step's result and final answer changed (a slip in the last step)."""
    right = Fraction(task.check["answer"])
    wrong = right + rng.choice((-10, -2, -1, 1, 2, 10)) if rng.random() < 0.8 or right == 0 else right * 2
    new = tools.format_exact(wrong)
    *steps, last_step, _ = task.reference.splitlines()
    last_step = last_step[: last_step.rindex("= ") + 2] + new
    return "\n".join([*steps, last_step, f"Answer: {new}"]), new


def _arithmetic_pairs(tasks: list[Task], samples: list[list[Sample]], rng: random.Random) -> list[Pair]:
    pairs = []
    for task, drawn in zip(tasks, samples):
        right = Fraction(task.check["answer"])
        correct = [s for s in drawn if s.loop is None and final_answer(s.text) == right]
        wrong = [s for s in drawn if final_answer(s.text) != right]
        chosen, chosen_origin = (correct[0].text, "sampled") if correct else (task.reference, "reference")
        if wrong:
            rejected, got = wrong[0].text, final_answer(wrong[0].text)
            origin, shown = "sampled", "no final answer" if got is None else f"final answer {tools.format_exact(got)}"
        else:
            rejected, shown = _wrong_solution(task, rng)
            origin, shown = "perturbed", f"final answer {shown}"
        reason = (f"exact answer {task.check['answer']} (= {task.check['expression']}): chosen has it, "
                  f"rejected has {shown}")
        pairs.append(Pair("arithmetic", task.messages, chosen, rejected, reason,
                          {"chosen": chosen_origin, "rejected": origin}, meta=dict(task.check)))
    return pairs


# ------------------------------------------------------------------------------------------------- code
def _floats(rng: random.Random, n: int, low: float = 0.0, high: float = 1.0) -> list[float]:
    return [round(rng.uniform(low, high), 3) for _ in range(n)]


def _words(rng: random.Random) -> str:
    letters = string.ascii_letters
    return rng.choice((" ", "  ", "\t")).join("".join(rng.choice(letters) for _ in range(rng.randint(1, 6)))
                                              for _ in range(rng.randint(0, 5)))


def _snippet(rng: random.Random) -> str:
    indent = rng.choice(("", "  ", "    ", "\t"))
    lines = [indent + rng.choice(("", "  ")) + _words(rng).strip() if rng.random() > 0.15 else ""
             for _ in range(rng.randint(1, 5))]
    return "\n".join(lines) + rng.choice(("", "\n"))


def _shell_text(rng: random.Random) -> str:
    return "".join(rng.choice("ab c'$\"-_./=@%") for _ in range(rng.randint(0, 8)))


@dataclass(frozen=True)
class CodeFunction:
    """A standard-library function with a pure-Python source and a generator of its arguments."""

    module: str
    name: str
    arguments: Callable[[random.Random], list]
    description: str


CODE_FUNCTIONS: tuple[CodeFunction, ...] = (
    CodeFunction("colorsys", "rgb_to_hsv", lambda r: _floats(r, 3), "Convert an RGB colour (floats in [0, 1]) to HSV."),
    CodeFunction("colorsys", "hsv_to_rgb", lambda r: _floats(r, 3), "Convert an HSV colour (floats in [0, 1]) to RGB."),
    CodeFunction("colorsys", "rgb_to_hls", lambda r: _floats(r, 3), "Convert an RGB colour (floats in [0, 1]) to HLS."),
    CodeFunction("colorsys", "hls_to_rgb", lambda r: _floats(r, 3), "Convert an HLS colour (floats in [0, 1]) to RGB."),
    CodeFunction("colorsys", "rgb_to_yiq", lambda r: _floats(r, 3), "Convert an RGB colour (floats in [0, 1]) to YIQ."),
    CodeFunction("colorsys", "yiq_to_rgb", lambda r: [*_floats(r, 1), *_floats(r, 2, -0.6, 0.6)],
                 "Convert a YIQ colour to RGB, clamping each channel to [0, 1]."),
    CodeFunction("string", "capwords", lambda r: [_words(r)],
                 "Capitalise every word of a string (split on whitespace)."),
    CodeFunction("calendar", "isleap", lambda r: [r.choice((r.randint(1, 3000), 100 * r.randint(1, 30)))],
                 "Return True for leap years, False otherwise."),
    CodeFunction("calendar", "leapdays", lambda r: sorted([r.randint(1, 3000), r.randint(1, 3000)]),
                 "Return the number of leap years in the range [y1, y2)."),
    CodeFunction("calendar", "monthrange", lambda r: [r.randint(1, 2999), r.randint(1, 12)],
                 "Return the weekday of the first day of the month and the number of days in the month."),
    CodeFunction("shlex", "quote", lambda r: [_shell_text(r)], "Return a shell-escaped version of the string."),
    CodeFunction("textwrap", "dedent", lambda r: [_snippet(r)],
                 "Remove any common leading whitespace from every line."),
    CodeFunction("textwrap", "indent", lambda r: [_snippet(r), r.choice(("  ", "> ", "\t"))],
                 "Add a prefix to the beginning of the lines of a text that are not whitespace only."),
    CodeFunction("statistics", "median_low", lambda r: [[r.randint(-9, 9) for _ in range(r.randint(1, 7))]],
                 "Return the low median of numeric data."),
    CodeFunction("statistics", "median_high", lambda r: [[r.randint(-9, 9) for _ in range(r.randint(1, 7))]],
                 "Return the high median of numeric data."),
    CodeFunction("html", "escape",
                 lambda r: ["".join(r.choice("ab<>&\"' ") for _ in range(r.randint(0, 8))), r.random() < 0.5],
                 "Replace the characters &, < and > (and quotes when quote is true) by HTML-safe sequences."),
)
CASES_PER_FUNCTION = 12
_CODE_REQUEST = ("Write the Python function `{name}{signature}` of the `{module}` module. {description}\n"
                 "Reply with the code in a ```python block.")
_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)(?:```|$)", re.DOTALL)


class _Mutation(ast.NodeTransformer):
    """Changes the ``target``-th mutable site (in visiting order) and nothing else; ``done`` says what."""

    SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
             ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is,
             ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Add, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
             ast.Mod: ast.FloorDiv, ast.And: ast.Or, ast.Or: ast.And}

    def __init__(self, target: int) -> None:
        self.target, self.seen, self.done = target, 0, ""

    def _here(self) -> bool:
        self.seen += 1
        return self.seen - 1 == self.target

    def _swap(self, op: ast.AST) -> ast.AST:
        new = self.SWAPS[type(op)]()
        self.done = f"{type(op).__name__} -> {type(new).__name__}"
        return new

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        if type(node.ops[0]) in self.SWAPS and self._here():
            node.ops[0] = self._swap(node.ops[0])
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if type(node.op) in self.SWAPS and self._here():
            node.op = self._swap(node.op)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        if self._here():
            node.op = self._swap(node.op)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if type(node.value) is int and self._here():
            self.done = f"constant {node.value} -> {node.value + 1}"
            return ast.Constant(node.value + 1)
        return node


def function_source(function: CodeFunction) -> str:
    """The function's real source, normalised by ``ast.unparse`` (comments dropped, as in every mutant)."""
    import importlib
    import inspect

    return ast.unparse(ast.parse(inspect.getsource(getattr(importlib.import_module(function.module), function.name))))


def mutants(source: str) -> list[tuple[str, str]]:
    """Every single-site mutant of ``source`` as (code, what changed), in site order."""
    out, site = [], 0
    while True:
        mutation = _Mutation(site)
        code = ast.unparse(mutation.visit(ast.parse(source)))
        if not mutation.done:
            return out
        out.append((code, mutation.done))
        site += 1


_HARNESS = r'''
import contextlib, importlib, io, json, signal, sys
class Timeout(BaseException):
    pass
def alarm(*_):
    raise Timeout()
signal.signal(signal.SIGALRM, alarm)
def run(function, args):
    try:
        return repr(function(*args))
    except Timeout:
        raise
    except BaseException as exc:
        return "raises " + type(exc).__name__
def outcomes(code, job, module):
    namespace = dict(vars(module))
    signal.setitimer(signal.ITIMER_REAL, 2.0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if code is None:
                function = getattr(module, job["name"])
            else:
                exec(compile(code, "candidate", "exec"), namespace)
                function = namespace[job["name"]]
            return [run(function, args) for args in job["cases"]], ""
    except Timeout:
        return None, "over 2 s"
    except BaseException as exc:
        return None, "does not define the function: " + type(exc).__name__
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
results = []
for job in json.loads(sys.stdin.read()):
    module = importlib.import_module(job["module"])
    expected, _ = outcomes(None, job, module)
    verdicts = []
    for code in job["candidates"]:
        got, failure = outcomes(code, job, module)
        if got is None:
            bad = list(range(len(expected)))
        else:
            bad = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
        if got is not None and bad:
            i = bad[0]
            failure = "%s%r returned %s, expected %s" % (job["name"], tuple(job["cases"][i]),
                                                         got[i][:80], expected[i][:80])
        verdicts.append({"passed": len(expected) - len(bad), "failure": failure})
    results.append(verdicts)
print("RESULTS " + json.dumps(results))
'''


def run_code_checks(jobs: list[dict], limits: SandboxLimits) -> list[list[dict]]:
    """For each job ``{"module", "name", "cases", "candidates"}``: per candidate, the cases on which it returns
    (or raises) what the real function does, and the first failure. One sandbox run for all of them."""
    result = run_python(_HARNESS, limits, stdin=json.dumps(jobs))
    line = next((x for x in result.stdout.splitlines() if x.startswith("RESULTS ")), None)
    if not result.ok or line is None:
        raise DataError(f"the sandboxed code checks failed ({result.status}: {result.reason}); "
                        "raise pairs.sandbox limits or lower pairs.counts.code")
    return json.loads(line.removeprefix("RESULTS "))


def _code_tasks(count: int, seed: int) -> list[Task]:
    import importlib
    import inspect

    rng = random.Random(f"pairwise_code/{seed}")
    tasks = []
    for k in range(count):
        function = CODE_FUNCTIONS[k % len(CODE_FUNCTIONS)]
        real = getattr(importlib.import_module(function.module), function.name)
        request = _CODE_REQUEST.format(name=function.name, signature=inspect.signature(real), module=function.module,
                                       description=function.description)
        cases = [function.arguments(rng) for _ in range(CASES_PER_FUNCTION)]
        reference = f"```python\n{function_source(function)}\n```"
        check = {"module": function.module, "name": function.name, "cases": cases, "mutant": k // len(CODE_FUNCTIONS)}
        tasks.append(Task("code", [{"role": "user", "content": request}], reference, check))
    return tasks


def code_of(text: str) -> str:
    """The code of an answer: its first fenced block, else the whole text."""
    found = _CODE_BLOCK.search(text)
    return found.group(1) if found else text


def _code_pairs(tasks: list[Task], samples: list[list[Sample]], rng: random.Random,
                limits: SandboxLimits) -> list[Pair]:
    """Every task's reference, samples and mutants checked in one sandbox run; a pair per task whose reference
    passes and that has a failing candidate (a failing sample first, else the task's own failing mutant)."""
    mutated = []
    for task in tasks:
        order = mutants(code_of(task.reference))
        # the same order for every task of a function
        random.Random(f"{task.check['name']}/{len(order)}").shuffle(order)
        mutated.append(order)
    jobs = [{"module": t.check["module"], "name": t.check["name"], "cases": t.check["cases"],
             "candidates": [code_of(t.reference), *(code_of(s.text) for s in drawn), *(code for code, _ in order)]}
            for t, drawn, order in zip(tasks, samples, mutated)]
    pairs = []
    for task, drawn, order, found in zip(tasks, samples, mutated, run_code_checks(jobs, limits)):
        total = len(task.check["cases"])
        if found[0]["passed"] != total:
            raise DataError(f"the real {task.check['module']}.{task.check['name']} fails its own cases "
                            f"({found[0]['failure']}): the harness or the cases are wrong")
        verdicts = found[1:]
        passing = [s.text for s, v in zip(drawn, verdicts) if v["passed"] == total and s.loop is None]
        failing = [(s.text, v, "sampled", "a sampled answer") for s, v in zip(drawn, verdicts) if v["passed"] < total]
        failing_mutants = [(f"```python\n{code}\n```", v, "perturbed", f"mutant {what}")
                           for (code, what), v in zip(order, verdicts[len(drawn):]) if v["passed"] < total]
        if not failing and not failing_mutants:
            continue
        loser = failing[0] if failing else failing_mutants[task.check["mutant"] % len(failing_mutants)]
        rejected, verdict, origin, what = loser
        chosen, chosen_origin = (passing[0], "sampled") if passing else (task.reference, "reference")
        reason = (f"sandboxed cases against the real {task.check['module']}.{task.check['name']}: chosen passes "
                  f"{total}/{total}, rejected ({what}) {verdict['passed']}/{total}: {verdict['failure']}")
        pairs.append(Pair("code", task.messages, chosen, rejected, reason,
                          {"chosen": chosen_origin, "rejected": origin},
                          meta={k: task.check[k] for k in ("module", "name", "cases")}))
    return pairs


# ------------------------------------------------------------------------------------------------ loops
def word_loop(text: str) -> str | None:
    """The loop detector of ``generation.loops`` on words: the repeated span, or None."""
    ids: dict[str, int] = {}
    verdict = find_loop([ids.setdefault(w, len(ids)) for w in text.split()], WORD_LOOP)
    if verdict is None:
        return None
    names = {v: k for k, v in ids.items()}
    return " ".join(names[i] for i in verdict.ngram)


def _loop_tasks(count: int, seed: int) -> list[Task]:
    tasks = []
    for problem in instruct_sources.word_problems(count, seed, stream="pairwise_loops"):
        tasks.append(Task("loops", [{"role": "user", "content": problem.question + _ANSWER_INSTRUCTION}],
                          problem.solution(), {}))
    return tasks


def _looping(reference: str, rng: random.Random) -> str:
    words = reference.split(" ")
    cut = max(8, int(len(words) * rng.uniform(0.3, 0.7)))
    span = words[max(0, cut - rng.randint(6, 10)) : cut]
    return " ".join(words[:cut] + span * 5)


def _truncated(reference: str, rng: random.Random) -> str:
    cut = int(len(reference) * rng.uniform(0.4, 0.7))
    return reference[: reference.rfind(" ", 0, cut)]


def _loop_pairs(tasks: list[Task], samples: list[list[Sample]], rng: random.Random) -> list[Pair]:
    pairs = []
    for k, (task, drawn) in enumerate(zip(tasks, samples)):
        if word_loop(task.reference) is not None:
            continue
        flagged = [s for s in drawn if s.loop is not None]
        if flagged:
            rejected, origin = flagged[0].text, "sampled"
            reason = f"rejected was flagged by the generation engine's loop detector ({flagged[0].loop}); chosen stops"
        elif k % 2 == 0:
            rejected, origin = _looping(task.reference, rng), "perturbed"
            span = word_loop(rejected)
            if span is None:
                raise DataError("a looping perturbation that the loop detector does not flag: "
                                "WORD_LOOP and _looping disagree")
            reason = f"rejected loops: the span {span!r} repeats {WORD_LOOP.repeats}+ times; chosen does not"
        else:
            rejected, origin = _truncated(task.reference, rng), "perturbed"
            reason = (f"rejected is truncated: it stops after {len(rejected)} of {len(task.reference)} characters, "
                      f"without the final line {task.reference.splitlines()[-1]!r}")
        pairs.append(Pair("loops", task.messages, task.reference, rejected, reason,
                          {"chosen": "reference", "rejected": origin}))
    return pairs


# ----------------------------------------------------------------------------------------------- format
@dataclass(frozen=True)
class FormatConstraint:
    """An instruction, a check of it, and a way to make the reference answer follow it."""

    name: str
    instruction: str
    follows: Callable[[str], bool]
    comply: Callable[[str, str], str]  # (reference solution, exact answer) -> an answer that follows it


def _is_json_answer(text: str) -> bool:
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(text)
        return isinstance(value, dict) and set(value) == {"answer"}
    return False


WORD_LIMIT = 12
FORMAT_CONSTRAINTS: tuple[FormatConstraint, ...] = (
    FormatConstraint("lowercase", "Write your whole answer in lowercase letters.",
                     lambda t: any(c.isalpha() for c in t) and t == t.lower(), lambda s, a: s.lower()),
    FormatConstraint("json", 'Reply with only a JSON object of the form {"answer": "<value>"}.', _is_json_answer,
                     lambda s, a: json.dumps({"answer": a})),
    FormatConstraint("tags", "Put the final value between <answer> and </answer> tags.",
                     lambda t: re.search(r"<answer>[^<]+</answer>", t) is not None,
                     lambda s, a: s.rsplit("\n", 1)[0] + f"\n<answer>{a}</answer>"),
    FormatConstraint("word_limit", f"Answer in at most {WORD_LIMIT} words.", lambda t: len(t.split()) <= WORD_LIMIT,
                     lambda s, a: f"The answer is {a}."),
)


def _format_tasks(count: int, seed: int) -> list[Task]:
    tasks = []
    for k, problem in enumerate(instruct_sources.word_problems(count, seed, stream="pairwise_format")):
        constraint = FORMAT_CONSTRAINTS[k % len(FORMAT_CONSTRAINTS)]
        tasks.append(Task("format", [{"role": "user", "content": f"{problem.question}\n{constraint.instruction}"}],
                          problem.solution(),
                          {"constraint": constraint.name, "answer": tools.format_exact(problem.answer)}))
    return tasks


def _format_pairs(tasks: list[Task], samples: list[list[Sample]], rng: random.Random) -> list[Pair]:
    by_name = {c.name: c for c in FORMAT_CONSTRAINTS}
    pairs = []
    for task, drawn in zip(tasks, samples):
        constraint = by_name[task.check["constraint"]]
        chosen = constraint.comply(task.reference, task.check["answer"])
        violating = [s for s in drawn if not constraint.follows(s.text)]
        rejected, origin = (violating[0].text, "sampled") if violating else (task.reference, "perturbed")
        if not constraint.follows(chosen):
            raise DataError(f"format constraint {constraint.name}: its compliant answer fails its own check")
        if constraint.follows(rejected):  # the reference happens to follow it too: no verified loser
            continue
        reason = f"constraint '{constraint.instruction}': chosen follows it, rejected does not"
        pairs.append(Pair("format", task.messages, chosen, rejected, reason,
                          {"chosen": "reference", "rejected": origin}, meta=dict(task.check)))
    return pairs


# ---------------------------------------------------------------------------------------------- building
TASKS: dict[str, Callable[[int, int], list[Task]]] = {
    "arithmetic": _arithmetic_tasks, "code": _code_tasks, "loops": _loop_tasks, "format": _format_tasks}


def make_tasks(settings: PairwiseSettings) -> dict[str, list[Task]]:
    """Every kind's prompts (deterministic, cheap: every rank can make them and sample answers to them)."""
    return {kind: TASKS[kind](settings.counts[kind], settings.seed) for kind in KINDS if settings.counts.get(kind)}


CODE_CHECK_LIMITS = SandboxLimits(wall_seconds=300, cpu_seconds=240, output_bytes=16 << 20)


def verified_pairs(tasks: dict[str, list[Task]], samples: dict[str, list[list[Sample]]] | None,
                   settings: PairwiseSettings, limits: SandboxLimits = CODE_CHECK_LIMITS) -> list[Pair]:
    """Pairs with their reasons, checked (the code in the sandbox), the last ``heldout_fraction`` of each kind
    marked held out."""
    out = []
    for kind, kind_tasks in tasks.items():
        drawn = samples[kind] if samples else [[] for _ in kind_tasks]
        rng = random.Random(f"pairwise_{kind}_perturb/{settings.seed}")
        if kind == "code":
            pairs = _code_pairs(kind_tasks, drawn, rng, limits)
        else:
            make_pairs = {"arithmetic": _arithmetic_pairs, "loops": _loop_pairs, "format": _format_pairs}[kind]
            pairs = make_pairs(kind_tasks, drawn, rng)
        train = len(pairs) - max(1, round(len(pairs) * settings.heldout_fraction))
        out += [Pair(**{**asdict(p), "split": "train" if i < train else "heldout"}) for i, p in enumerate(pairs)]
    return out


def cache_name(settings: PairwiseSettings, sampler_identity: str | None) -> str:
    """The cache file's name: a digest of the settings, this module, the generator it draws problems from, the
    interpreter (the code kind's sources are its standard library) and the sampler."""
    sources = Path(__file__).read_bytes() + Path(instruct_sources.__file__).read_bytes()
    key = json.dumps([asdict(settings), sampler_identity, platform.python_version()], sort_keys=True).encode()
    return f"pairs-{hashlib.sha256(sources + key).hexdigest()[:16]}.jsonl"


def write_pairs(pairs: Sequence[Pair], path: Path) -> Path:
    """One JSON pair per line, written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "w", encoding="utf-8") as out:
            for pair in pairs:
                out.write(json.dumps(asdict(pair), ensure_ascii=False) + "\n")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_pairs(path: Path) -> list[Pair]:
    """The pairs of a JSONL file (ours, or a user's in the same layout); a bad line is a DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"pair file {path} does not exist")
    with open(path, encoding="utf-8") as lines:
        pairs = [Pair.from_json(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not pairs:
        raise DataError(f"pair file {path} holds no pairs")
    return pairs


def pair_stats(pairs: Sequence[Pair]) -> dict:
    """Per kind and split: pairs, and how many chosen / rejected responses were sampled rather than made."""
    stats: dict = {}
    for p in pairs:
        row = stats.setdefault(p.kind, {"train": 0, "heldout": 0, "chosen_sampled": 0, "rejected_sampled": 0})
        row[p.split] += 1
        row["chosen_sampled"] += p.origin.get("chosen") == "sampled"
        row["rejected_sampled"] += p.origin.get("rejected") == "sampled"
    return stats


# ------------------------------------------------------------------------------------------ model samples
@dataclass
class PairSampling:
    """How the sampling model answers each prompt: ``samples`` answers at ``temperature``, ``max_new_tokens`` each."""

    samples: int = 2
    temperature: float = 0.7
    max_new_tokens: int = 128
    max_batch_size: int = 16

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_batch_size < 1:
            raise ConfigError(f"pairs.sampling.samples and max_batch_size must be >= 1, got {self.samples}, "
                              f"{self.max_batch_size}")
        if not self.temperature > 0:
            raise ConfigError(f"pairs.sampling.temperature must be > 0 (greedy samples repeat), got {self.temperature}")


class EngineSampler:
    """Answers sampled from a megatron model by the generation engine (the policy's own distribution): request
    ``i``'s ``j``-th sample has seed ``seed + samples * i + j``; the engine's loop verdict travels with it."""

    def __init__(self, model, chat_format, sampling: PairSampling = PairSampling(), seed: int = 0) -> None:
        from nemo_plugins.generation.engine import SamplingParams

        self.model, self.chat_format, self.sampling, self.seed = model, chat_format, sampling, seed
        self.params = SamplingParams(temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens,
                                     stop_token_ids=(chat_format.end_of_turn_id,))

    def sample(self, conversations: list[list[dict]]) -> list[list[Sample]]:
        from nemo_plugins.generation.engine import Request
        from nemo_plugins.generation.torch_engine import TorchEngine

        n = self.sampling.samples
        requests = [Request(self.chat_format.prompt_ids(messages),
                            dataclasses.replace(self.params, seed=self.seed + n * i + j))
                    for i, messages in enumerate(conversations) for j in range(n)]
        responses = TorchEngine(self.model, self.sampling.max_batch_size, self.chat_format.pad_id).generate(requests)
        out = []
        for i in range(len(conversations)):
            drawn = []
            for response in responses[n * i : n * (i + 1)]:
                ids = response.token_ids
                ids = ids[:-1] if ids and ids[-1] == self.chat_format.end_of_turn_id else ids
                drawn.append(Sample(self.chat_format.decode(ids), response.loop.reason if response.loop else None))
            out.append(drawn)
        return out


def build_or_load_pairs(settings: PairwiseSettings, cache_dir: str | Path,
                        make_sampler: Callable[[], Sampler] | None = None,
                        sampler_identity: str | None = None) -> tuple[list[Pair], Path]:
    """The pairs of ``settings`` from their cache file, built on first use: every rank samples (``make_sampler()``,
    called only then: the engine is a collective over tensor parallelism), rank 0 alone checks (sandbox) and
    writes, the others wait and read."""
    import torch.distributed as dist

    path = Path(cache_dir).expanduser() / cache_name(settings, sampler_identity)
    if not path.is_file():
        tasks = make_tasks(settings)
        sampler = make_sampler() if make_sampler is not None else None
        samples = ({kind: sampler.sample([t.messages for t in kind_tasks]) for kind, kind_tasks in tasks.items()}
                   if sampler else None)
        if not dist.is_initialized() or dist.get_rank() == 0:
            write_pairs(verified_pairs(tasks, samples, settings), path)
        if dist.is_initialized():
            dist.barrier()
    return read_pairs(path), path
