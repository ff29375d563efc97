"""GRPO evidence on generated math: held-out pass@1 (greedy) of a policy before, during and after a short GRPO run,
with the truncation rate, rewarded by the math reward (math-verify on the final answer; ``rl/rewards/math.py``).

The policy is any model source (default: the parent, SmolLM2-135M-Instruct; a demo child after reasoning SFT is the
paper's starting point). The problems (``--problems-source``):
- ``two_step`` (default): ``a + b`` / ``a - b`` with operands up to ``--max-operand`` (the difficulty knob), worked
  the way a small model can follow: the second operand split into tens and ones, one exact line per partial result,
  then ``Answer: <value>``. Written by ``easy_arithmetic`` (seeded, deterministic) to a JSONL of chat records with
  ``meta`` for the math reward, with a short system message in every record (GRPO renders prompts as they are, so
  the SFT run on the same file must not add its own: ``stage.sft_kd.system_prompt=null``);
- ``reasoning_math``: ``builtin:reasoning_math`` (word problems, linear equations, unit conversions): a demo child
  solves ~none of them, so every group has zero advantage and GRPO has nothing to learn from.
The held-out tail of the source (``heldout_fraction`` 0.05) is never trained on, by SFT or GRPO. The run is
``recipes.grpo`` as a user runs it (problem filtering on), in a subprocess; the script then prints the eval curve
and the step means as a markdown block for bench/RESULTS.md. Not part of the test suite (tens of minutes on CPU).

    python bench/grpo_arithmetic.py --write-problems runs/bench_grpo_data/two_step.jsonl   # the file for SFT
    python bench/grpo_arithmetic.py [--policy embedded:smollm2] [--steps 16] [--max-new-tokens 64] [--out runs/bench_grpo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from nemo_plugins.generation.tools import format_exact
from nemo_plugins.rl.grpo import STEP_METRICS
from nemo_plugins.rl.online_stage import StepMetrics
from nemo_plugins.train.metrics import MetricsLog

SYSTEM = "Work the sum out step by step, then give the final answer on a last line 'Answer: <value>'."


def easy_arithmetic(count: int, seed: int, max_operand: int) -> list[dict]:
    """``count`` distinct problems ``a + b`` or ``a - b`` (1 <= a, b <= max_operand) as chat records: thinking that
    adds or subtracts the tens of b, then its ones (each line exact), content ``Answer: <value>``; meta for the math
    reward. Deterministic by (seed, max_operand)."""
    if count > 2 * max_operand ** 2:
        raise SystemExit(f"--count {count}: operands up to {max_operand} give only {2 * max_operand ** 2} problems")
    rng = random.Random(f"easy_arithmetic/{seed}/{max_operand}")
    records, seen = [], set()
    while len(records) < count:
        a, b, sign = rng.randint(1, max_operand), rng.randint(1, max_operand), rng.choice("+-")
        if (a, b, sign) in seen:
            continue
        seen.add((a, b, sign))
        tens, ones = b - b % 10, b % 10
        step = (lambda x, y: x + y) if sign == "+" else (lambda x, y: x - y)
        middle = step(a, tens)
        lines = [f"{b} = {tens} + {ones}" if tens and ones else f"{b} is a single part"]
        lines += [f"{a} {sign} {tens} = {middle}"] if tens else []
        lines += [f"{middle} {sign} {ones} = {step(middle, ones)}"] if ones else []
        answer = format_exact(step(a, b))
        records.append({"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"What is {a} {sign} {b}?"},
                                     {"role": "assistant", "thinking": "\n".join(lines), "content": f"Answer: {answer}"}],
                        "meta": {"reward": "math", "answer": answer, "source": "easy_arithmetic"}})
    return records


def write_problems(path: Path, args: argparse.Namespace) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = easy_arithmetic(args.count, args.seed, args.max_operand)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def sources(args: argparse.Namespace) -> str:
    if args.problems_source == "reasoning_math":
        return "[{name: reasoning_math, paths: ['builtin:reasoning_math?count=3000&seed=0'], weight: 1.0}]"
    path = write_problems(args.out.parent / f"{args.out.name}_data" / "two_step.jsonl", args)
    return f"[{{name: two_step, paths: ['{path.resolve()}'], weight: 1.0}}]"


def command(args: argparse.Namespace) -> list[str]:
    # room for the prompt: the longest reasoning_math prompt with SmolLM2's template is ~120 tokens, two_step's ~45
    seq_len = args.max_new_tokens + (160 if args.problems_source == "reasoning_math" else 64)
    return [sys.executable, "-m", "recipes.grpo", f"policy={args.policy}", "data@chat_data=reasoning_rl_demo",
            f"chat_data.sources={sources(args)}",
            f"stage.grpo.train.seq_len={seq_len}", f"stage.grpo.train.global_batch_size={args.problems}",
            f"stage.grpo.train.train_tokens={args.steps * args.problems * seq_len}",
            f"stage.grpo.train.eval_interval={args.eval_interval}", f"stage.grpo.train.save_interval={args.steps}",
            f"stage.grpo.optimizer.lr={args.lr}", f"stage.grpo.optimizer.min_lr={args.lr}",
            f"stage.grpo.sampling.group_size={args.group_size}", f"stage.grpo.sampling.temperature={args.temperature}", f"stage.grpo.sampling.max_new_tokens={args.max_new_tokens}",
            f"stage.grpo.problem_filter.samples={args.filter_samples}", f"stage.grpo.eval_prompts={args.eval_problems}",
            f"output_dir={args.out}"]


def report(out: Path, args: argparse.Namespace, wall: float) -> str:
    evals = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "eval"]
    steps = StepMetrics.read(out / STEP_METRICS)
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [f"problems {args.problems_source}"
             + (f" (operands up to {args.max_operand})" if args.problems_source == "two_step" else "")
             + f", policy {args.policy}, {args.steps} steps x {args.problems} problems x G={args.group_size} "
             f"at T={args.temperature}, "
             f"max_new_tokens {args.max_new_tokens}, lr {args.lr}, {wall / 60:.1f} min wall",
             f"problem filter ({args.filter_samples} samples each): {manifest['problem_filter']}",
             f"held-out pass@1 (greedy, {evals[0]['problems']:.0f} problems): {evals[0]['pass_at_1']:.3f} at the start, "
             f"{evals[-1]['pass_at_1']:.3f} after step {evals[-1]['step']}; truncation rate "
             f"{evals[0]['truncation_rate']:.3f} -> {evals[-1]['truncation_rate']:.3f}",
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
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--temperature", type=float, default=1.0, help="of the G training samples (eval: greedy)")
    parser.add_argument("--filter-samples", type=int, default=4)
    parser.add_argument("--eval-problems", type=int, default=48)
    parser.add_argument("--eval-interval", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_grpo"))
    parser.add_argument("--problems-source", choices=("two_step", "reasoning_math"), default="two_step")
    parser.add_argument("--max-operand", type=int, default=99, help="two_step's difficulty knob")
    parser.add_argument("--count", type=int, default=3000, help="two_step problems written (5%% held out)")
    parser.add_argument("--seed", type=int, default=0, help="two_step's generator seed")
    parser.add_argument("--write-problems", type=Path, help="only write the two_step JSONL here (for SFT) and exit")
    args = parser.parse_args()
    if args.write_problems:
        print(write_problems(args.write_problems, args))
        return
    started = time.monotonic()
    subprocess.run(command(args), check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    print(report(args.out, args, time.monotonic() - started))


if __name__ == "__main__":
    main()
