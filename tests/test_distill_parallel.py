"""Distillation training steps under TP=2 and PP=2 (gloo, 2 processes) match a single process."""

import numpy as np
import pytest
import torch

from nemo_plugins.data.token_store import write_token_file
from nemo_plugins.train.metrics import MetricsLog
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state
from tests.test_distributed import _spawn

pytestmark = pytest.mark.distributed


def _records(out_dir):
    return MetricsLog.read(out_dir / "metrics.jsonl")


@pytest.fixture
def problem(tmp_path):
    teacher_config = tiny_config(num_layers=4)
    student_config = tiny_config(num_layers=2, hidden_size=32, ffn_hidden_size=64)
    torch.save({"teacher": hf_state(hf_model(teacher_config)), "student": hf_state(hf_model(student_config))},
               tmp_path / "states.pt")
    rng = np.random.default_rng(0)
    write_token_file([list(rng.integers(3, 128, size=int(rng.integers(10, 60)))) for _ in range(60)],
                     tmp_path / "data", 128, 2, {})
    return teacher_config, student_config, str(tmp_path / "states.pt"), str(tmp_path / "data")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_parallel_distillation_steps_equal_single_process(tmp_path, problem, tp, pp):
    _spawn(distributed_worker.distill_steps, *problem, str(tmp_path / "single"), 1, 1, world_size=1)
    _spawn(distributed_worker.distill_steps, *problem, str(tmp_path / "parallel"), tp, pp, world_size=tp * pp)
    single, parallel = _records(tmp_path / "single"), _records(tmp_path / "parallel")
    assert [r["step"] for r in single] == [r["step"] for r in parallel] == [0, 1, 2, 3, 3]
    for one, two in zip(single, parallel):
        for key in ("loss", "grad_norm", "kl", "student_ppl"):
            if key in one:
                assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (one, two)
    train = [r["loss"] for r in single if r["kind"] == "train"]
    assert train[-1] < train[0], "the KL must fall over three steps at this learning rate"
