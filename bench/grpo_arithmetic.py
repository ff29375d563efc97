"""GRPO evidence on generated math: held-out pass@1 (greedy) of a policy before, during and after a short GRPO run,
with the truncation rate, rewarded by the math reward (math-verify on the final answer; ``rl/rewards/math.py``).

The policy is any model source (default: the parent, SmolLM2-135M-Instruct; a demo child after reasoning SFT is the
paper's starting point); the problems are ``builtin:reasoning_math`` (word problems, linear equations, unit
conversions, exact answers), the held-out tail never trained on. The run is ``recipes.grpo`` as a user runs it
(problem filtering on), in a subprocess; the script then prints the eval curve and the step means as a markdown
block for bench/RESULTS.md. Not part of the test suite (tens of minutes on 2 CPU cores).

    python bench/grpo_arithmetic.py [--policy embedded:smollm2] [--steps 16] [--max-new-tokens 192] [--out runs/bench_grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nemo_plugins.rl.grpo import STEP_METRICS
from nemo_plugins.rl.online_stage import StepMetrics
from nemo_plugins.train.metrics import MetricsLog


def command(args: argparse.Namespace) -> list[str]:
    seq_len = args.max_new_tokens + 160  # the longest reasoning_math prompt with SmolLM2's template is ~120 tokens
    return [sys.executable, "-m", "recipes.grpo", f"policy={args.policy}", "data@chat_data=reasoning_rl_demo",
            "chat_data.sources=[{name: reasoning_math, paths: ['builtin:reasoning_math?count=3000&seed=0'], weight: 1.0}]",
            f"stage.grpo.train.seq_len={seq_len}", f"stage.grpo.train.global_batch_size={args.problems}",
            f"stage.grpo.train.train_tokens={args.steps * args.problems * seq_len}",
            f"stage.grpo.train.eval_interval={args.eval_interval}", f"stage.grpo.train.save_interval={args.steps}",
            f"stage.grpo.optimizer.lr={args.lr}", f"stage.grpo.optimizer.min_lr={args.lr}",
            f"stage.grpo.sampling.group_size={args.group_size}", f"stage.grpo.sampling.max_new_tokens={args.max_new_tokens}",
            f"stage.grpo.problem_filter.samples={args.filter_samples}", f"stage.grpo.eval_prompts={args.eval_problems}",
            f"output_dir={args.out}"]


def report(out: Path, args: argparse.Namespace, wall: float) -> str:
    evals = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "eval"]
    steps = StepMetrics.read(out / STEP_METRICS)
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [f"policy {args.policy}, {args.steps} steps x {args.problems} problems x G={args.group_size}, "
             f"max_new_tokens {args.max_new_tokens}, lr {args.lr}, {wall / 60:.1f} min wall",
             f"problem filter ({args.filter_samples} samples each): {manifest['problem_filter']}",
             "", "| step | held-out pass@1 | mean reward | truncation rate | response tokens |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['pass_at_1']:.3f} | {r['reward']:.3f} | {r['truncation_rate']:.3f} | "
              f"{r['response_tokens']:.1f} |" for r in evals]
    lines += ["", "| step | train reward | pass rate | kept groups | zero-adv. groups | truncation | clip fraction |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['reward']:.3f} | {r['pass_rate']:.3f} | {r['kept_groups']:.0f} | "
              f"{r['zero_advantage_groups']:.0f} | {r['truncation_rate']:.3f} | {r['clip_fraction']:.2e} |" for r in steps]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", default="embedded:smollm2")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--problems", type=int, default=4, help="problems per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--filter-samples", type=int, default=4)
    parser.add_argument("--eval-problems", type=int, default=48)
    parser.add_argument("--eval-interval", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_grpo"))
    args = parser.parse_args()
    started = time.monotonic()
    subprocess.run(command(args), check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    print(report(args.out, args, time.monotonic() - started))


if __name__ == "__main__":
    main()
