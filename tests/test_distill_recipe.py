"""recipes.distill as a user runs it: SIGKILL at a random step, the same command again, the same trajectory."""

import random
import signal
import subprocess
import sys

import pytest

from nemo_plugins.train.checkpoint import latest_checkpoint
from nemo_plugins.train.loop import REQUEUE_EXIT_CODE
from nemo_plugins.train.metrics import MetricsLog
from tests.conftest import save_tiny_teacher_and_student
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny teacher and student on SmolLM2's real tokenizer (vocabulary 49,152), as megatron checkpoints."""
    root = tmp_path_factory.mktemp("distill_recipe")
    save_tiny_teacher_and_student(root)
    return root


def _command(root, out_dir):
    return [sys.executable, "-m", "recipes.distill", "model=tiny", f"model.source=megatron:{root / 'teacher'}",
            "model.architecture=null", f"student=megatron:{root / 'student'}", f"data.cache_dir={root / 'tokens'}",
            "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0}]", "stage.distill.train.seq_len=64",
            "stage.distill.train.micro_batch_size=2", "stage.distill.train.global_batch_size=4",
            f"stage.distill.train.train_tokens={STEPS * 256}", "stage.distill.train.save_interval=2",
            "stage.distill.train.eval_rows_per_source=2", "stage.distill.optimizer.lr=3e-3", f"output_dir={out_dir}"]


def test_sigkill_then_same_command_continues_bit_identically(checkpoints, tmp_path):
    env = recipe_env()
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(checkpoints, reference), check=True, env=env, capture_output=True)

    kill_after = random.randrange(1, STEPS - 1)
    interrupted = tmp_path / "interrupted"
    code, _ = interrupt_after_step(_command(checkpoints, interrupted), interrupted, kill_after + 1, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job finished before the kill after step {kill_after + 1}"
    subprocess.run(_command(checkpoints, interrupted), check=True, env=env, capture_output=True)

    expected, resumed = train_records(reference), train_records(interrupted)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1)), f"killed after step {kill_after + 1}"
    assert resumed == expected, f"trajectory differs after a SIGKILL after step {kill_after + 1}"
    assert expected[-1]["loss"] < expected[0]["loss"]
    one, two = (MetricsLog.read(d / "metrics.jsonl")[-1] for d in (reference, interrupted))
    assert one == two


def test_sigusr1_saves_after_the_current_step_exits_for_requeue_and_the_rerun_continues_bit_identically(
        checkpoints, tmp_path):
    env = recipe_env()
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(checkpoints, reference), check=True, env=env, capture_output=True)

    signal_after = random.randrange(1, STEPS - 2)
    preempted = tmp_path / "preempted"
    code, stderr = interrupt_after_step(_command(checkpoints, preempted), preempted, signal_after, signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, stderr[-2000:]
    saved = latest_checkpoint(preempted / "checkpoints")
    stopped_at = len(train_records(preempted))
    assert saved is not None and saved.name == f"step_{stopped_at:08d}" and stopped_at < STEPS, \
        "the signal must save the step it interrupted (not only the periodic saves)"
    subprocess.run(_command(checkpoints, preempted), check=True, env=env, capture_output=True)
    assert train_records(preempted) == train_records(reference)
    assert MetricsLog.read(preempted / "metrics.jsonl")[-1] == MetricsLog.read(reference / "metrics.jsonl")[-1]
