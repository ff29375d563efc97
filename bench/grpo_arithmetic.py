"""GRPO evidence on generated math: held-out pass@1 (greedy) of a policy before, during and after a short GRPO run,
with the truncation rate, rewarded by the math reward (math-verify on the final answer; ``rl/rewards/math.py``).

The policy is any model source (default: the parent, SmolLM2-135M-Instruct; a demo child after reasoning SFT is the
paper's starting point). The problems (``--problems-source``):
- ``two_step`` (default): ``a + b`` / ``a - b`` with operands up to ``--max-operand`` (the difficulty knob), worked
  the way a small model can follow (``--worked``: the second operand split into tens and ones, one exact line per
  partial result; or the tens added ten at a time and the ones counted one at a time), then ``Answer: <value>``;
  ``--direct-fraction`` of the traces are instead one line ``a + b = c`` (a short chain of thought beside the long
  one, as in the paper's reasoning SFT; the report splits pass@1 by the style of each response). Written by
  ``easy_arithmetic`` (seeded, deterministic) to a JSONL of chat records with ``meta`` for the math reward, with a
  short system message in every record (GRPO renders prompts as they are, so the SFT run on the same file must not
  add its own: ``stage.sft_kd.system_prompt=null``);
- ``reasoning_math``: ``builtin:reasoning_math`` (word problems, linear equations, unit conversions): a demo child
  solves ~none of them, so every group has zero advantage and GRPO has nothing to learn from.
The held-out tail of the source (``--heldout-fraction``, 0.05) is never trained on, by SFT or GRPO: the SFT run
must use the same fraction. The run is ``recipes.grpo`` as a user runs it (``stage.sft_kd.system_prompt=null``:
the records carry their own system message, and so did the SFT run's), in a subprocess, its math reward wrapped
by ``GradedLog`` so that every graded response's verdict and format land in ``graded.jsonl``; the script then
prints the eval curve (held-out pass@1 with its binomial standard error, the share of responses with a well-formed
final answer and the pass rate among those: how much of a rise is format, how much correctness), the paired
first-vs-last change per held-out problem (McNemar's b, c and z) and the step means as a markdown block for
bench/RESULTS.md. Not part of the test suite (tens of minutes on CPU).

    python bench/grpo_arithmetic.py --write-problems runs/bench_grpo_data/two_step.jsonl   # the file for SFT
    python bench/grpo_arithmetic.py [--policy embedded:smollm2] [--steps 16] [--max-new-tokens 64]
                                    [--out runs/bench_grpo]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from nemo_plugins.data.thinking import split_thinking
from nemo_plugins.generation.tools import format_exact
from nemo_plugins.rl.grpo import STEP_METRICS
from nemo_plugins.rl.online_stage import StepMetrics
from nemo_plugins.rl.rewards import MathRewardSettings, RewardSettings, build_rewards
from nemo_plugins.rl.rewards.math import well_formed
from nemo_plugins.train.metrics import MetricsLog

SYSTEM = "Work the sum out step by step, then give the final answer on a last line 'Answer: <value>'."


def easy_arithmetic(count: int, seed: int, max_operand: int, worked: str = "split",
                    direct_fraction: float = 0.0) -> list[dict]:
    """``count`` distinct problems ``a + b`` or ``a - b`` (1 <= a, b <= max_operand) as chat records with content
    ``Answer: <value>`` and meta for the math reward. The thinking is a short or a long chain of thought, as in the
    paper's reasoning SFT mix: a ``direct_fraction`` of the records state the result in one line (``a + b = c``); the
    others work it out (``worked``):
    - ``split``: b split into tens and ones, one exact line per partial result;
    - ``counted``: b split likewise, then the tens added ten at a time and the ones counted one at a time, each
      count numbered (``1: 38``), so every line is a successor step a small model can follow.
    Deterministic by (seed, max_operand); the style of each record has its own seeded draw, so the problems (and a
    held-out tail) are the same whatever the styles."""
    if count > 2 * max_operand ** 2:
        raise SystemExit(f"--count {count}: operands up to {max_operand} give only {2 * max_operand ** 2} problems")
    rng = random.Random(f"easy_arithmetic/{seed}/{max_operand}")
    styles = random.Random(f"easy_arithmetic/styles/{seed}/{max_operand}")
    records, seen = [], set()
    while len(records) < count:
        a, b, sign = rng.randint(1, max_operand), rng.randint(1, max_operand), rng.choice("+-")
        if (a, b, sign) in seen:
            continue
        seen.add((a, b, sign))
        answer = format_exact(a + b if sign == "+" else a - b)
        direct = styles.random() < direct_fraction
        lines = [f"{a} {sign} {b} = {answer}"] if direct else WORKED[worked](a, b, sign)
        records.append({"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"What is {a} {sign} {b}?"},
                                     {"role": "assistant", "thinking": "\n".join(lines),
                                      "content": f"Answer: {answer}"}],
                        "meta": {"reward": "math", "answer": answer, "source": "easy_arithmetic"}})
    return records


def _parts_line(b: int) -> str:
    tens, ones = b - b % 10, b % 10
    return f"{b} = {tens} + {ones}" if tens and ones else f"{b} is a single part"


def _split_lines(a: int, b: int, sign: str) -> list[str]:
    tens, ones = b - b % 10, b % 10
    step = (lambda x, y: x + y) if sign == "+" else (lambda x, y: x - y)
    middle = step(a, tens)
    lines = [_parts_line(b)] + ([f"{a} {sign} {tens} = {middle}"] if tens else [])
    return lines + ([f"{middle} {sign} {ones} = {step(middle, ones)}"] if ones else [])


def _counted_lines(a: int, b: int, sign: str) -> list[str]:
    tens, ones = b - b % 10, b % 10
    unit = 1 if sign == "+" else -1
    lines, value = [_parts_line(b)], a
    for _ in range(tens // 10):
        lines.append(f"{value} {sign} 10 = {value + 10 * unit}")
        value += 10 * unit
    if ones:
        lines.append(f"{value} {sign} {ones}:")
        for count in range(1, ones + 1):
            value += unit
            lines.append(f"{count}: {value}")
    return lines


WORKED = {"split": _split_lines, "counted": _counted_lines}


def direct_style(question: str, response: str) -> bool:
    """Whether a response's thinking opens with the question's sum and its result (the short chain of thought)."""
    expression = question.removeprefix("What is ").removesuffix("?")
    thinking, _ = split_thinking(response)
    return thinking is not None and thinking.startswith(f"{expression} =")


def solved_at(format_weight: float) -> float:
    """The least reward of a correct answer, (1 - w) x 1 + w x 0: above every wrong answer's (at most w) for w < 0.5,
    so pass@1 counts correct answers whatever their format."""
    return 1.0 - format_weight


class GradedLog:
    """The stage's math reward (``format_weight``: its share for a well-formed response), and one JSON line per
    graded response (question, response, reward, correct, well-formed: a closed think block then an ``Answer:``
    line) appended to ``log``: the bench splits a pass@1 change into format and correctness from it, and shows what
    the last evaluation's rewards were paid for. A response is correct when its reward is at least ``solved_at(w)``
    (the stage's pass@1 threshold too)."""

    def __init__(self, log: str, format_weight: float = 0.0):
        self.log, self.solved_at = Path(log), solved_at(format_weight)
        self.math = build_rewards(RewardSettings(math=MathRewardSettings(format_weight=format_weight)), None)

    def __call__(self, items) -> list[float]:
        rewards = self.math(items)
        with self.log.open("a") as f:
            for item, reward in zip(items, rewards):
                f.write(json.dumps({"question": item.messages[-1]["content"], "response": item.response,
                                    "reward": reward, "correct": reward >= self.solved_at,
                                    "well_formed": well_formed(item.response)}) + "\n")
        return rewards


def write_problems(path: Path, args: argparse.Namespace) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = easy_arithmetic(args.count, args.seed, args.max_operand, args.worked, args.direct_fraction)
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
            f"stage.grpo.optimizer.warmup_fraction={args.warmup_fraction}",
            f"chat_data.heldout_fraction={args.heldout_fraction}",
            "stage.sft_kd.system_prompt=null",
            f"rewards={{_target_: bench.grpo_arithmetic.GradedLog, log: '{graded_log(args).resolve()}', "
            f"format_weight: {args.format_weight}}}",
            f"stage.grpo.solved_at={solved_at(args.format_weight)}",
            f"stage.grpo.sampling.group_size={args.group_size}",
            f"stage.grpo.sampling.temperature={args.temperature}",
            f"stage.grpo.sampling.max_new_tokens={args.max_new_tokens}",
            f"stage.grpo.sampling.max_batch_size={args.max_batch_size}",
            f"stage.grpo.problem_filter.samples={args.filter_samples}", f"stage.grpo.eval_prompts={args.eval_problems}",
            f"stage.grpo.loss.kl_beta={args.kl_beta}", f"stage.grpo.train.seed={args.train_seed}",
            f"dtype={args.dtype}", f"output_dir={args.out}"]


