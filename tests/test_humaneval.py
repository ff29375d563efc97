"""HumanEval through the project's sandbox: the reference solutions pass, broken ones fail, completions are cut at
the paper's stop sequences, pass@k counts per problem, and a model's completions go the whole way."""

import pytest

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.eval.humaneval import (
    HumanEvalSettings,
    evaluate_humaneval,
    humaneval_problems,
    score_completions,
    truncate,
)
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config

SETTINGS = HumanEvalSettings(workers=2)


def test_problems_in_task_order():
    problems = humaneval_problems()
    assert len(problems) == 164 and [p["task_id"] for p in problems[:11]] == [f"HumanEval/{i}" for i in range(11)]
    assert len(humaneval_problems(3)) == 3


def test_truncation_at_stop_sequences():
    body = "    return a + b\n"
    assert truncate(body + "\n\ndef other():\n    pass") == body + "\n"
    assert truncate(body + "\nif __name__ == '__main__':\n    main()") == body
    assert truncate(body + "\n# tests\nprint(add(1, 2))") == body
    indented = "    if a:\n        return 1\n    return 2"
    assert truncate(indented) == indented


def test_reference_solutions_pass_and_broken_ones_fail():
    problems = humaneval_problems(6)
    completions = [[p["canonical_solution"] + "\n\ndef unused():\n    pass\n",  # a stop sequence: cut off
                    "    pass\n",
                    p["canonical_solution"].replace("return", "return None and", 1)]
                   for p in problems]
    completions = [[truncate(c) for c in group] for group in completions]
    report = score_completions(problems, completions, HumanEvalSettings(samples=3, ks=[1, 3], temperature=0.8,
                                                                        workers=2))
    assert report["solved"] == [p["task_id"] for p in problems]
    assert report["pass@1"] == pytest.approx(1 / 3) and report["pass@3"] == 1.0
    assert [e["passed"] for e in report["examples"]] == [True] * 3


def test_a_hanging_completion_fails_within_the_limits():
    [problem] = humaneval_problems(1)
    report = score_completions([problem], [["    while True:\n        pass\n"]], SETTINGS)
    assert report["pass@1"] == 0.0 and report["solved"] == []


def test_settings():
    with pytest.raises(ConfigError, match="temperature 0"):
        HumanEvalSettings(samples=4, ks=[1, 4])
    with pytest.raises(ConfigError, match="ks"):
        HumanEvalSettings(samples=2, ks=[1, 4], temperature=0.8)
    with pytest.raises(ConfigError, match="limit"):
        HumanEvalSettings(limit=0)


def test_a_models_completions_are_generated_and_scored():
    tokenizer = load_tokenizer(tokenizer_dir(ModelSource.parse("embedded:smollm2")))
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig()).eval()
    report = evaluate_humaneval(model, tokenizer, HumanEvalSettings(limit=2, max_new_tokens=6, workers=2))
    assert report["problems"] == 2 and report["pass@1"] == 0.0  # a random model solves nothing
    assert 0.0 <= report["truncation_rate"] <= 1.0 and len(report["examples"]) == 2
