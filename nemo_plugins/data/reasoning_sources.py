"""Demo reasoning data generated offline, deterministic by seed: problems whose worked solution is real, with the
reward each response gets in ``meta``.

Every record is a chat conversation ``{"messages": [user, assistant], "meta": {...}}``: the assistant's
``thinking`` is the worked solution (placed in the chat format's think block when rendered), its ``content`` the
final answer. ``meta`` follows the rewards' schema, so GRPO reads the same sources (the prompt part only):

* ``reasoning_math`` (``meta.reward = "math"``, ``meta.answer`` exact, ``tools.format_exact``): word problems
  (``instruct_sources.word_problems``), linear equations ``ax + b = cx + d`` (moved term by term, divided, then
  checked by substituting the solution into both sides) and unit conversions with exact factors (through the base
  unit: metre, gram, second, litre; 1 in = 0.0254 m, 1 lb = 453.59237 g exactly). Every step's value is computed
  by the calculator tool on the operation the line shows (``instruct_sources.Quantity``). Content:
  ``Answer: <value>``.
* ``reasoning_code`` (``meta.reward = "code"``, ``meta.tests``, ``meta.entry_point``): small function specs with
  a drawn parameter (sum the multiples of k, rotate by k, Caesar shift by k, keep values in [lo, hi], ...; 15
  specs, unevenly many distinct prompts each, the small ones used up first). The reference implementation
  is written out from its template and executed on drawn arguments: the tests are ``assert f(args) == <what the
  reference returned>``. Thinking: the plan, then the reference's result on one test's arguments. Content: the code.
* ``reasoning_rubric`` (``meta.reward = "rubric"``, ``meta.rubric``): "list n functions of module M" with format
  and content constraints (exactly n bullet points, a summary line first, a question last, a word to use, a word
  to avoid, a word limit per bullet, names in backticks). The answer is assembled from the functions' own
  docstrings so that it satisfies every rubric item; the thinking goes through the constraints and how each is met.

A prompt appears once per source (repeats of a drawn prompt are skipped), so the mix's held-out tail never shares a
prompt with the training part. The sources are registered in ``instruct_sources.BUILTIN_SOURCES``
(``builtin:reasoning_math?count=N&seed=S``); their cache names carry a digest of this module.
"""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from string import Template
from typing import Callable, Iterator

from nemo_plugins.data.instruct_sources import Quantity, WordProblem, word_problems
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation import tools

ANSWER_PREFIX = "Answer: "


def exact(value: Fraction) -> Quantity:
    """A given exact number (a conversion factor, a coefficient) as a quantity."""
    text = tools.format_exact(value)
    return Quantity(value, text, text)


def _step(label: str, quantity: Quantity) -> str:
    return f"{label}: {quantity.operation} = {tools.format_exact(quantity.value)}"


@dataclass(frozen=True)
class Worked:
    """A math problem with its worked solution lines and exact answer."""

    kind: str
    question: str
    steps: tuple[str, ...]
    answer: Fraction


def from_word_problem(problem: WordProblem) -> Worked:
    return Worked(problem.kind, problem.question, tuple(_step(label, q) for label, q in problem.steps), problem.answer)


# --------------------------------------------------------------------------------------------- linear equations

def _linear(coefficient: int, constant: int) -> str:
    """``3x - 5``, ``-x``, ``7``: one side of a linear equation."""
    terms = []
    if coefficient:
        terms.append({1: "x", -1: "-x"}.get(coefficient, f"{coefficient}x"))
    if constant or not terms:
        terms.append(f"{constant}" if not terms else f"{'+' if constant > 0 else '-'} {abs(constant)}")
    return " ".join(terms)


