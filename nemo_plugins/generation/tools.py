"""Tools a model may call during generation: a registry that turns a parsed ``ToolCall`` into the ``ToolResult``
the tool message carries, and the two tools of the post-training stages, an exact calculator and a sandboxed
Python executor.

A bad call is an answer, not an exception: an unknown tool, wrong arguments or a failing tool come back as
``ok=False`` with one line the model can act on, so a rollout never dies of its own tool call.

The calculator parses with ``ast`` and evaluates an allow-list of nodes on ``Fraction``s, so ``0.1 + 0.2`` is
exactly ``0.3`` and ``1/3`` stays ``1/3``; only irrational functions (``sqrt`` of a non-square, ``pi``, fractional
powers) go to floats. Results past 65,536 bits are refused before they are computed (``10**10**10`` answers at
once instead of filling memory).
"""

from __future__ import annotations

import ast
import decimal
import functools
import math
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

from nemo_plugins.errors import ConfigError
from nemo_plugins.sandbox import SandboxLimits, run_python

Number = Fraction | float

_MAX_BITS = 1 << 16
_MAX_DIGITS = int(_MAX_BITS * math.log10(2))
_MAX_EXPRESSION = 2000
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolCall:
    """What the model asked for: a tool name and its JSON arguments."""

    name: str
    arguments: dict


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model as the tool message: stdout, the value, or a one-line error."""

    content: str
    ok: bool


class ToolError(Exception):
    """A call a tool refuses or cannot complete; the message is the line the model sees."""


@dataclass(frozen=True)
class Tool:
    """A callable tool. Every argument is a required string (all these tools need), which keeps the JSON schema
    and its check exact without a schema validator."""

    description: str
    arguments: dict[str, str]  # argument name -> what to pass, for the schema
    run: Callable[..., ToolResult]

    def __post_init__(self) -> None:
        if not self.description.strip():
            raise ConfigError("a tool needs a description: the model chooses tools by it")
        for name in self.arguments:
            if not name.isidentifier():
                raise ConfigError(f"tool argument {name!r} must be a Python identifier")


class ToolRegistry:
    """The tools of a generation run, by name."""

    def __init__(self, tools: dict[str, Tool]) -> None:
        for name in tools:
            if not _TOOL_NAME.fullmatch(name):
                raise ConfigError(f"tool name {name!r} must be 1-64 letters, digits, '_' or '-' (chat templates "
                                  "and function-calling formats accept nothing else)")
        self._tools = dict(tools)

    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict]:
        """The tools as function schemas (``{"type": "function", "function": {...}}``) for chat templates."""
        return [{"type": "function", "function": {
            "name": name, "description": tool.description,
            "parameters": {"type": "object",
                           "properties": {arg: {"type": "string", "description": text}
                                          for arg, text in tool.arguments.items()},
                           "required": list(tool.arguments)}}}
                for name, tool in self._tools.items()]

    def call(self, call: ToolCall) -> ToolResult:
        """Run the call; every failure becomes ``ok=False`` with one line naming the tool and the problem."""
        tool = self._tools.get(call.name)
        if tool is None:
            return ToolResult(f"unknown tool {call.name!r}; available: {', '.join(self._tools)}", False)
        problem = _argument_problem(tool, call.arguments)
        if problem:
            return ToolResult(f"{call.name}: {problem}", False)
        try:
            return tool.run(**call.arguments)
        except ToolError as exc:
            return ToolResult(f"{call.name}: {_one_line(str(exc))}", False)
        except Exception as exc:  # a tool's own bug must not end the rollout either
            return ToolResult(f"{call.name} failed: {type(exc).__name__}: {_one_line(str(exc))}", False)


def default_tools(limits: SandboxLimits | None = None) -> ToolRegistry:
    """``calculator`` and ``python`` (run in the sandbox under ``limits``, SandboxLimits() by default)."""
    return ToolRegistry({
        "calculator": Tool(
            "Evaluate an arithmetic expression exactly: numbers, + - * / // % **, parentheses, "
            "abs, sqrt, floor, ceil, round, pi, e.",
            {"expression": "the expression, e.g. (3 + 4) * 2 / 7"},
            calculator),
        "python": Tool(
            "Run a Python program (no network, limited time and memory) and return what it prints.",
            {"code": "the program; print the values you want to see"},
            functools.partial(python, limits=limits or SandboxLimits())),
    })


def calculator(expression: str) -> ToolResult:
    """The exact value, formatted for the model (see format_number)."""
    return ToolResult(format_number(evaluate(expression)), True)


def python(code: str, limits: SandboxLimits) -> ToolResult:
    """The program's stdout; on failure also its stderr and the sandbox's one-line reason."""
    result = run_python(code, limits)
    if result.ok:
        return ToolResult(result.stdout, True)
    parts = (result.stdout, result.stderr, f"[{result.status}: {result.reason}]")
    return ToolResult("\n".join(part.rstrip("\n") for part in parts if part), False)


def _argument_problem(tool: Tool, arguments: object) -> str:
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    missing = [name for name in tool.arguments if name not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    unknown = [name for name in arguments if name not in tool.arguments]
    if unknown:
        return f"unknown argument {unknown[0]!r}; expected: {', '.join(tool.arguments)}"
    for name, value in arguments.items():
        if not isinstance(value, str):
            return f"argument {name!r} must be a string, got {type(value).__name__}"
    return ""


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


# ---- the calculator -------------------------------------------------------------------------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _sqrt(x: Number) -> Number:
    if isinstance(x, Fraction) and x >= 0:
        num, den = math.isqrt(x.numerator), math.isqrt(x.denominator)
        if num * num == x.numerator and den * den == x.denominator:
            return Fraction(num, den)
    return math.sqrt(x)


_FUNCTIONS: dict[str, Callable[[Number], Number]] = {
    "abs": abs, "sqrt": _sqrt,
    "floor": lambda x: Fraction(math.floor(x)), "ceil": lambda x: Fraction(math.ceil(x)),
    "round": lambda x: Fraction(round(x)),
}


def evaluate(expression: str) -> Number:
    """The exact value of ``expression`` (a float only where the maths is irrational); ToolError otherwise."""
    if len(expression) > _MAX_EXPRESSION:
        raise ToolError(f"expression longer than {_MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as exc:
        raise ToolError(f"not an arithmetic expression ({getattr(exc, 'msg', exc)})") from None
    try:
        return _evaluate(tree.body, expression.strip())
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("result too large for floating point") from None
    except ValueError as exc:  # math domain errors: sqrt(-1), (-8) ** 0.5
        raise ToolError(f"math error: {exc}") from None
    except RecursionError:
        raise ToolError("expression nested too deeply") from None


def _evaluate(node: ast.expr, source: str) -> Number:
    if isinstance(node, ast.Constant):
        return _literal(node, source)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, source)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left, right = _evaluate(node.left, source), _evaluate(node.right, source)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(left, right))
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        if node.id not in _CONSTANTS:
            raise ToolError(f"unknown name {node.id!r}; known: {', '.join(_CONSTANTS)}")
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS:
            raise ToolError(f"only these functions can be called: {', '.join(_FUNCTIONS)}")
        if len(node.args) != 1 or node.keywords:
            raise ToolError(f"{name}() takes exactly one argument")
        return _bounded(_FUNCTIONS[name](_evaluate(node.args[0], source)))
    if isinstance(node, ast.Attribute):
        raise ToolError("attribute access is not allowed")
    kind = type(node.op if isinstance(node, (ast.BinOp, ast.UnaryOp)) else node).__name__
    raise ToolError(f"{kind} is not allowed: only numbers, + - * / // % **, parentheses and "
                    f"{', '.join(_FUNCTIONS)}")


def _literal(node: ast.Constant, source: str) -> Number:
    """A number exactly as written: ``0.1`` is 1/10, not the float nearest to it."""
    if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
        raise ToolError(f"{node.value!r} is not a number")
    if isinstance(node.value, int):
        return _bounded(Fraction(node.value))
    written = decimal.Decimal(ast.get_source_segment(source, node).replace("_", ""))
    if abs(written.as_tuple().exponent) > _MAX_DIGITS:
        raise ToolError(f"number {ast.get_source_segment(source, node)} is too large")
    return _bounded(Fraction(written))


def _power(base: Number, exponent: Number) -> Number:
    """Exact for integer exponents; its size is checked before it is computed."""
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        if isinstance(base, Fraction):
            # the result has between (bits - 1) * n and bits * n bits: refuse the first past the cap, and what
            # is computed stays under twice the cap (0, 1 and -1 have bits - 1 == 0: any power is cheap)
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if (bits - 1) * abs(exponent.numerator) > _MAX_BITS:
                raise ToolError(f"result too large (more than {_MAX_BITS} bits)")
            return base ** exponent.numerator
        return base ** float(exponent)
    return math.pow(base, exponent)


def _bounded(value: Number | int) -> Number:
    """``value`` as a Fraction or a finite float (``//`` of Fractions gives an int) of at most the size cap."""
    if isinstance(value, int):
        value = Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolError("result too large for floating point")
    elif max(value.numerator.bit_length(), value.denominator.bit_length()) > _MAX_BITS:
        raise ToolError(f"result too large (more than {_MAX_BITS} bits)")
    return value


def format_exact(value: Fraction) -> str:
    """Integers as integers, terminating fractions as exact decimals, others as ``p/q``: the exact part of
    ``format_number``, for answers that a verifier parses (no approximation appended)."""
    if value.denominator == 1:
        return str(value.numerator)
    twos, fives, rest = 0, 0, value.denominator
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    digits = str(abs(value.numerator) * 10 ** places // value.denominator).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def format_number(value: Number) -> str:
    """``format_exact`` for Fractions, with ``≈ decimal`` after a ``p/q`` so the model sees its size too."""
    if isinstance(value, float):
        return repr(value)
    exact = format_exact(value)
    if "/" not in exact:
        return exact
    with decimal.localcontext(prec=17):
        approximate = decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator)
    return f"{exact} ≈ {approximate}"
