"""pass@k: the unbiased estimator equals brute force over every k-subset of the samples; the problems evaluation
groups each problem's planted rewards, counts kinds, skipped prompts and truncation, and samples reproducibly."""

import itertools

import pytest

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_prompts import Prompt
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.eval.pass_at_k import PassAtKSampling, ProblemsSettings, evaluate_problems, pass_at_k
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config


def _brute_force(outcomes, k):
    """Share of the k-subsets of one problem's samples that hold at least one solved sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("outcomes", [(True,), (False,), (False, True, False, False, True), (False,) * 6,
                                      (True, True, False, True, False, False, False)])
def test_estimator_equals_brute_force_over_subsets(outcomes):
    for k in range(1, len(outcomes) + 1):
        assert pass_at_k([outcomes], [k])[f"pass@{k}"] == pytest.approx(_brute_force(outcomes, k))


def test_pass_at_k_averages_problems():
    solved = [(True, False, False, False), (False,) * 4, (True,) * 4]
    report = pass_at_k(solved, [1, 2, 4])
    assert report["pass@1"] == pytest.approx((0.25 + 0 + 1) / 3)
    assert report["pass@2"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert report["pass@4"] == pytest.approx(2 / 3)


def test_sampling_settings():
    with pytest.raises(ConfigError, match="temperature 0"):
        PassAtKSampling(samples=2, ks=[1])
    with pytest.raises(ConfigError, match="ks"):
        PassAtKSampling(samples=2, ks=[3], temperature=1.0)
    with pytest.raises(ConfigError, match="seq_len"):
        ProblemsSettings(seq_len=64, max_new_tokens=64)


class PlantedRewards:
    """A rewards double: the j-th answer graded for a problem earns ``meta["planted"][j]``; records the items."""

    def __init__(self):
        self.items = []

    def __call__(self, items):
        self.items.extend(items)
        seen = {}
        rewards = []
        for item in items:
            key = id(item.meta)
            j = seen[key] = seen.get(key, -1) + 1
            rewards.append(item.meta["planted"][j])
        return rewards


@pytest.fixture(scope="module")
def chat_format():
    return load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))


def _prompt(chat_format, text, **meta):
    messages = [{"role": "user", "content": text}]
    return Prompt(tuple(chat_format.prompt_ids(messages)), messages, meta)


def test_problems_group_planted_rewards_and_count(chat_format):
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig()).eval()
    prompts = [_prompt(chat_format, "What is 2 + 2?", reward="math", planted=[1.0, 0.0, 0.0]),
               _prompt(chat_format, "Write f.", reward="code", planted=[0.5, 0.5, 1.0]),
               _prompt(chat_format, "word " * 300, reward="math", planted=[1.0, 1.0, 1.0]),  # too long: skipped
               _prompt(chat_format, "What is 3 + 3?", reward="math", planted=[0.0, 0.0, 0.0])]
    settings = ProblemsSettings(samples=3, ks=[1, 2, 3], temperature=1.0, max_new_tokens=5, seq_len=64, seed=7)
    rewards = PlantedRewards()
    report = evaluate_problems(model, chat_format, prompts, rewards, settings)
    assert (report["problems"], report["skipped_too_long"]) == (3, 1)
    assert report["pass@1"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
    assert report["pass@3"] == pytest.approx(2 / 3)
    assert report["reward"] == pytest.approx(3.0 / 9)
    assert report["by_kind"]["math"] == {"pass@1": pytest.approx(1 / 6), "pass@2": pytest.approx(1 / 3),
                                         "pass@3": pytest.approx(0.5), "problems": 2}
    assert report["by_kind"]["code"]["pass@3"] == 1.0
    # a random tiny model never ends its turn in 5 tokens: every answer is cut at the limit (or flagged a loop)
    assert report["truncation_rate"] + report["loop_rate"] == 1.0
    assert [item.messages for item in rewards.items[::3]] == [prompts[i].messages for i in (0, 1, 3)]
    again = PlantedRewards()
    evaluate_problems(model, chat_format, prompts, again, settings)
    assert [i.response for i in again.items] == [i.response for i in rewards.items]  # seeded: the same answers
    assert len({i.response for i in rewards.items[:3]}) > 1  # the samples of one problem differ