def linear_equation(rng: random.Random) -> Worked:
    """``ax + b = cx + d`` with a != c: subtract cx, subtract b, divide by a - c, substitute back."""
    a, c = rng.sample([n for n in range(-12, 13) if n], 2) if rng.random() < 0.7 else (rng.choice(
        [n for n in range(-12, 13) if n]), 0)
    b, d = rng.randint(-40, 40), rng.randint(-40, 40)
    slope = Quantity.given(a) - c
    rhs = Quantity.given(d) - b
    x = rhs / slope
    left, right = Quantity.given(a) * exact(x.value) + b, Quantity.given(c) * exact(x.value) + d
    equation = f"{_linear(a, b)} = {_linear(c, d)}"
    steps = [f"Subtract {_linear(c, 0)} from both sides" if c else "The right side has no x term",
             _step("Coefficient of x", slope), f"So {_linear(int(slope.value), b)} = {d}",
             _step(f"Subtract {b} from both sides", rhs), f"So {_linear(int(slope.value), 0)} = {int(rhs.value)}",
             _step(f"Divide both sides by {int(slope.value)}", x),
             _step("Check, left side", left), _step("Check, right side", right),
             "Both sides agree, so the solution is right."]
    return Worked("linear_equation", f"Solve {equation} for x.", tuple(steps), x.value)


# --------------------------------------------------------------------------------------------- unit conversions

UNITS: dict[str, tuple[str, dict[str, Fraction]]] = {
    "length": ("metres", {"millimetres": Fraction(1, 1000), "centimetres": Fraction(1, 100), "metres": Fraction(1),
                          "kilometres": Fraction(1000), "inches": Fraction(254, 10000), "feet": Fraction(3048, 10000),
                          "yards": Fraction(9144, 10000), "miles": Fraction(1609344, 1000)}),
    "mass": ("grams", {"milligrams": Fraction(1, 1000), "grams": Fraction(1), "kilograms": Fraction(1000),
                       "ounces": Fraction(28349523125, 10 ** 9), "pounds": Fraction(45359237, 10 ** 5)}),
    "time": ("seconds", {"seconds": Fraction(1), "minutes": Fraction(60), "hours": Fraction(3600),
                         "days": Fraction(86400), "weeks": Fraction(604800)}),
    "volume": ("litres", {"millilitres": Fraction(1, 1000), "litres": Fraction(1),
                          "US cups": Fraction(2365882365, 10 ** 10), "US gallons": Fraction(3785411784, 10 ** 9)}),
}


def unit_conversion(rng: random.Random) -> Worked:
    """``value`` of one unit in another of the same quantity, through the base unit."""
    quantity = rng.choice(sorted(UNITS))
    base, factors = UNITS[quantity]
    source, target = rng.sample(sorted(factors), 2)
    value = exact(Fraction(rng.randint(1, 400), rng.choice((1, 1, 2, 4, 10))))
    shown = tools.format_exact(value.value)
    steps, in_base = [], value
    if source != base:
        in_base = value * exact(factors[source])
        steps += [f"1 {_singular(source)} = {tools.format_exact(factors[source])} {base}",
                  _step(f"{shown} {source} in {base}", in_base)]
    result = in_base
    if target != base:
        result = in_base / exact(factors[target])
        steps += [f"1 {_singular(target)} = {tools.format_exact(factors[target])} {base}",
                  _step(f"{tools.format_exact(in_base.value)} {base} in {target}", result)]
    question = f"Convert {shown} {source} to {target}. Give the exact value."
    return Worked("unit_conversion", question, tuple(steps), result.value)


def _singular(unit: str) -> str:
    return {"feet": "foot", "inches": "inch"}.get(unit, unit.removesuffix("s"))


# -------------------------------------------------------------------------------------------------- math source

MATH_KINDS: dict[str, Callable[[random.Random], Worked]] = {
    "word_problem": lambda rng: from_word_problem(next(word_problems(1, rng.randrange(2 ** 32), "reasoning_math"))),
    "linear_equation": linear_equation,
    "unit_conversion": unit_conversion,
}


MAX_REPEATS = 20_000


