"""The tool registry and its two tools: exact arithmetic against Python's own Fractions, refusals that return at
once, bad calls answered with one line, and the Python tool's output from the sandbox."""

import json
import math
import operator
import random
import tracemalloc
from fractions import Fraction

import pytest

from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.tools import (
    Tool,
    ToolCall,
    ToolError,
    ToolRegistry,
    ToolResult,
    default_tools,
    evaluate,
    format_exact,
    format_number,
)
from nemo_plugins.sandbox import SandboxLimits

LIMITS = SandboxLimits(cpu_seconds=2, wall_seconds=10, memory_bytes=256 << 20)
_OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "//": operator.floordiv, "%": operator.mod}


def _random_expression(rng: random.Random, depth: int) -> tuple[str, Fraction]:
    """An expression's text and its value by Fraction arithmetic (ZeroDivisionError where it has none)."""
    if depth == 0 or rng.random() < 0.25:
        if rng.random() < 0.3:
            text = f"{rng.randint(0, 99)}.{rng.randint(0, 999):03d}"  # decimals: 0.1 must be exactly 1/10
            return text, Fraction(text)
        value = rng.randint(-30, 30)
        return f"({value})", Fraction(value)
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    left_text, left = _random_expression(rng, depth - 1)
    if op == "**":
        exponent = rng.randint(-3, 4)
        return f"({left_text} ** {exponent})", left ** exponent
    right_text, right = _random_expression(rng, depth - 1)
    return f"({left_text} {op} {right_text})", Fraction(_OPERATORS[op](left, right))  # // gives an int


def test_calculator_is_exact_on_generated_expressions():
    rng = random.Random(0)
    checked = 0
    for _ in range(400):
        try:
            text, expected = _random_expression(rng, depth=4)
        except ZeroDivisionError:
            continue
        value = evaluate(text)
        assert isinstance(value, Fraction) and value == expected, text
        checked += 1
    assert checked > 300


def test_registry_division_by_zero_answers_in_one_line():
    result = default_tools().call(ToolCall("calculator", {"expression": "(2 - 2) ** -1 + 1"}))
    assert result == ToolResult("calculator: division by zero", False)


@pytest.mark.parametrize("value, text", [
    (Fraction(42), "42"), (Fraction(-5, 2), "-2.5"), (Fraction(1, 4), "0.25"), (Fraction(3, 1000), "0.003"),
    (Fraction(1, 3), "1/3 ≈ 0.33333333333333333"), (Fraction(-22, 7), "-22/7 ≈ -3.1428571428571429"),
    (2.0 ** 0.5, "1.4142135623730951"),
])
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize("value, text", [
    (Fraction(42), "42"), (Fraction(-5, 2), "-2.5"), (Fraction(3, 1000), "0.003"), (Fraction(-1, 80), "-0.0125"),
    (Fraction(1, 3), "1/3"), (Fraction(-22, 7), "-22/7"),
])
def test_format_exact(value, text):
    assert format_exact(value) == text


def test_format_exact_reads_back_as_the_same_fraction():
    rng = random.Random(0)
    for _ in range(500):
        value = Fraction(rng.randint(-10**6, 10**6), rng.choice([2, 5, 3, 7]) ** rng.randint(0, 6))
        text = format_exact(value)
        assert Fraction(text) == value and ("/" in text) == (value.denominator % 3 == 0 or value.denominator % 7 == 0)


@pytest.mark.parametrize("expression, text", [
    ("0.1 + 0.2", "0.3"), ("1/3", "1/3 ≈ 0.33333333333333333"), ("2 ** 100", str(2 ** 100)),
    ("sqrt(16/9)", "4/3 ≈ 1.3333333333333333"), ("floor(-7/2) + ceil(7/2) + abs(-1) + round(5/2)", "3"),
    ("sqrt(2) ** 2", repr(math.sqrt(2) ** 2)), ("(-1) ** (10 ** 20)", "1"),
])
def test_calculator_answers(expression, text):
    assert default_tools().call(ToolCall("calculator", {"expression": expression})) == ToolResult(text, True)


