"""The math reward: answer extraction order, math-verify equivalence, thinking stripped, the format share."""

import pytest

from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.rl.rewards import MathRewardSettings, RewardItem, RewardSettings, build_rewards
from nemo_plugins.rl.rewards.math import MathReward, final_answer, is_correct, well_formed

PROMPT = [{"role": "user", "content": "What is 7 divided by 3?"}]


def _reward(response: str, answer: str, format_weight: float = 0.0) -> float:
    item = RewardItem(PROMPT, {"reward": "math", "answer": answer}, response)
    return MathReward(MathRewardSettings(format_weight))([item])[0]


@pytest.mark.parametrize("gold, answer", [("1/2", "0.5"), ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
                                          ("7/3", "\\frac{7}{3}"), ("-4", "-4.0"), ("12", "x = 12"),
                                          ("1000", "1,000")])
def test_equivalent_answers_verify(gold, answer):
    assert is_correct(answer, gold)


@pytest.mark.parametrize("gold, answer", [("7/3", "2.33"), ("1/2", "0.51"), ("3", "-3"), ("7/3", "3/7"),
                                          ("5", None), ("5", "")])
def test_different_answers_do_not(gold, answer):
    assert not is_correct(answer, gold)


@pytest.mark.parametrize("answer, correct", [
    ("15 + 2", False), ("15+2", False), ("(15 + 2)", False), ("17 - 0", False), ("10 + 7", False),
    ("15 + 2 = 17", True), ("17", True), ("x = 17", True), ("17 apples", True), ("\\frac{34}{2} = 17", True),
])
def test_an_expression_is_no_answer_where_the_gold_is_one_number(answer, correct):
    """The hack a GRPO run found: restating the question ("Answer: 15 + 2") verifies as 17 under sympy."""
    response = f"<think>2 is a single part</think>\nAnswer: {answer}"
    assert _reward(response, "17") == float(correct)


def test_symbolic_golds_are_still_compared_by_equivalence():
    assert is_correct("x = 3", "3") and is_correct("1/2", "\\frac{1}{2}")
    assert is_correct("2x+2", "2*(x+1)")  # the gold is no single number: any equivalent expression


def test_extraction_order_answer_line_then_boxed_then_last_number():
    both = "We get \\boxed{\\frac{1}{3}} first.\nAnswer: 5\nso 9 is wrong"
    assert final_answer(both) == "5"  # the answer line wins over the box and the later number
    assert final_answer("So it is \\boxed{\\frac{7}{\\sqrt{4}}}, not 3") == "\\frac{7}{\\sqrt{4}}"  # nested braces
    assert final_answer("first 3, then 4 and finally -2.5 apples") == "-2.5"
    assert final_answer("Answer: 1\n**Final answer:** 7/3.") == "7/3"  # the last line, bold and period dropped
    assert final_answer("no number here") is None


def test_thinking_is_stripped_before_extraction():
    assert final_answer("<think>the answer is 99</think>\nAnswer: 7/3") == "7/3"
    assert final_answer("[THINK]Answer: 99[/THINK]It is 7/3") == "7/3"
    assert final_answer("<think>Answer: 7/3 ... still thinking") is None  # cut mid-thought: no answer
    assert _reward("<think>Answer: 7/3 ... still thinking", "7/3") == 0.0


def test_reward_values():
    assert _reward("7 / 3 = 2.333...\nAnswer: 7/3", "7/3") == 1.0
    assert _reward("Answer: 2.33", "7/3") == 0.0
    assert _reward("The result is \\boxed{\\frac{1}{2}}.", "0.5") == 1.0


def test_format_share():
    good = "<think>7 / 3 does not divide evenly</think>\nAnswer: 7/3"
    assert well_formed(good) and well_formed("[THINK]x[/THINK]Answer: 2")
    assert not well_formed("Answer: 7/3")  # no think block
    assert not well_formed("<think>a</think><think>b</think>Answer: 7/3")  # two blocks
    assert not well_formed("<think>unclosed\nAnswer: 7/3")
    assert not well_formed("<think>x</think>\nthe result is 7/3")  # no answer line
    assert _reward(good, "7/3", 0.2) == pytest.approx(1.0)
    assert _reward("Answer: 7/3", "7/3", 0.2) == pytest.approx(0.8)
    assert _reward("<think>x</think>\nAnswer: 2", "7/3", 0.2) == pytest.approx(0.2)


def test_bad_settings_and_records():
    with pytest.raises(ConfigError, match="format_weight"):
        MathRewardSettings(1.0)
    with pytest.raises(DataError, match="answer"):
        MathReward(MathRewardSettings())([RewardItem(PROMPT, {"reward": "math"}, "Answer: 1")])
    with pytest.raises(DataError, match="does not parse"):
        _reward("Answer: 1", "")


def test_dispatch_keeps_order_and_refuses_unknown_kinds():
    rewards = build_rewards(RewardSettings())
    items = [RewardItem(PROMPT, {"reward": "math", "answer": str(n)}, f"Answer: {n if n % 2 else n + 1}")
             for n in range(5)]
    assert rewards(items) == [0.0, 1.0, 0.0, 1.0, 0.0]
    with pytest.raises(DataError, match="'poetry'"):
        rewards([RewardItem(PROMPT, {"reward": "poetry"}, "")])
    with pytest.raises(ConfigError, match="judge"):
        rewards([RewardItem(PROMPT, {"reward": "rubric", "rubric": ["Is short."]}, "ok")])