def _unique(records: Iterator[dict], count: int, source: str) -> Iterator[dict]:
    """The first ``count`` records whose user prompt has not been seen (held-out prompts never seen in training);
    a source that keeps drawing prompts it gave already has run out of distinct ones."""
    seen: set[str] = set()
    repeats = 0
    for record in records:
        if len(seen) >= count:
            return
        prompt = record["messages"][0]["content"]
        if prompt in seen:
            repeats += 1
            if repeats > MAX_REPEATS:
                raise ConfigError(f"builtin:{source} has about {len(seen)} distinct prompts, fewer than count={count}: "
                                  "lower the count")
            continue
        repeats = 0
        seen.add(prompt)
        yield record


def reasoning_math(count: int | None, seed: int) -> Iterator[dict]:
    """Math problems (kinds drawn uniformly), worked solution as thinking, ``Answer: <exact>`` as content."""
    rng = random.Random(f"reasoning_math/{seed}")
    kinds = sorted(MATH_KINDS)

    def draw() -> Iterator[dict]:
        while True:
            worked = MATH_KINDS[rng.choice(kinds)](rng)
            answer = tools.format_exact(worked.answer)
            yield {"messages": [{"role": "user", "content": worked.question},
                                {"role": "assistant", "thinking": "\n".join(worked.steps),
                                 "content": f"{ANSWER_PREFIX}{answer}"}],
                   "meta": {"reward": "math", "answer": answer, "source": "reasoning_math", "kind": worked.kind}}

    yield from _unique(draw(), count or 0, "reasoning_math")


# ---------------------------------------------------------------------------------------------------- code source

@dataclass(frozen=True)
class CodeSpec:
    """A function to write: request, plan and reference source are templates over the drawn ``params``;
    ``arguments(rng, params)`` draws one test's arguments."""

    name: str
    request: str
    plan: tuple[str, ...]
    source: str
    params: Callable[[random.Random], dict]
    arguments: Callable[[random.Random, dict], tuple]


def _ints(rng: random.Random, low: int = -30, high: int = 30, most: int = 8) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, most))]


_WORDS = ("apple", "Zebra", "moon", "quick", "Brown", "fox", "jumps", "over", "lazy", "dog", "River", "sky", "python",
          "code", "Hello", "world", "tiny", "elephant")


def _text(rng: random.Random, often: str | None = None) -> str:
    """A few words and maybe a final punctuation mark; ``often`` (a word) is drawn as often as all others together."""
    words = [often if often and rng.random() < 0.5 else rng.choice(_WORDS) for _ in range(rng.randint(0, 6))]
    return " ".join(words) + rng.choice(("", ".", "!", "?"))


