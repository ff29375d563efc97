"""Demo instruction data built offline from what every machine with Python has, as chat JSONL.

No dataset hub is reachable, so the SFT demo generates its conversations (``{"messages": [...]}``, roles
system / user / assistant / tool) from real material shipped with the interpreter, deterministically:

* ``stdlib_code``: a documented standard-library function's signature and docstring as the request, its real
  source as the answer (tests, IDLE, private names, trivial or very long bodies skipped; duplicates dropped);
* ``pydoc_topics``: questions on the reference manual's topic texts (``pydoc_data/topics.py``): a topic, one of
  its sections, a documented method or attribute, a grammar production; answers are the manual's own text,
  cut at a paragraph boundary;
* ``arithmetic``: multi-step word problems from a seeded generator with exact (``Fraction``) answers, a worked
  solution and a final ``Answer: <value>`` line; the answer and the expression that computes it are kept in
  ``meta`` for math rewards;
* ``arithmetic_tools``: the same problems solved by calling the ``calculator`` tool once per step;
* ``reasoning_math``, ``reasoning_code``, ``reasoning_rubric``: reasoning data, the worked solution as the
  assistant's ``thinking`` and ``meta`` saying how a response is rewarded (``data/reasoning_sources.py``).

The arithmetic is the real ``calculator`` tool's (``nemo_plugins.generation.tools``), not a second evaluator:
every step is computed by ``tools.evaluate`` on the operation the solution line shows, every tool message is what
the registry's ``calculator`` returns for that very call (an integer, an exact decimal, or ``p/q ≈ decimal``),
and the tool schema is the registry's, so the model trains on the tool outputs it will see at run time. Answers
and solution lines are written with ``tools.format_exact`` (an integer, a terminating decimal, or ``p/q``, never
the ``≈`` approximation) so that a math verifier parses them exactly; the problems keep answers such as 7/3.

``materialize("arithmetic?count=2000&seed=0", cache_dir)`` writes a source once, atomically, and returns the
JSONL path; the file name carries a digest of this module, of the calculator tool and of the interpreter's
version, so a change to any of them builds a new file instead of reusing a stale one. The held-out split is the
mix's job. HumanEval is never a source here: it is for evaluation (a test checks that none of its problems appears
in ``stdlib_code``).
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import json
import keyword
import math
import os
import platform
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qsl

from nemo_plugins.errors import ConfigError
from nemo_plugins.generation import tools

# --------------------------------------------------------------------------------------------- exact arithmetic

_TOOLS = tools.default_tools()


def _calculate(operation: str) -> Fraction:
    """The calculator's exact value of one step; these problems never leave the rationals."""
    value = tools.evaluate(operation)
    if not isinstance(value, Fraction):
        raise ValueError(f"{operation!r} is not rational: word problems need exact answers")
    return value


@dataclass(frozen=True)
class Quantity:
    """A number in a word problem: its exact value, the expression computing it from the question's numbers, and
    its last operation written with its operands' values (one line of a worked solution, one calculator call)."""

    value: Fraction
    expression: str
    operation: str

    @classmethod
    def given(cls, number: int) -> "Quantity":
        return cls(Fraction(number), str(number), str(number))

    def combine(self, symbol: str, other: "Quantity | int") -> "Quantity":
        other = other if isinstance(other, Quantity) else Quantity.given(other)
        operation = f"{_operand(self.value)} {symbol} {_operand(other.value)}"
        return Quantity(_calculate(operation), f"({self.expression} {symbol} {other.expression})", operation)

    def __add__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("+", other)

    def __sub__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("-", other)

    def __mul__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("*", other)

    def __truediv__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("/", other)

    def __floordiv__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("//", other)

    def __mod__(self, other: "Quantity | int") -> "Quantity":
        return self.combine("%", other)


def _operand(value: Fraction) -> str:
    """A value inside an operation: parenthesised when ``p/q`` or negative, so ``3 / (7/3)`` reads right."""
    text = tools.format_exact(value)
    return f"({text})" if "/" in text or value < 0 else text


# ------------------------------------------------------------------------------------------------ word problems