def graded_log(args: argparse.Namespace) -> Path:
    return args.out.parent / f"{args.out.name}_graded.jsonl"


def heldout_questions(args: argparse.Namespace) -> set[str]:
    """The user turns of the source's held-out tail (the chat mix holds out its last ``heldout_fraction``)."""
    path = args.out.parent / f"{args.out.name}_data" / "two_step.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["messages"][-2]["content"] for r in records[int(len(records) * (1.0 - args.heldout_fraction)):]}


def graded_lines(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The graded log's lines in order, split into (held-out ones, training ones)."""
    heldout = heldout_questions(args)
    lines = [json.loads(line) for line in graded_log(args).read_text().splitlines()]
    return [r for r in lines if r["question"] in heldout], [r for r in lines if r["question"] not in heldout]


def heldout_verdicts(args: argparse.Namespace, lines: list[dict], evaluations: int, problems: int) -> list[dict]:
    """The held-out lines, checked to be the evaluations' (each grades the same ``problems`` problems once)."""
    if len(lines) != evaluations * problems:
        raise SystemExit(f"{graded_log(args)}: {len(lines)} held-out verdicts for {evaluations} x {problems}")
    return lines


def eval_formats(lines: list[dict], evaluations: int, problems: int) -> list[tuple[float, float]]:
    """Per evaluation, (share of well-formed responses, pass rate among those)."""
    shares = []
    for i in range(evaluations):
        chunk = lines[i * problems : (i + 1) * problems]
        formed = [r for r in chunk if r["well_formed"]]
        shares.append((len(formed) / problems, sum(r["correct"] for r in formed) / max(len(formed), 1)))
    return shares


def style_split(lines: list[dict]) -> tuple[float, float, float]:
    """(share of direct responses, pass rate among direct ones, pass rate among the others): how much of a pass@1
    change is a change of style, how much is a change within a style."""
    styled = [(direct_style(r["question"], r["response"]), r["correct"]) for r in lines]
    direct = [correct for is_direct, correct in styled if is_direct]
    worked = [correct for is_direct, correct in styled if not is_direct]
    return (len(direct) / max(len(lines), 1), sum(direct) / len(direct) if direct else math.nan,
            sum(worked) / len(worked) if worked else math.nan)


def train_chunks(args: argparse.Namespace, lines: list[dict]) -> list[list[dict]]:
    """The graded log's training lines per step (problems x G each), or none if they are not exactly that (a
    problem filter's or a resumed run's extra lines)."""
    size = args.problems * args.group_size
    if args.filter_samples or len(lines) != args.steps * size:
        return []
    return [lines[i * size : (i + 1) * size] for i in range(args.steps)]


def paired_change(lines: list[dict], problems: int) -> tuple[int, int, float]:
    """The first and last evaluations grade the same held-out problems greedily, so their difference is read per
    problem (McNemar): (solved only at the end, solved only at the start, z = (b - c) / sqrt(b + c))."""
    first = {r["question"]: r["correct"] for r in lines[:problems]}
    last = {r["question"]: r["correct"] for r in lines[-problems:]}
    gained = sum(last[q] and not first[q] for q in first)
    lost = sum(first[q] and not last[q] for q in first)
    return gained, lost, (gained - lost) / math.sqrt(gained + lost) if gained + lost else 0.0


def report(out: Path, args: argparse.Namespace, wall: float) -> str:
    evals = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "eval"]
    n = int(evals[0]["problems"])
    if args.problems_source == "two_step":
        heldout_lines, train_lines = graded_lines(args)
        verdicts = heldout_verdicts(args, heldout_lines, len(evals), n)
        formats = eval_formats(verdicts, len(evals), n)
        styles = [style_split(verdicts[i * n : (i + 1) * n]) for i in range(len(evals))]
        train_styles = [style_split(chunk) for chunk in train_chunks(args, train_lines)]
        last = verdicts[-n:][:3]  # read what the last evaluation paid for (a reward can be gamed)
        gained, lost, z = paired_change(verdicts, n)
        paired = (f"paired, first vs last evaluation: {gained} problems solved only after, {lost} only before, "
                  f"McNemar z = {z:.2f}")
    else:
        formats, last, paired = [(math.nan, math.nan)] * len(evals), [], "paired change: two_step only"
        styles, train_styles = [(math.nan, math.nan, math.nan)] * len(evals), []

    def se(p: float) -> float:
        return math.sqrt(p * (1 - p) / n)

    steps = StepMetrics.read(out / STEP_METRICS)
    manifest = json.loads((out / "manifest.json").read_text())
    lines = [f"problems {args.problems_source}"
             + (f" (operands up to {args.max_operand}, SFT traces {args.direct_fraction:g} direct, the others "
                f"{args.worked})" if args.problems_source == "two_step" else "")
             + f", policy {args.policy}, {args.steps} steps x {args.problems} problems x G={args.group_size} "
             f"at T={args.temperature}, "
             f"max_new_tokens {args.max_new_tokens}, lr {args.lr}, KL beta {args.kl_beta}, "
             f"format weight {args.format_weight}, {args.dtype}, "
             f"train seed {args.train_seed}, {wall / 60:.1f} min wall",
             f"problem filter ({args.filter_samples} samples each): {manifest['problem_filter']}",
             f"held-out pass@1 (greedy, {n} problems): {evals[0]['pass_at_1']:.3f} +- {se(evals[0]['pass_at_1']):.3f} "
             f"at the start, {evals[-1]['pass_at_1']:.3f} +- {se(evals[-1]['pass_at_1']):.3f} after step "
             f"{evals[-1]['step']} (binomial SE); well-formed answers {formats[0][0]:.3f} -> {formats[-1][0]:.3f}, "
             f"pass rate among them {formats[0][1]:.3f} -> {formats[-1][1]:.3f}; truncation rate "
             f"{evals[0]['truncation_rate']:.3f} -> {evals[-1]['truncation_rate']:.3f}",
             paired,
             "",
             "| step | held-out pass@1 (SE) | well-formed | pass among well-formed | "
             "truncation rate | response tokens | direct share | pass: direct / worked |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['pass_at_1']:.3f} ({se(r['pass_at_1']):.3f}) | {shape:.3f} | {solved:.3f} | "
              f"{r['truncation_rate']:.3f} | {r['response_tokens']:.1f} | {share:.3f} | "
              f"{direct:.3f} / {worked:.3f} |"
              for r, (shape, solved), (share, direct, worked) in zip(evals, formats, styles)]
    train_styles = train_styles or [(math.nan, math.nan, math.nan)] * len(steps)
    lines += ["", "| step | train reward | pass rate | kept groups | zero-adv. groups | truncation | clip fraction | "
              "direct share | pass: direct / worked |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['step']} | {r['reward']:.3f} | {r['pass_rate']:.3f} | {r['kept_groups']:.0f} | "
              f"{r['zero_advantage_groups']:.0f} | {r['truncation_rate']:.3f} | {r['clip_fraction']:.2e} | "
              f"{share:.3f} | {direct:.3f} / {worked:.3f} |"
              for r, (share, direct, worked) in zip(steps, train_styles)]
    lines += ["", f"The last evaluation's first {len(last)} held-out responses:"]
    lines += [f"- {r['question']} -> {json.dumps(r['response'])} (reward {r['reward']:g})" for r in last]
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
    parser.add_argument("--warmup-fraction", type=float, default=0.0)
    parser.add_argument("--heldout-fraction", type=float, default=0.05, help="the SFT run's chat_data.heldout_fraction")
    parser.add_argument("--filter-samples", type=int, default=4)
    parser.add_argument("--kl-beta", type=float, default=0.0, help="k3 KL to the starting policy (0: off)")
    parser.add_argument("--format-weight", type=float, default=0.0,
                        help="the math reward's share for a well-formed response (closed think block, answer line)")
    parser.add_argument("--eval-problems", type=int, default=48)
    parser.add_argument("--eval-interval", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_grpo"))
    parser.add_argument("--problems-source", choices=("two_step", "reasoning_math"), default="two_step")
    parser.add_argument("--max-operand", type=int, default=99, help="two_step's difficulty knob")
    parser.add_argument("--count", type=int, default=3000, help="two_step problems written (5%% held out)")
    parser.add_argument("--seed", type=int, default=0, help="two_step's generator seed")
    parser.add_argument("--worked", choices=tuple(WORKED), default="split",
                        help="two_step's long chain of thought: tens and ones (split) or counted one at a time")
    parser.add_argument("--direct-fraction", type=float, default=0.0,
                        help="two_step: share of SFT traces stating the result in one line (short chain of thought)")
    parser.add_argument("--train-seed", type=int, default=1234,
                        help="GRPO's stage.grpo.train.seed: the training samples' seeds derive from it")
    parser.add_argument("--max-batch-size", type=int, default=32,
                        help="requests decoded together (the stage's sampling.max_batch_size; larger is faster on CPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the policy's weights and compute (bfloat16: fp32 main weights in megatron's optimizer; "
                             "the faster one on CPUs with AVX512-BF16: bench/RESULTS.md)")
    parser.add_argument("--write-problems", type=Path, help="only write the two_step JSONL here (for SFT) and exit")
    args = parser.parse_args()
    if not 0.0 <= args.format_weight < 0.5:
        parser.error(f"--format-weight {args.format_weight}: must be in [0, 0.5), or a wrong well-formed answer "
                     "(reward w) would count as solved (a correct one earns at least 1 - w)")
    if not 0.0 <= args.direct_fraction <= 1.0:
        parser.error(f"--direct-fraction {args.direct_fraction}: a share of the traces, in [0, 1]")
    if args.write_problems:
        print(write_problems(args.write_problems, args))
        return
    if graded_log(args).exists():
        raise SystemExit(f"--out {args.out}: {graded_log(args)} holds an earlier run's verdicts; move it away or "
                         "choose another --out (nothing was deleted)")
    started = time.monotonic()
    subprocess.run(command(args), check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    print(report(args.out, args, time.monotonic() - started))


if __name__ == "__main__":
    main()