CODE_SPECS: tuple[CodeSpec, ...] = (
    CodeSpec("sum_multiples", "Write a Python function `sum_multiples(numbers)` that returns the sum of the numbers "
             "in the list that are divisible by $k.",
             ("Go through the list once with a running total starting at 0.",
              "A number is divisible by $k when number % $k == 0; in Python that also holds for 0 and negatives.",
              "Add those numbers and return the total; an empty list gives 0."),
             "def sum_multiples(numbers):\n    total = 0\n    for number in numbers:\n        if number % $k == 0:\n"
             "            total += number\n    return total",
             lambda rng: {"k": rng.randint(2, 20)}, lambda rng, params: (_ints(rng, -60, 60),)),
    CodeSpec("count_chars", "Write a Python function `count_chars(text)` that counts how many characters of `text` "
             "are one of the characters in \"$chars\" (case-sensitive).",
             ("The characters to count are \"$chars\"; membership in that string is a simple test.",
              "Count each character of the text that is in it and return the count."),
             "def count_chars(text):\n    return sum(1 for char in text if char in \"$chars\")",
             lambda rng: {"chars": "".join(sorted(rng.sample("aeiouxyzAEIO", rng.randint(2, 5))))},
             lambda rng, params: (_text(rng),)),
    CodeSpec("running_$word", "Write a Python function `running_$word(numbers)` that returns the list of running "
             "${word}ima: element i is the $word of numbers[0..i].",
             ("Keep the result list; the first element is the first number itself.",
              "Each next element is $word(previous result, current number).",
              "An empty input gives an empty list."),
             "def running_$word(numbers):\n    result = []\n    for number in numbers:\n"
             "        result.append(number if not result else $word(result[-1], number))\n    return result",
             lambda rng: {"word": rng.choice(("max", "min"))}, lambda rng, params: (_ints(rng),)),
    CodeSpec("clamp_all", "Write a Python function `clamp_all(values)` that returns a new list where every value "
             "is clamped to the range [$low, $high].",
             ("Clamping is min(max(value, $low), $high): below $low becomes $low, above $high becomes $high.",
              "Apply it to every value in order and return the new list."),
             "def clamp_all(values):\n    return [min(max(value, $low), $high) for value in values]",
             lambda rng: dict(zip(("low", "high"), sorted(rng.sample(range(-20, 21), 2)))),
             lambda rng, params: (_ints(rng),)),
    CodeSpec("long_words", "Write a Python function `long_words(sentence)` that returns the words of the sentence "
             "(split on whitespace) that are longer than $n characters, in order.",
             ("Split the sentence on whitespace with str.split().",
              "Keep the words whose len(word) > $n, in their order, and return them as a list."),
             "def long_words(sentence):\n    return [word for word in sentence.split() if len(word) > $n]",
             lambda rng: {"n": rng.randint(1, 8)}, lambda rng, params: (_text(rng),)),
    CodeSpec("rotate_left", "Write a Python function `rotate_left(items)` that returns the list rotated left by $k "
             "positions (the first $k elements move to the end, wrapping around for short lists).",
             ("An empty list stays empty (and has no length to wrap around).",
              "Rotating by $k is rotating by $k % len(items): the shift wraps for short lists.",
              "The result is items[shift:] + items[:shift]."),
             "def rotate_left(items):\n    if not items:\n        return []\n    shift = $k % len(items)\n"
             "    return items[shift:] + items[:shift]",
             lambda rng: {"k": rng.randint(1, 30)}, lambda rng, params: (_ints(rng, 0, 9),)),
    CodeSpec("digit_power_sum", "Write a Python function `digit_power_sum(n)` that returns the sum of the digits of "
             "the integer n (sign ignored), each raised to the power $p.",
             ("Ignore the sign with abs(n), then go through its decimal digits with str().",
              "Raise each digit to the power $p and add them up."),
             "def digit_power_sum(n):\n    return sum(int(digit) ** $p for digit in str(abs(n)))",
             lambda rng: {"p": rng.randint(2, 7)}, lambda rng, params: (rng.randint(-99999, 99999),)),
    CodeSpec("count_pairs", "Write a Python function `count_pairs(numbers)` that returns how many pairs of positions "
             "i < j have numbers[i] + numbers[j] == $target.",
             ("Every pair of positions i < j counts once, so two nested loops over the indices do it.",
              "Count the pairs whose sum is $target."),
             "def count_pairs(numbers):\n    count = 0\n    for i in range(len(numbers)):\n"
             "        for j in range(i + 1, len(numbers)):\n            if numbers[i] + numbers[j] == $target:\n"
             "                count += 1\n    return count",
             lambda rng: {"target": rng.randint(-10, 20)}, lambda rng, params: (_ints(rng, -5, 10),)),
    CodeSpec("caesar", "Write a Python function `caesar(text)` that shifts every ASCII letter of the text $k places "
             "forward in the alphabet (wrapping from z to a, keeping the case) and leaves other characters as they "
             "are.",
             ("For a letter, find its base: ord('a') for lowercase, ord('A') for uppercase.",
              "The shifted letter is chr(base + (ord(char) - base + $k) % 26); other characters are kept.",
              "Join the characters back into a string."),
             "def caesar(text):\n    out = []\n    for char in text:\n        if char.isascii() and char.isalpha():\n"
             "            base = ord('a') if char.islower() else ord('A')\n"
             "            out.append(chr(base + (ord(char) - base + $k) % 26))\n        else:\n"
             "            out.append(char)\n    return ''.join(out)",
             lambda rng: {"k": rng.randint(1, 25)}, lambda rng, params: (_text(rng),)),
    CodeSpec("chunks", "Write a Python function `chunks(items)` that splits the list into consecutive chunks of $size "
             "elements (the last chunk may be shorter) and returns the list of chunks.",
             ("Step through the start indices 0, $size, 2*$size, ... up to len(items).",
              "Each chunk is the slice items[start:start + $size]; slicing past the end gives the shorter last chunk."),
             "def chunks(items):\n    return [items[start:start + $size] for start in range(0, len(items), $size)]",
             lambda rng: {"size": rng.randint(2, 9)}, lambda rng, params: (_ints(rng, 0, 9, most=11),)),
    CodeSpec("keep_between", "Write a Python function `keep_between(numbers)` that returns the numbers of the list "
             "that lie between $low and $high inclusive, in their order.",
             ("A number is kept when $low <= number <= $high (both ends included).",
              "Filter the list in order with a comprehension and return it."),
             "def keep_between(numbers):\n    return [number for number in numbers if $low <= number <= $high]",
             lambda rng: dict(zip(("low", "high"), sorted(rng.sample(range(-30, 31), 2)))),
             lambda rng, params: (_ints(rng),)),
    CodeSpec("affine", "Write a Python function `affine(numbers)` that returns a new list with every number x "
             "replaced by $a * x + ($b).",
             ("Each element maps on its own: x becomes $a * x + ($b).",
              "Build the new list in the same order; an empty list gives an empty list."),
             "def affine(numbers):\n    return [$a * x + ($b) for x in numbers]",
             lambda rng: {"a": rng.choice([n for n in range(-9, 10) if n not in (0, 1)]), "b": rng.randint(-20, 20)},
             lambda rng, params: (_ints(rng),)),
    CodeSpec("replace_word", "Write a Python function `replace_word(sentence)` that replaces every whole word "
             "\"$old\" (split on whitespace) by \"$new\" and joins the words with single spaces.",
             ("Split on whitespace with str.split(), so runs of spaces collapse.",
              "A word equal to \"$old\" becomes \"$new\"; others stay as they are (\"$old.\" is not the word).",
              "Join with single spaces and return."),
             "def replace_word(sentence):\n    return ' '.join('$new' if word == '$old' else word for word in "
             "sentence.split())",
             lambda rng: dict(zip(("old", "new"), rng.sample(_WORDS, 2))),
             lambda rng, params: (_text(rng, params["old"]),)),
    CodeSpec("count_above", "Write a Python function `count_above(numbers)` that returns how many numbers of the "
             "list are strictly greater than $t.",
             ("Strictly greater: a number equal to $t does not count.",
              "Count the numbers with number > $t in one pass and return the count."),
             "def count_above(numbers):\n    return sum(1 for number in numbers if number > $t)",
             lambda rng: {"t": rng.randint(-30, 30)}, lambda rng, params: (_ints(rng),)),
    CodeSpec("pad_left", "Write a Python function `pad_left(text)` that pads the string on the left with \"$fill\" "
             "characters to a length of $width (a string already that long or longer is returned unchanged).",
             ("The number of fill characters is max(0, $width - len(text)).",
              "Prepend that many \"$fill\" characters; a long string gets none."),
             "def pad_left(text):\n    return '$fill' * max(0, $width - len(text)) + text",
             lambda rng: {"fill": rng.choice("*-0#.~"), "width": rng.randint(3, 14)},
             lambda rng, params: (_text(rng)[: rng.randint(0, 16)],)),
)
TESTS_PER_TASK = 5
MAX_REDRAWS = 1000