@dataclass(frozen=True)
class WordProblem:
    """A word problem with an exact answer: its template's name, the question and its worked steps
    ``(label, quantity)`` in order; the last step is the answer."""

    kind: str
    question: str
    steps: tuple[tuple[str, Quantity], ...]

    @property
    def answer(self) -> Fraction:
        return self.steps[-1][1].value

    @property
    def expression(self) -> str:
        """One expression over the question's numbers whose exact value is the answer (for verifiers)."""
        return self.steps[-1][1].expression

    def solution(self) -> str:
        """One ``label: operation = value`` line per step, then ``Answer: <value>``."""
        lines = [f"{label}: {q.operation} = {tools.format_exact(q.value)}" for label, q in self.steps]
        return "\n".join(lines + [f"Answer: {tools.format_exact(self.answer)}"])


_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Keiko", "Liam",
          "Maya", "Noah", "Olga", "Priya", "Quentin", "Rosa", "Sami", "Tara")
_ITEMS = ("notebooks", "pens", "apples", "candles", "mugs", "books", "tickets", "plants", "scarves", "batteries")
_INGREDIENTS = ("sugar", "flour", "milk", "butter", "rice", "oats")
_PROPER_FRACTIONS = tuple((n, d) for d in (2, 3, 4, 5, 8) for n in range(1, 2 * d) if math.gcd(n, d) == 1)


