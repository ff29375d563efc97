"""Reasoning data: deterministic, exact, honest (every worked step recomputed, every code answer run against its
tests, every rubric item checked on the answer), unique prompts, and the SFT / GRPO mixes sharing their held-out
tail."""

import json
import re
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from nemo_plugins.data.instruct_sources import BuiltinRequest, materialize
from nemo_plugins.data.reasoning_sources import (
    ANSWER_PREFIX,
    CODE_SPECS,
    UNITS,
    reasoning_code,
    reasoning_math,
    reasoning_rubric,
)
from nemo_plugins.generation import tools
from nemo_plugins.rl.filters import FilterSettings, screen

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
STEP = re.compile(r": (.+) = (-?[\d./]+)$")
EQUATION = re.compile(r"Solve (.+) = (.+) for x\.")


def _side(text: str) -> tuple[Fraction, Fraction]:
    """(coefficient of x, constant) of one side such as ``-x + 5`` or ``12x - 3`` or ``7``."""
    coefficient, constant = Fraction(0), Fraction(0)
    for sign, number, x in re.findall(r"([+-]?)\s*(\d*)(x?)", text.replace(" ", "")):
        if not number and not x:
            continue
        value = Fraction(int(number) if number else 1) * (-1 if sign == "-" else 1)
        if x:
            coefficient += value
        else:
            constant += value
    return coefficient, constant


@pytest.fixture(scope="module")
def math_records():
    return list(reasoning_math(90, seed=0))


def test_sources_are_deterministic_by_seed():
    assert list(reasoning_math(5, seed=1)) == list(reasoning_math(5, seed=1))
    assert list(reasoning_math(5, seed=1)) != list(reasoning_math(5, seed=2))
    assert list(reasoning_code(5, seed=1)) == list(reasoning_code(5, seed=1))
    assert list(reasoning_rubric(5, seed=1)) != list(reasoning_rubric(5, seed=2))


def test_every_worked_step_is_recomputed_exactly(math_records):
    assert {r["meta"]["kind"] for r in math_records} >= {"linear_equation", "unit_conversion", "shopping"}
    for record in math_records:
        user, assistant = record["messages"]
        assert record["meta"]["reward"] == "math"
        assert assistant["content"] == ANSWER_PREFIX + record["meta"]["answer"]
        steps = [m.groups() for line in assistant["thinking"].splitlines() if (m := STEP.search(line))]
        assert steps, assistant["thinking"]
        for operation, value in steps:
            assert tools.evaluate(operation) == Fraction(value), (operation, value)
        answer = Fraction(record["meta"]["answer"])
        if record["meta"]["kind"] == "linear_equation":
            (a, b), (c, d) = map(_side, EQUATION.fullmatch(user["content"]).groups())
            assert a * answer + b == c * answer + d and a != c
        elif record["meta"]["kind"] != "unit_conversion":
            assert Fraction(steps[-1][1]) == answer


def test_unit_factors_are_the_exact_definitions():
    length, mass, time, volume = (UNITS[k][1] for k in ("length", "mass", "time", "volume"))
    assert length["miles"] / length["feet"] == 5280 and length["feet"] / length["inches"] == 12
    assert length["yards"] / length["feet"] == 3 and mass["pounds"] / mass["ounces"] == 16
    assert time["weeks"] / time["days"] == 7 and volume["US gallons"] / volume["US cups"] == 16


def test_unit_conversions_convert(math_records):
    conversions = [r for r in math_records if r["meta"]["kind"] == "unit_conversion"]
    assert conversions
    for record in conversions:
        value, source, target = re.fullmatch(r"Convert ([\d./]+) (.+) to (.+)\. Give the exact value\.",
                                             record["messages"][0]["content"]).groups()
        factors = next(f for _, f in UNITS.values() if source in f)
        assert Fraction(value) * factors[source] == Fraction(record["meta"]["answer"]) * factors[target]