def code_task(spec: CodeSpec, rng: random.Random) -> dict:
    """One record: the spec's templates filled with drawn parameters, tests from running the reference."""
    params = spec.params(rng)
    fill = lambda template: Template(template).substitute(params)  # noqa: E731
    name, source = fill(spec.name), fill(spec.source)
    namespace: dict = {}
    exec(compile(source, f"<reference {name}>", "exec"), namespace)
    reference = namespace[name]
    calls: list[tuple[str, object, bool]] = []  # (call, result, whether the result is the input unchanged)
    for _ in range(TESTS_PER_TASK + MAX_REDRAWS):
        arguments = spec.arguments(rng, params)
        result = reference(*arguments)
        unchanged = result == arguments[0]
        if len(calls) == TESTS_PER_TASK - 1 and unchanged and all(same for *_, same in calls):
            continue  # some test must tell the function from one that returns its input as it is
        calls.append((f"{name}({', '.join(map(repr, arguments))})", result, unchanged))
        if len(calls) == TESTS_PER_TASK:
            break
    else:
        raise RuntimeError(f"{name}: no test arguments that the function changes in {MAX_REDRAWS} draws")
    tests = [f"assert {call} == {result!r}" for call, result, _ in calls]
    check = f"Check: {calls[0][0]} should give {calls[0][1]!r}, and the code above returns exactly that."
    thinking = "\n".join([*map(fill, spec.plan), check])
    request = fill(spec.request) + " Reply with the code in a ```python block."
    return {"messages": [{"role": "user", "content": request},
                         {"role": "assistant", "thinking": thinking, "content": f"```python\n{source}\n```"}],
            "meta": {"reward": "code", "tests": tests, "entry_point": name, "source": "reasoning_code",
                     "kind": spec.name.split("_$")[0]}}


