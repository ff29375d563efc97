"""recipes.evaluate's downstream tasks on a tiny checkpoint with SmolLM2's tokenizer, composed as a user's command
line: problems (the reasoning data's held-out tail, all three reward kinds, the rubric judge loaded from a model
source) and humaneval write their reports; bad task names and settings are refused before any model is loaded."""

import json

import pytest

from nemo_plugins.errors import ConfigError
from recipes import evaluate as evaluate_recipe
from recipes._entry import compose_typed
from tests.conftest import save_tiny_teacher_and_student


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_teacher_and_student(tmp_path_factory.mktemp("evaluate"))


def _run(overrides):
    return evaluate_recipe.run(compose_typed("evaluate", *overrides))


def _model(checkpoints):
    return ["model=tiny", f"model.source=megatron:{checkpoints / 'teacher'}", "model.architecture=null"]


def test_problems_task_grades_the_heldout_problems_of_every_kind(checkpoints, tmp_path):
    out = tmp_path / "problems.json"
    sources = ("[{name:reasoning_math,paths:['builtin:reasoning_math?count=40&seed=0'],weight:1.0},"
               "{name:reasoning_code,paths:['builtin:reasoning_code?count=40&seed=0'],weight:1.0},"
               "{name:reasoning_rubric,paths:['builtin:reasoning_rubric?count=40&seed=0'],weight:1.0}]")
    report = _run(_model(checkpoints) + [
        "task=problems", f"chat_data.sources={sources}", "chat_data.heldout_fraction=0.1",
        f"chat_data.cache_dir={tmp_path / 'cache'}", "problems.problems=6", "problems.samples=2", "problems.ks=[1,2]",
        "problems.temperature=1.0", "problems.max_new_tokens=4", "problems.seq_len=1024",
        f"judge=megatron:{checkpoints / 'student'}", f"output={out}"])
    assert json.loads(out.read_text()) == report
    assert report["task"] == "problems" and report["problems"] + report["skipped_too_long"] == 6
    assert set(report["by_kind"]) <= {"math", "code", "rubric"} and "rubric" in report["by_kind"]
    assert report["judge"] == f"megatron:{checkpoints / 'student'}"
    assert 0.0 <= report["pass@1"] <= report["pass@2"] <= 1.0 and report["truncation_rate"] + report["loop_rate"] == 1.0


def test_humaneval_task_writes_its_report(checkpoints, tmp_path):
    out = tmp_path / "humaneval.json"
    report = _run(_model(checkpoints) + ["task=humaneval", "humaneval.limit=2", "humaneval.max_new_tokens=4",
                                         f"output={out}"])
    assert json.loads(out.read_text()) == report
    assert (report["task"], report["problems"], report["pass@1"]) == ("humaneval", 2, 0.0)


@pytest.mark.parametrize("override, message", [
    ("task=mmlu", r"^task: Invalid value 'mmlu', expected one of \[perplexity, problems, humaneval\]"),
    ("humaneval.samples=3", "temperature 0"),
    ("+humaneval.bogus=1", r"^humaneval.bogus: unknown key"),
])
def test_bad_settings_are_refused(checkpoints, tmp_path, override, message):
    task = [] if override.startswith("task=") else ["task=humaneval"]
    with pytest.raises(ConfigError, match=message):
        _run(_model(checkpoints) + task + [override, f"output={tmp_path / 'x.json'}"])