def _shopping(rng: random.Random) -> WordProblem:
    name, (first, second) = rng.choice(_NAMES), rng.sample(_ITEMS, 2)
    a, p, b, q = rng.randint(2, 9), rng.randint(2, 15), rng.randint(2, 9), rng.randint(2, 15)
    cost_a, cost_b = Quantity.given(a) * p, Quantity.given(b) * q
    total = cost_a + cost_b
    note = 20 * (int(total.value) // 20 + 1)
    question = (f"{name} buys {a} {first} at ${p} each and {b} {second} at ${q} each, and pays with ${note}. "
                f"How much change, in dollars, does {name} get?")
    return WordProblem("shopping", question, (
        (f"Cost of the {first}", cost_a), (f"Cost of the {second}", cost_b), ("Total cost", total),
        ("Change", Quantity.given(note) - total)))


def _pumps(rng: random.Random) -> WordProblem:
    capacity, r1, r2 = rng.randint(20, 120) * 10, rng.randint(3, 25), rng.randint(3, 25)
    start = rng.randint(1, capacity // 20) * 10
    remaining, rate = Quantity.given(capacity) - start, Quantity.given(r1) + r2
    question = (f"A tank holds {capacity} litres and already contains {start} litres. Two pumps fill it, one at "
                f"{r1} litres per minute and the other at {r2} litres per minute. How many minutes does it take to "
                f"fill the tank?")
    return WordProblem("rates", question, (
        ("Litres still needed", remaining), ("Litres per minute together", rate), ("Minutes", remaining / rate)))


def _travel(rng: random.Random) -> WordProblem:
    name, s1, t1, s2, minutes = (rng.choice(_NAMES), rng.randint(8, 30), rng.randint(2, 5), rng.randint(8, 30),
                                 rng.choice((10, 15, 20, 25, 40, 45, 50)))
    first, hours = Quantity.given(s1) * t1, Quantity.given(minutes) / 60
    second = Quantity.given(s2) * hours
    question = (f"{name} cycles at {s1} km per hour for {t1} hours, then at {s2} km per hour for {minutes} "
                f"minutes. How many kilometres does {name} cycle in total?")
    return WordProblem("distance", question, (
        ("Distance of the first part", first), ("Hours of the second part", hours),
        ("Distance of the second part", second), ("Total distance", first + second)))


def _ages(rng: random.Random) -> WordProblem:
    name = rng.choice(_NAMES)
    brother, gap, factor, years = rng.randint(6, 14), rng.randint(1, 9), rng.randint(3, 4), rng.randint(2, 15)
    younger = Quantity.given(brother + gap) - gap
    father = younger * factor
    question = (f"{name} is {brother + gap} years old. {name}'s brother is {gap} years younger, and their father is "
                f"{factor} times as old as the brother. How old will the father be in {years} years?")
    return WordProblem("ages", question, (
        ("Brother's age", younger), ("Father's age now", father), (f"Father's age in {years} years", father + years)))


def _bakery(rng: random.Random) -> WordProblem:
    name, per_box = rng.choice(_NAMES), rng.randint(4, 12)
    cookies = per_box * rng.randint(3, 20) + rng.randint(1, per_box - 1)
    box_price, loose_price = rng.randint(5, 20), rng.randint(1, 3)
    boxes, loose = Quantity.given(cookies) // per_box, Quantity.given(cookies) % per_box
    box_money, loose_money = boxes * box_price, loose * loose_price
    question = (f"{name} bakes {cookies} cookies and packs them in boxes of {per_box}. Each full box sells for "
                f"${box_price} and each cookie left over sells for ${loose_price}. How many dollars does {name} "
                f"make by selling all the cookies?")
    return WordProblem("bakery", question, (
        ("Full boxes", boxes), ("Cookies left over", loose), ("Money from boxes", box_money),
        ("Money from loose cookies", loose_money), ("Total money", box_money + loose_money)))


def _referees(rng: random.Random) -> WordProblem:
    team = rng.randint(4, 11)
    students, pay, games = team * rng.randint(3, 12) + rng.randint(1, team - 1), rng.randint(5, 25), rng.randint(2, 8)
    referees = Quantity.given(students) % team
    per_game = referees * pay
    question = (f"{students} students are split into teams of {team}; the students left over become referees. "
                f"Each referee is paid ${pay} per game and there are {games} games. How many dollars are the "
                f"referees paid in total?")
    return WordProblem("referees", question, (
        ("Referees", referees), ("Pay per game", per_game), ("Total pay", per_game * games)))


def _recipe(rng: random.Random) -> WordProblem:
    name, ingredient = rng.choice(_NAMES), rng.choice(_INGREDIENTS)
    numerator, denominator = rng.choice(_PROPER_FRACTIONS)
    batches = rng.randint(2, 7)
    per_batch = Quantity.given(numerator) / denominator
    used = per_batch * batches
    bag = int(used.value) + rng.randint(1, 6)
    question = (f"A recipe needs {numerator}/{denominator} cups of {ingredient} per batch. {name} makes {batches} "
                f"batches from a bag holding {bag} cups of {ingredient}. How many cups are left in the bag?")
    return WordProblem("fractions", question, (
        ("Cups per batch", per_batch), ("Cups used", used), ("Cups left", Quantity.given(bag) - used)))


def _discount(rng: random.Random) -> WordProblem:
    item = rng.choice(("jacket", "lamp", "bicycle", "backpack", "guitar", "chair"))
    price, percent, coupon = rng.randint(4, 60) * 5, rng.choice((5, 10, 15, 20, 25, 30, 40, 50)), rng.randint(2, 15)
    rate = Quantity.given(percent) / 100
    discount = Quantity.given(price) * rate
    sale = Quantity.given(price) - discount
    question = (f"A {item} costs ${price}. It is on sale for {percent}% off, and a coupon then takes ${coupon} off "
                f"the sale price. What is the final price in dollars?")
    return WordProblem("percentages", question, (
        ("Discount rate", rate), ("Discount", discount), ("Sale price", sale), ("Final price", sale - coupon)))


WORD_PROBLEM_TEMPLATES: dict[str, Callable[[random.Random], WordProblem]] = {
    "shopping": _shopping, "rates": _pumps, "distance": _travel, "ages": _ages, "bakery": _bakery,
    "referees": _referees, "fractions": _recipe, "percentages": _discount}


def word_problems(count: int, seed: int = 0, stream: str = "word_problems") -> Iterator[WordProblem]:
    """``count`` word problems with exact answers, the same for the same (seed, stream), templates drawn
    uniformly; the reasoning stages reuse it (with their own ``stream``) for math problems with verified answers."""
    rng = random.Random(f"{stream}/{seed}")
    templates = list(WORD_PROBLEM_TEMPLATES.values())
    for _ in range(count):
        yield rng.choice(templates)(rng)


def _problem_meta(problem: WordProblem, source: str) -> dict:
    return {"source": source, "kind": problem.kind, "answer": tools.format_exact(problem.answer),
            "expression": problem.expression}


def arithmetic(count: int | None, seed: int) -> Iterator[dict]:
    """Word problems answered with a worked solution ending in ``Answer: <value>``."""
    for problem in word_problems(count or 0, seed, stream="arithmetic"):
        yield {"messages": [{"role": "user", "content": problem.question},
                            {"role": "assistant", "content": problem.solution()}],
               "meta": _problem_meta(problem, "arithmetic")}


CALCULATOR_TOOL = next(schema for schema in _TOOLS.schemas() if schema["function"]["name"] == "calculator")
_TOOL_SYSTEM = ("You are a careful assistant. Use the calculator tool for every arithmetic step; it returns exact "
                "results. End with a line 'Answer: <value>'.")


def arithmetic_tools(count: int | None, seed: int) -> Iterator[dict]:
    """The same kind of problems, one calculator call per step, each followed by what the tool returns for it."""
    for problem in word_problems(count or 0, seed, stream="arithmetic_tools"):
        messages = [{"role": "system", "content": _TOOL_SYSTEM}, {"role": "user", "content": problem.question}]
        for number, (label, quantity) in enumerate(problem.steps):
            call_id, arguments = f"call{number:05d}", {"expression": quantity.operation}
            messages.append({"role": "assistant", "content": f"{label}:", "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "calculator", "arguments": arguments}}]})
            result = _TOOLS.call(tools.ToolCall("calculator", arguments))
            if not result.ok:
                raise RuntimeError(f"the calculator refused a generated step {arguments}: {result.content}")
            messages.append({"role": "tool", "name": "calculator", "tool_call_id": call_id, "content": result.content})
        messages.append({"role": "assistant", "content": problem.solution()})
        yield {"messages": messages, "tools": [CALCULATOR_TOOL], "meta": _problem_meta(problem, "arithmetic_tools")}


# ------------------------------------------------------------------------------------------------- stdlib code

_SKIPPED_PARTS = frozenset({"test", "tests", "idlelib", "idle_test", "turtledemo", "site-packages", "dist-packages",
                            "__pycache__"})
_CODE_REQUESTS = (
    "Write {what} that does the following:\n\n{doc}",
    "Implement {what}, following this docstring:\n\n{doc}",
    "From the `{module}` module: write {what}.\n\n{doc}",
)


@dataclass(frozen=True)
class CodeTask:
    """A documented standard-library function or method and its real source (dedented)."""

    module: str
    owner: str | None
    name: str
    signature: str
    docstring: str
    source: str


def stdlib_files() -> list[Path]:
    """This interpreter's public standard-library modules, sorted (tests, IDLE and private modules left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [path for path in sorted(root.rglob("*.py"))
            if not _SKIPPED_PARTS & set(path.relative_to(root).parts)
            and not path.name.startswith("test") and (path.name == "__init__.py" or not path.name.startswith("_"))]


def code_tasks(path: Path, root: Path) -> Iterator[CodeTask]:
    """Top-level functions and methods of public top-level classes in one file that make a sensible task."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return
    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    lines = text.splitlines()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            task = _code_task(node, None, module, lines)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for child in node.body:
                if isinstance(child, ast.FunctionDef) and (task := _code_task(child, node.name, module, lines)):
                    yield task
            continue
        else:
            continue
        if task:
            yield task


def _code_task(node: ast.FunctionDef, owner: str | None, module: str, lines: list[str]) -> CodeTask | None:
    """The task for one function, or None when it is private, decorated, trivial, too short or too long."""
    docstring = ast.get_docstring(node)
    if node.name.startswith("_") or node.decorator_list or not docstring or not 30 <= len(docstring) <= 1200:
        return None
    body = node.body[1:]
    if not body or all(isinstance(s, (ast.Pass, ast.Raise)) or isinstance(s, ast.Expr)
                       and isinstance(s.value, ast.Constant) for s in body):
        return None
    if not 2 <= body[-1].end_lineno - body[0].lineno + 1 <= 40:
        return None
    source = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
    try:
        parsed = ast.parse(source).body
    except SyntaxError:
        return None
    if len(parsed) != 1 or getattr(parsed[0], "name", None) != node.name or not source.isascii():
        return None
    signature = f"{node.name}({ast.unparse(node.args)})" + (f" -> {ast.unparse(node.returns)}" if node.returns else "")
    return CodeTask(module, owner, node.name, signature, docstring, source)


def stdlib_code(count: int | None, seed: int) -> Iterator[dict]:
    """Code requests from the standard library: docstring + signature -> real source, duplicates dropped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    tasks, seen = [], set()
    for path in stdlib_files():
        for task in code_tasks(path, root):
            keys = (" ".join(task.source.split()), (task.signature, task.docstring))
            if not seen.intersection(keys):
                seen.update(keys)
                tasks.append(task)
    rng = random.Random(f"stdlib_code/{seed}")
    rng.shuffle(tasks)
    for task in tasks[:count]:
        what = (f"the method `{task.signature}` of class `{task.owner}`" if task.owner
                else f"a Python function `{task.signature}`")
        request = rng.choice(_CODE_REQUESTS).format(what=what, doc=task.docstring, module=task.module)
        yield {"messages": [{"role": "user", "content": request},
                            {"role": "assistant", "content": f"```python\n{task.source}\n```"}],
               "meta": {"source": "stdlib_code", "module": task.module, "owner": task.owner, "name": task.name}}


# ------------------------------------------------------------------------------------------------ pydoc topics

_UNDERLINE = re.compile(r"([*=\-~^\"])\1+")
_DEFINITION = re.compile(r"(?:class |exception )?[A-Za-z_][\w.]*(?:\(.*\)|\.[A-Za-z_]\w*)")
_TOPIC_QUESTIONS = ("Explain {subject} in Python.", "What does the Python reference manual say about {subject}?",
                    "Describe {subject} in Python.")
_SECTION_QUESTIONS = ("Explain {heading} in Python ({title}).", "In Python, what is {heading}? (from: {title})")
_DEFINITION_QUESTIONS = ("What does `{name}` do in Python?", "Describe `{name}` in Python.")
ANSWER_CHARS = 2000


def topic_sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` for every section of a topic text (headings are underlined with * = - ~ ^), in order."""
    lines, marks = text.splitlines(), []
    for i in range(len(lines) - 1):
        if lines[i].strip() and len(lines[i + 1]) == len(lines[i]) and _UNDERLINE.fullmatch(lines[i + 1]):
            marks.append(i)
    return [(lines[start], "\n".join(lines[start + 2:end]).strip("\n"))
            for start, end in zip(marks, marks[1:] + [len(lines)])]


def split_definitions(body: str) -> tuple[str, list[tuple[str, str]]]:
    """A section's prose and its ``(name, description)`` entries, the manual's layout for methods and attributes:
    a line such as ``str.center(width[, fillchar])`` followed by an indented description."""
    lines, entries, prose_end = body.splitlines(), [], None
    for i, line in enumerate(lines[:-2]):
        if (i == 0 or not lines[i - 1].strip()) and _DEFINITION.fullmatch(line) and not lines[i + 1].strip() \
                and lines[i + 2].startswith("   "):
            end = i + 2
            while end < len(lines) and (not lines[end].strip() or lines[end].startswith("   ")):
                end += 1
            entries.append((line, textwrap.dedent("\n".join(lines[i + 2:end])).strip()))
            prose_end = i if prose_end is None else prose_end
    return "\n".join(lines[:prose_end]).strip(), entries


def grammar(body: str) -> str:
    """The grammar productions (indented blocks with ``::=``) of a section, or ''."""
    blocks = [textwrap.dedent(block) for block in re.split(r"\n\s*\n", body) if "::=" in block
              and block.startswith("   ")]
    return "\n\n".join(block.strip("\n") for block in blocks)


def trim(text: str, limit: int = ANSWER_CHARS) -> str:
    """Whole paragraphs up to ``limit`` characters (the first one cut at a line boundary if it alone is longer)."""
    kept = ""
    for paragraph in text.strip().split("\n\n"):
        candidate = f"{kept}\n\n{paragraph}" if kept else paragraph
        if len(candidate) > limit:
            break
        kept = candidate
    if kept:
        return kept
    first = text.strip()[:limit]
    return first[:first.rfind("\n")] if "\n" in first else first


def _subject(title: str) -> str:
    """``The "if" statement`` -> ``the "if" statement`` inside a sentence; names (None) and Title Case kept."""
    first, *rest = title.split()
    if keyword.iskeyword(first) or first in dir(builtins) or not first[1:].islower() \
            or any(word[:1].isupper() for word in rest):
        return title
    return title[0].lower() + title[1:]


def pydoc_topics(count: int | None, seed: int) -> Iterator[dict]:
    """Questions on the reference manual's topics: the topic, its sections, its definitions, its grammar."""
    from pydoc_data.topics import topics

    rng = random.Random(f"pydoc_topics/{seed}")
    pairs = []
    for key in sorted(topics):
        sections = topic_sections(topics[key])
        if not sections:
            continue
        title = sections[0][0]
        for index, (heading, body) in enumerate(sections):
            prose, entries = split_definitions(body)
            if index == 0:
                pairs.append((key, "topic", rng.choice(_TOPIC_QUESTIONS).format(subject=_subject(title)), prose))
            else:
                question = rng.choice(_SECTION_QUESTIONS).format(heading=heading, title=title)
                pairs.append((key, "section", question, prose))
            pairs.extend((key, "definition", rng.choice(_DEFINITION_QUESTIONS).format(name=name), text)
                         for name, text in entries)
            if productions := grammar(body):
                pairs.append((key, "grammar", f"What is the grammar of {_subject(heading)} in Python?",
                              f"The reference manual gives:\n\n```\n{productions}\n```"))
    pairs = [(key, kind, question, trim(answer)) for key, kind, question, answer in pairs if len(answer.strip()) >= 80]
    rng.shuffle(pairs)
    for key, kind, question, answer in pairs[:count]:
        yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
               "meta": {"source": "pydoc_topics", "topic": key, "kind": kind}}


# -------------------------------------------------------------------------------------------- registry + cache

@dataclass(frozen=True)
class BuiltinSource:
    """A generated source: ``build(count, seed)`` yields its records; ``default_count`` None = all it can build."""

    build: Callable[[int | None, int], Iterator[dict]]
    default_count: int | None


def _reasoning(name: str) -> Callable[[int | None, int], Iterator[dict]]:
    """A source of ``data/reasoning_sources.py``, imported when first built (it builds on this module's word
    problems, so it cannot be imported while this one is)."""

    def build(count: int | None, seed: int) -> Iterator[dict]:
        from nemo_plugins.data.reasoning_sources import REASONING_SOURCES

        return REASONING_SOURCES[name](count, seed)

    return build


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    "stdlib_code": BuiltinSource(stdlib_code, None),
    "pydoc_topics": BuiltinSource(pydoc_topics, None),
    "arithmetic": BuiltinSource(arithmetic, 2000),
    "arithmetic_tools": BuiltinSource(arithmetic_tools, 1000),
    # worked solutions as thinking + meta for rewards (data/reasoning_sources.py; counts are exact)
    "reasoning_math": BuiltinSource(_reasoning("reasoning_math"), 3000),
    "reasoning_code": BuiltinSource(_reasoning("reasoning_code"), 400),
    "reasoning_rubric": BuiltinSource(_reasoning("reasoning_rubric"), 500),
}


@dataclass(frozen=True)
class BuiltinRequest:
    """``<name>[?count=N][&seed=S]`` as written after ``builtin:`` in a data config; count is an upper bound for
    the sources read from the standard library and exact for the generated ones."""

    name: str
    count: int | None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in BUILTIN_SOURCES:
            raise ConfigError(f"builtin:{self.name} is not a builtin source; choose one of {sorted(BUILTIN_SOURCES)}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"builtin:{self.name}?count={self.count}: count must be >= 1")
        if self.seed < 0:
            raise ConfigError(f"builtin:{self.name}?seed={self.seed}: seed must be >= 0")

    @classmethod
    def parse(cls, spec: str) -> "BuiltinRequest":
        spec = spec.removeprefix("builtin:")
        name, _, query = spec.partition("?")
        options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
        unknown = sorted(set(options) - {"count", "seed"})
        if unknown:
            raise ConfigError(f"builtin:{spec}: unknown option(s) {unknown}; allowed: count, seed "
                              f"(e.g. builtin:arithmetic?count=2000&seed=0)")
        values = {}
        for key, text in options.items():
            if not text.isdigit():
                raise ConfigError(f"builtin:{spec}: {key}={text!r} must be a non-negative integer")
            values[key] = int(text)
        default = BUILTIN_SOURCES[name].default_count if name in BUILTIN_SOURCES else None
        return cls(name, values.get("count", default), values.get("seed", 0))

    def file_name(self) -> str:
        """Name of the cached JSONL: the request plus a digest of this module, of the reasoning sources, of the
        calculator tool whose results they write, and of the interpreter's version."""
        modules = (Path(__file__), Path(__file__).with_name("reasoning_sources.py"), Path(tools.__file__))
        sources = b"".join(path.read_bytes() for path in modules)
        digest = hashlib.sha256(sources + platform.python_version().encode()).hexdigest()[:12]
        return f"{self.name}-{self.count or 'all'}-seed{self.seed}-{digest}.jsonl"


def materialize(name: str, cache_dir: str | Path) -> Path:
    """The JSONL file of builtin source ``name`` (``arithmetic?count=500&seed=1``) under ``cache_dir``, written
    on first use (to a temporary name renamed into place, so a killed build leaves nothing) and reused after."""
    request = BuiltinRequest.parse(name)
    path = Path(cache_dir).expanduser() / request.file_name()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        written = 0
        with open(partial, "w", encoding="utf-8") as out:
            for record in BUILTIN_SOURCES[request.name].build(request.count, request.seed):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                written += 1
        if not written:
            raise RuntimeError(f"builtin:{name} produced no conversations (is the standard library's source under "
                               f"{sysconfig.get_paths()['stdlib']}?)")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