def reasoning_code(count: int | None, seed: int) -> Iterator[dict]:
    """Function-writing tasks with tests (specs drawn uniformly); a drawn prompt already given is skipped."""
    rng = random.Random(f"reasoning_code/{seed}")
    yield from _unique((code_task(rng.choice(CODE_SPECS), rng) for _ in iter(int, 1)), count or 0, "reasoning_code")


# -------------------------------------------------------------------------------------------------- rubric source

RUBRIC_MODULES = ("math", "string", "textwrap", "json", "random", "statistics", "itertools", "functools", "heapq",
                  "bisect", "shutil", "os.path", "difflib", "base64", "calendar", "colorsys", "html", "shlex",
                  "fnmatch", "glob", "operator", "zlib", "copy", "keyword", "unicodedata")
_SENTENCE = re.compile(r"^[A-Z][^.?!]*[a-z)\]`'\"]\.(?=\s|$)")
_WORDS_TO_USE = ("practical", "handy", "useful", "reliable", "common")
_WORDS_TO_AVOID = ("simply", "basically", "obviously", "very", "easy", "just")
_QUESTIONS = ("Which of these would you like an example of?", "Do you want a short example for one of them?",
              "Should I show how to combine them?")


def first_sentence(doc: str | None, max_words: int = 14) -> str | None:
    """The first sentence of a docstring's first paragraph, if it is a plain short sentence."""
    if not doc:
        return None
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    if not match or len(match.group().split()) > max_words:
        return None
    return match.group()


