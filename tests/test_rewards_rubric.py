"""The rubric reward: fraction of items a judge says yes to, thinking stripped, one judge call per batch; the model
judge's yes/no margins equal a naive full-logits reference on a tiny model with the real tokenizer."""

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.model.builder import build_model
from nemo_plugins.rl.rewards import RewardItem, RewardSettings, RubricRewardSettings, build_rewards
from nemo_plugins.rl.rewards.rubric import ModelJudge, RubricReward
from tests.conftest import tiny_config

QUESTION = [{"role": "user", "content": "Name the capital of France in lowercase."}]
CHECKS = {"It mentions paris.": lambda answer: "paris" in answer,
          "It is all lowercase.": lambda answer: answer == answer.lower(),
          "It has no digits.": lambda answer: not any(c.isdigit() for c in answer)}


class RuleJudge:
    """A judge double: reads the rendered template back and applies the rubric item's rule to the answer."""

    def __init__(self):
        self.calls = []

    def margins(self, texts, answers):
        self.calls.append((list(texts), answers))
        margins = []
        for text in texts:
            answer = text.split("Answer:\n", 1)[1].split("\n\nRequirement: ", 1)[0]
            item = text.split("\n\nRequirement: ", 1)[1].split("\n", 1)[0]
            margins.append(1.0 if CHECKS[item](answer) else -1.0)
        return torch.tensor(margins)


def _item(response, rubric=tuple(CHECKS)):
    return RewardItem(QUESTION, {"reward": "rubric", "rubric": list(rubric)}, response)


def test_fraction_of_items_satisfied_in_one_judge_call():
    judge = RuleJudge()
    reward = RubricReward(RubricRewardSettings(), judge)
    responses = ["paris", "Paris", "PARIS 75", "<think>Paris, 2 million people, PARIS</think>\nparis"]
    assert reward([_item(r) for r in responses]) == pytest.approx([1.0, 1 / 3, 0.0, 1.0])
    assert len(judge.calls) == 1 and len(judge.calls[0][0]) == 12  # every item of the batch in one call
    texts, answers = judge.calls[0]
    assert answers == (" yes", " no")
    assert not any("think" in text or "million" in text for text in texts)  # thinking stripped before judging
    assert "[user]\nName the capital of France in lowercase." in texts[0]  # the question is shown
    assert reward([_item("paris", rubric=["It has no digits."])]) == [1.0]


def test_the_template_and_answers_come_from_the_settings():
    judge = RuleJudge()
    settings = RubricRewardSettings(template="Q: {prompt}\nAnswer:\n{response}\n\nRequirement: {item}\n{{yes/no}}:",
                                    yes=" Y", no=" N")
    RubricReward(settings, judge)([_item("paris")])
    texts, answers = judge.calls[0]
    assert answers == (" Y", " N") and texts[0].startswith("Q: [user]") and texts[0].endswith("{yes/no}:")


def test_dispatch_passes_the_judge():
    rewards = build_rewards(RewardSettings(), judge=RuleJudge())
    items = [_item("PARIS"), RewardItem(QUESTION, {"reward": "math", "answer": "3"}, "Answer: 3"), _item("paris")]
    assert rewards(items) == pytest.approx([1 / 3, 1.0, 1.0])


def test_bad_settings_and_records():
    with pytest.raises(ConfigError, match=r"\['\{item\}'\]"):
        RubricRewardSettings(template="{prompt} {response}")
    with pytest.raises(ConfigError, match="does not format"):
        RubricRewardSettings(template="{prompt} {response} {item} {other}")
    with pytest.raises(ConfigError, match="different"):
        RubricRewardSettings(yes=" yes", no=" yes")
    with pytest.raises(DataError, match="rubric"):
        RubricReward(RubricRewardSettings(), RuleJudge())([_item("paris", rubric=[])])


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir(ModelSource.parse("embedded:smollm2")))


def test_model_judge_margins_equal_a_naive_full_logits_reference(tokenizer):
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig()).eval()
    judge = ModelJudge(model, tokenizer, micro_batch_size=2, max_tokens=512)
    texts = ["Is the sky blue? Reply:", "Two plus two is four. True? Reply yes or no. Reply:", "x", "Reply:"]
    yes, no = tokenizer(" yes", add_special_tokens=False)["input_ids"][0], tokenizer(" no")["input_ids"][0]
    assert yes != no and judge.label_ids((" yes", " no")) == (yes, no)
    with torch.no_grad():
        naive = []
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            logits = model(ids, torch.arange(ids.shape[1])[None])[0, -1].float()
            naive.append(logits[yes] - logits[no])
    margins = judge.margins(texts, (" yes", " no"))
    assert torch.allclose(margins, torch.stack(naive), atol=1e-5) and margins.abs().min() > 0
    assert torch.allclose(judge.margins(texts, (" no", " yes")), -margins, atol=1e-5)


def test_model_judge_answers_no_to_texts_longer_than_its_context(tokenizer):
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig()).eval()
    judge = ModelJudge(model, tokenizer, micro_batch_size=4, max_tokens=8)
    margins = judge.margins(["short text", "a much longer text that has more than eight tokens in it"],
                            (" yes", " no"))
    assert margins[1] < 0 and judge.too_long == 1
    with pytest.raises(ConfigError, match="same token"):
        judge.label_ids((" n", " nope"))  # " nope" is " n" + "ope"
