"""The GRPO bench's generated arithmetic: every line of every worked trace is exact, the styles do not change which
problems are written (so the held-out tail stays the same), and the report's style reading agrees with the
generator."""

import re

import pytest

from bench.grpo_arithmetic import direct_style, easy_arithmetic

EQUATION = re.compile(r"^(-?\d+) ([+-]) (\d+) = (-?\d+)$")
SPLIT = re.compile(r"^(\d+) = (\d+) \+ (\d+)$")
COUNT_FROM = re.compile(r"^(-?\d+) ([+-]) (\d+):$")
COUNT = re.compile(r"^(\d+): (-?\d+)$")


def replay(question: str, thinking: str) -> int:
    """Checks each line of a trace against plain integer arithmetic and returns the value the trace ends on."""
    a, sign, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
    value, counting = int(a), None
    for line in thinking.split("\n"):
        if match := SPLIT.match(line):
            whole, tens, ones = map(int, match.groups())
            assert whole == int(b) == tens + ones and tens % 10 == 0 and 0 < ones < 10, line
        elif re.fullmatch(rf"{b} is a single part", line):
            assert int(b) < 10 or int(b) % 10 == 0, line
        elif match := EQUATION.match(line):
            x, op, y, z = match.groups()
            assert int(z) == (int(x) + int(y) if op == "+" else int(x) - int(y)), line
            assert op == sign and int(x) in (value, int(a)), line
            value = int(z)
        elif match := COUNT_FROM.match(line):
            start, op, n = match.groups()
            assert int(start) == value and op == sign and 0 < int(n) < 10, line
            counting = (int(n), 1 if op == "+" else -1, 0)
        elif match := COUNT.match(line):
            index, shown = map(int, match.groups())
            n, unit, done = counting
            assert index == done + 1 <= n and shown == value + unit, line
            value, counting = shown, (n, unit, index)
        else:
            raise AssertionError(f"unexpected line {line!r}")
    assert counting is None or counting[2] == counting[0], "the count stopped early"
    return value


@pytest.mark.parametrize("worked", ["split", "counted"])
def test_every_worked_line_is_exact_and_ends_on_the_answer(worked):
    for record in easy_arithmetic(1800, 0, 30, worked, direct_fraction=0.3):
        _, user, assistant = record["messages"]
        end = replay(user["content"], assistant["thinking"])
        assert assistant["content"] == f"Answer: {end}" and record["meta"]["answer"] == str(end)


def test_styles_leave_the_problems_and_their_order_unchanged():
    def problems(records):
        return [(r["messages"][1]["content"], r["meta"]["answer"]) for r in records]

    plain = easy_arithmetic(600, 3, 20)
    assert problems(easy_arithmetic(600, 3, 20, "counted", direct_fraction=0.6)) == problems(plain)
    # the opening of the set every GRPO attempt in bench/RESULTS.md was run on (seed 0, operands up to 30)
    assert problems(easy_arithmetic(4, 0, 30, "counted", direct_fraction=0.6)) == [
        ("What is 30 - 16?", "14"), ("What is 16 - 19?", "-3"), ("What is 12 - 14?", "-2"), ("What is 10 + 9?", "19")]


def test_direct_style_reads_the_generators_styles():
    records = easy_arithmetic(1000, 0, 30, "counted", direct_fraction=0.6)
    direct = [direct_style(r["messages"][1]["content"], f"<think>\n{r['messages'][2]['thinking']}\n</think>")
              for r in records]
    assert direct == [r["messages"][2]["thinking"].count("\n") == 0 for r in records]
    assert 0.55 < sum(direct) / len(direct) < 0.65