def test_code_answers_pass_their_tests_and_the_tests_catch_wrong_code():
    records = list(reasoning_code(200, seed=0))
    assert {r["meta"]["kind"] for r in records} == {spec.name.split("_$")[0] for spec in CODE_SPECS}
    for record in records:
        meta, answer = record["meta"], record["messages"][1]["content"]
        assert meta["reward"] == "code" and len(meta["tests"]) >= 3
        code = answer.removeprefix("```python\n").removesuffix("\n```")
        namespace: dict = {}
        exec(code, namespace)
        for test in meta["tests"]:
            assert test.startswith(f"assert {meta['entry_point']}(")
            exec(test, namespace)
        wrong = {meta["entry_point"]: lambda *args: args[0]}
        failures = 0
        for test in meta["tests"]:
            try:
                exec(test, dict(wrong))
            except AssertionError:
                failures += 1
        assert failures, f"the tests of {meta['entry_point']} accept returning the argument unchanged"


def _rubric_holds(item: str, answer: str) -> bool:
    """A naive checker for each kind of rubric item the source writes."""
    lines = answer.splitlines()
    bullets = [line for line in lines if line.startswith("- ")]
    if m := re.fullmatch(r"The answer has exactly (\d+) bullet points\.", item):
        return len(bullets) == int(m.group(1))
    if m := re.fullmatch(r"Each bullet point names a function of the `(.+)` module\.", item):
        import importlib
        module = importlib.import_module(m.group(1))
        return all(callable(getattr(module, re.match(r"- `(\w+)`", b).group(1), None)) for b in bullets)
    if item == "The answer starts with a one-sentence summary of the module before the bullet points.":
        return not lines[0].startswith("- ") and lines[0].count(". ") == 0 and lines[0].endswith(".")
    if item == "The answer ends with a question.":
        return answer.rstrip().endswith("?")
    if m := re.fullmatch(r"The answer uses the word '(\w+)'\.", item):
        return re.search(rf"\b{m.group(1)}\b", answer) is not None
    if m := re.fullmatch(r"The answer does not use the word '(\w+)'\.", item):
        return re.search(rf"\b{m.group(1)}\b", answer, re.IGNORECASE) is None
    if m := re.fullmatch(r"Every bullet point has fewer than (\d+) words\.", item):
        return all(len(b.removeprefix("- ").split()) < int(m.group(1)) for b in bullets)
    raise AssertionError(f"no checker for rubric item {item!r}")


def test_rubric_answers_meet_every_item():
    records = list(reasoning_rubric(40, seed=0))
    kinds = set()
    for record in records:
        assert record["meta"]["reward"] == "rubric"
        answer = record["messages"][1]["content"]
        for item in record["meta"]["rubric"]:
            kinds.add(item.split()[2])
            assert _rubric_holds(item, answer), (item, answer)
    assert len(kinds) >= 6, kinds
    assert not _rubric_holds("The answer ends with a question.", "- `a`: b.")


@pytest.mark.parametrize("build", [reasoning_math, reasoning_code, reasoning_rubric])
def test_prompts_are_unique_and_records_pass_the_filters(build):
    records = list(build(80, seed=3))
    assert len(records) == 80
    prompts = [r["messages"][0]["content"] for r in records]
    assert len(set(prompts)) == len(prompts)
    for record in records:
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        assert record["messages"][1]["thinking"]
        assert screen(record, FilterSettings()) is None, record


def test_builtin_registration_writes_the_generated_records(tmp_path):
    path = materialize("reasoning_code?count=4&seed=2", tmp_path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == list(reasoning_code(4, seed=2))


def test_sft_and_grpo_mixes_share_their_held_out_tail():
    sft, rl = (yaml.safe_load((CONF / f"{name}.yaml").read_text()) for name in ("reasoning_demo", "reasoning_rl_demo"))
    assert sft["heldout_fraction"] == rl["heldout_fraction"] > 0
    assert {s["name"]: s["paths"] for s in rl["sources"]} == {s["name"]: s["paths"] for s in sft["sources"]}
    for source in sft["sources"]:
        (path,) = source["paths"]
        request = BuiltinRequest.parse(path.removeprefix("builtin:"))
        assert request.count is not None and f"count={request.count}" in path  # explicit: the tail is pinned