def module_functions(module_name: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(a one-sentence summary of the module, [(public function, one-sentence summary)]), sorted by name."""
    module = importlib.import_module(module_name)
    functions = []
    for name in sorted(vars(module)):
        value = getattr(module, name)
        if name.startswith("_") or not callable(value) or isinstance(value, type):
            continue
        if getattr(value, "__module__", module_name) not in (module_name, module_name.replace(".", ""), "posixpath"):
            continue
        if (sentence := first_sentence(getattr(value, "__doc__", None))) and not sentence.startswith(f"{name}("):
            functions.append((name, sentence))
    return first_sentence(module.__doc__, max_words=25), functions


def rubric_task(module_name: str, summary: str | None, functions: list[tuple[str, str]],
                rng: random.Random) -> dict:
    """One record: a listing request with drawn constraints, its rubric, and an answer meeting every item."""
    count = rng.randint(2, min(4, len(functions)))
    chosen = sorted(rng.sample(functions, count))
    bullets = [f"- `{name}`: {sentence}" for name, sentence in chosen]
    asks, rubric, plan = [f"list exactly {count} functions of the Python module `{module_name}` as bullet points, "
                          "one short description each"], [], []
    rubric += [f"The answer has exactly {count} bullet points.",
               f"Each bullet point names a function of the `{module_name}` module."]
    plan.append(f"Exactly {count} bullet points: I pick {', '.join(f'`{name}`' for name, _ in chosen)}, one per "
                "bullet, each described by the first sentence of its docstring.")
    lines = []
    if summary and rng.random() < 0.5:
        asks.append("start with a one-sentence summary of the module")
        rubric.append("The answer starts with a one-sentence summary of the module before the bullet points.")
        plan.append(f"Summary first: the module's docstring says \"{summary}\"")
        lines.append(summary)
    if rng.random() < 0.5:
        word = rng.choice(_WORDS_TO_USE)
        asks.append(f"use the word '{word}'")
        rubric.append(f"The answer uses the word '{word}'.")
        plan.append(f"Use '{word}': an introduction line before the bullets will say it.")
        lines.append(f"Here are {count} {word} functions from `{module_name}`:")
    lines += bullets
    if rng.random() < 0.5:
        question = rng.choice(_QUESTIONS)
        asks.append("end with a question to the reader")
        rubric.append("The answer ends with a question.")
        plan.append(f"End with a question: \"{question}\"")
        lines.append(question)
    answer = "\n".join(lines)
    avoid = [w for w in _WORDS_TO_AVOID if not re.search(rf"\b{w}\b", answer, re.IGNORECASE)]
    if avoid and rng.random() < 0.5:
        banned = rng.choice(avoid)
        asks.append(f"do not use the word '{banned}'")
        rubric.append(f"The answer does not use the word '{banned}'.")
        plan.append(f"Avoid '{banned}': none of the lines above contains it.")
    if rng.random() < 0.5:
        longest = max(len(bullet.removeprefix("- ").split()) for bullet in bullets)
        limit = longest + rng.randint(1, 4)
        asks.append(f"keep every bullet point under {limit} words")
        rubric.append(f"Every bullet point has fewer than {limit} words.")
        plan.append(f"Under {limit} words per bullet: the longest bullet has {longest}.")
    request = "Please " + "; ".join(asks) + "."
    return {"messages": [{"role": "user", "content": request},
                         {"role": "assistant", "thinking": "The request has these constraints:\n" + "\n".join(
                             f"- {line}" for line in plan), "content": answer}],
            "meta": {"reward": "rubric", "rubric": rubric, "source": "reasoning_rubric", "module": module_name}}


def reasoning_rubric(count: int | None, seed: int) -> Iterator[dict]:
    """Listing requests with checkable format / content constraints (modules drawn uniformly)."""
    rng = random.Random(f"reasoning_rubric/{seed}")
    catalogue = [(name, *module_functions(name)) for name in RUBRIC_MODULES]
    catalogue = [(name, summary, functions) for name, summary, functions in catalogue if len(functions) >= 2]
    yield from _unique((rubric_task(*rng.choice(catalogue), rng) for _ in iter(int, 1)), count or 0,
                       "reasoning_rubric")


# Registered in instruct_sources.BUILTIN_SOURCES (with their default counts) as builtin:<name>.
REASONING_SOURCES: dict[str, Callable[[int | None, int], Iterator[dict]]] = {
    "reasoning_math": reasoning_math, "reasoning_code": reasoning_code, "reasoning_rubric": reasoning_rubric}
