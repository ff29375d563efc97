"""The one training loop reproduces the demo's distill_short trajectory recorded before the loop existed.

`tests/assets/demo_distill_short_metrics.jsonl` is the `metrics.jsonl` of `python -m recipes.cascade
until=child_14b_like/distill_short` written by the distillation trainer that the loop replaced (commit d48b57a),
re-recorded once when the loss became a global per-token mean through megatron's per-token path (the gradient is
the same for the demo's equal token counts; the summation order is not: every figure moved by <= 1.0e-6 relative),
and re-recorded when the demo changed on purpose (issue 14: the paper-shaped children, first child 30L/576h/768f
tied; the local spec's attention through SDPA; prose in the data mix), and once more for the doubled distill_short
budget (24 steps), the CPU KL kernels' summation order (<= 1e-6 relative) and the per-source held-out figures.
Every train and eval record (loss, lr, grad norm, tokens read, held-out KL and perplexities) must be equal bit for
bit. If the demo's shapes, data or budgets change on purpose, re-record the asset with that command.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_plugins.train.metrics import MetricsLog

pytestmark = pytest.mark.slow
ASSET = Path(__file__).parent / "assets" / "demo_distill_short_metrics.jsonl"


def test_demo_distill_short_metrics_are_bit_identical_to_the_recorded_trajectory(tmp_path):
    out = tmp_path / "demo"
    subprocess.run([sys.executable, "-m", "recipes.cascade", "until=child_14b_like/distill_short", "posttrain=false",
                    f"output_dir={out}"],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    recorded = [json.loads(line) for line in ASSET.read_text().splitlines()]
    produced = MetricsLog.read(out / "child_14b_like" / "distill_short" / "metrics.jsonl")
    assert [r["kind"] for r in produced] == [r["kind"] for r in recorded]
    for got, want in zip(produced, recorded):
        assert got == want, f"step {want['step']} {want['kind']}: {got} != {want}"