@pytest.mark.parametrize("expression, problem", [
    ("__import__('os')", "only these functions"),
    ("().__class__", "attribute access"),
    ("(1).real", "attribute access"),
    ("x", "unknown name 'x'"),
    ("'a' * 3", "is not a number"),
    ("True + 1", "is not a number"),
    ("[1, 2]", "List is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("1 << 10 ** 8", "LShift is not allowed"),
    ("10 ** 10 ** 10", "too large"),
    ("2 ** (10 ** 7)", "too large"),
    ("(1/3) ** 100000", "too large"),
    ("1e99999999", "too large"),
    ("sqrt(-1)", "math error"),
    ("1 +", "not an arithmetic expression"),
    ("-" * 1999 + "1", "nested too deeply"),
])
def test_calculator_refuses(expression, problem):
    with pytest.raises(ToolError, match=problem):
        evaluate(expression)
    result = default_tools().call(ToolCall("calculator", {"expression": expression}))
    assert not result.ok and result.content.startswith("calculator: ") and "\n" not in result.content


@pytest.mark.parametrize("expression", ["2 ** (10 ** 7)", "(3/7) ** -(10 ** 6)"])
def test_huge_results_are_refused_before_they_are_computed(expression):
    tracemalloc.start()
    try:
        with pytest.raises(ToolError, match="too large"):
            evaluate(expression)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # each of these results would take over a megabit


@pytest.mark.parametrize("call, content", [
    (ToolCall("search", {"query": "x"}), "unknown tool 'search'; available: calculator, python"),
    (ToolCall("calculator", {}), "calculator: missing argument 'expression'"),
    (ToolCall("calculator", {"expression": "1", "precision": "3"}),
     "calculator: unknown argument 'precision'; expected: expression"),
    (ToolCall("calculator", {"expression": 4}), "calculator: argument 'expression' must be a string, got int"),
    (ToolCall("python", ["print(1)"]), "python: arguments must be a JSON object, got list"),
])
def test_bad_calls_come_back_as_one_line(call, content):
    assert default_tools().call(call) == ToolResult(content, False)


def test_a_failing_tool_does_not_raise():
    def broken(text: str) -> ToolResult:
        raise RuntimeError(f"cannot handle\n{text}")

    registry = ToolRegistry({"broken": Tool("Always fails.", {"text": "anything"}, broken)})
    assert registry.call(ToolCall("broken", {"text": "x"})) == \
        ToolResult("broken failed: RuntimeError: cannot handle x", False)


def test_names_and_schemas_for_chat_templates():
    registry = default_tools()
    assert registry.names() == ["calculator", "python"]
    schemas = json.loads(json.dumps(registry.schemas()))
    assert [schema["function"]["name"] for schema in schemas] == registry.names()
    for schema, argument in zip(schemas, ["expression", "code"]):
        assert schema["type"] == "function" and schema["function"]["description"]
        assert schema["function"]["parameters"]["required"] == [argument]
        assert schema["function"]["parameters"]["properties"][argument]["type"] == "string"


def test_python_tool_returns_stdout_or_the_failure():
    registry = default_tools(LIMITS)
    assert registry.call(ToolCall("python", {"code": "print(sum(range(10)))"})) == ToolResult("45\n", True)
    result = registry.call(ToolCall("python", {"code": "print('start')\n1 / 0"}))
    assert not result.ok
    assert result.content.startswith("start\nTraceback")
    assert result.content.endswith("ZeroDivisionError: division by zero\n[error: ZeroDivisionError: division by zero]")
    result = registry.call(ToolCall("python", {"code": "import socket\nsocket.create_connection(('127.0.0.1', 1))"}))
    assert not result.ok and "not allowed" in result.content


def test_registry_and_tools_are_validated():
    with pytest.raises(ConfigError, match="tool name 'run code'"):
        ToolRegistry({"run code": Tool("Runs code.", {"code": "the code"}, lambda code: ToolResult(code, True))})
    with pytest.raises(ConfigError, match="description"):
        Tool(" ", {"code": "the code"}, lambda code: ToolResult(code, True))
