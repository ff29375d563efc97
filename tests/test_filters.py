"""Reasoning-trace filters: each on cases that must pass and cases that must fail, and the record screen."""

import pytest

from nemo_plugins.data.instruct_sources import word_problems
from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.filters import (
    FilterSettings,
    repetition,
    repetition_ratio,
    screen,
    script_mixing,
    think_format,
    truncation,
)

SOLUTION = next(word_problems(1, seed=3))
TRACE = SOLUTION.solution().rsplit("\n", 1)[0]
ANSWER = SOLUTION.solution().rsplit("\n", 1)[1]
GOOD = f"<think>\n{TRACE}\n</think>\n{ANSWER}"


@pytest.mark.parametrize("text", [GOOD, f"[THINK]{TRACE}[/THINK]{ANSWER}", f"  <think>x</think> {ANSWER}"])
def test_well_formed_responses_pass_format_and_truncation(text):
    assert think_format(text) is None
    assert truncation(text) is None


@pytest.mark.parametrize("text, reason", [
    (ANSWER, "no think block"),
    (f"<think>{TRACE}</think>", "no final answer"),
    (f"<think>{TRACE}</think>\n   \n", "no final answer"),
    (f"{TRACE}</think>{ANSWER}", "unbalanced think block"),
    (f"<think>a<think>b</think>{ANSWER}", "unbalanced think block"),
    (f"<think>a[/THINK]{ANSWER}", "unbalanced think block"),
    (f"<think>a</think>b<think>c</think>{ANSWER}", "several think blocks"),
    (f"Let me see.<think>{TRACE}</think>{ANSWER}", "think block not at the start"),
])
def test_bad_formats_fail_with_their_reason(text, reason):
    assert think_format(text) == reason


def test_thinking_can_be_optional():
    assert think_format(ANSWER, require_thinking=False) is None
    assert think_format("  ", require_thinking=False) == "no final answer"


@pytest.mark.parametrize("text, reason", [
    (f"<think>\n{TRACE}", "think block never closed"),
    (f"[THINK]{TRACE}", "think block never closed"),
    ("<think>plan</think>\n```python\ndef f(x):\n    return", "code block never closed"),
])
def test_truncated_traces_fail(text, reason):
    assert truncation(text) == reason


def test_closed_code_blocks_are_not_truncated():
    assert truncation("<think>plan</think>\n```python\ndef f(x):\n    return x\n```\nDone.") is None


def test_repetition_ratio_counts_repeated_ngrams():
    assert repetition_ratio("a b c d e f", ngram=2) == (0.0, 5)
    # "a b" repeated: the n-grams are ab ba ab ba ab -> 2 distinct of 5
    assert repetition_ratio("a b a b a b", ngram=2) == pytest.approx((1 - 2 / 5, 5))


def test_worked_solutions_pass_and_a_looping_trace_fails():
    assert repetition(GOOD) is None
    assert repetition(TRACE + "\n" + "\n".join(["Wait, let me recompute the total cost again."] * 12)) == \
        "excessive repetition"
    assert repetition("the same words " * 3) is None  # too short to judge


@pytest.mark.parametrize("text", [GOOD, "The angle θ is π/3 radians, so its cosine is exactly one half here.",
                                  "東京は日本の首都です。ひらがなとカタカナと漢字を使います。人口はとても多いです。",
                                  "Привет, это ответ на русском языке без переключения."])
def test_one_script_passes(text):
    assert script_mixing(text) is None


def test_a_response_drifting_into_another_script_fails():
    drift = "First compute the cost of the pens. " + "然后我们计算总价格并且找零钱给顾客。"
    assert script_mixing(drift) == "script switch (CJK in LATIN text)"
    assert script_mixing("Answer ответ answer") is None  # too few letters to judge


def test_screen_applies_the_filters_in_order_to_the_assistant_turns():
    settings = FilterSettings()
    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "thinking": TRACE, "content": ANSWER}]}
    assert screen(record, settings) is None
    no_answer = {"messages": [*record["messages"][:1], {"role": "assistant", "thinking": TRACE, "content": ""}]}
    assert screen(no_answer, settings) == ("format", "no final answer")
    truncated = {**record, "meta": {"finish_reason": "length"}}
    assert screen(truncated, settings) == ("truncation", "cut at the length limit")
    looping = {"messages": [*record["messages"][:1], {"role": "assistant", "thinking": "I will check. " * 40,
                                                      "content": ANSWER}]}
    assert screen(looping, settings) == ("repetition", "excessive repetition")
    assert screen(looping, FilterSettings(max_repetition=None)) is None
    plain = {"messages": [*record["messages"][:1], {"role": "assistant", "content": ANSWER}]}
    assert screen(plain, settings) == ("format", "no think block")
    assert screen(plain, FilterSettings(require_thinking=False)) is None


@pytest.mark.parametrize("values, key", [({"max_repetition": 1.5}, "filters.max_repetition"),
                                         ({"max_foreign_script": 0.0}, "filters.max_foreign_script"),
                                         ({"repetition_ngram": 0}, "filters.repetition_ngram")])
def test_settings_name_the_bad_key(values, key):
    with pytest.raises(ConfigError, match=key):
        FilterSettings(**values)
