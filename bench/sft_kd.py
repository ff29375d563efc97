"""Evidence run of SFT with logit distillation: a longer `recipes.sft` on a demo child's long-context base, and
the held-out assistant-token KL / perplexity of the student before and after, next to the teacher's.

    python bench/sft_kd.py --student runs/demo/child_14b_like/distill_long/checkpoints/step_00000002 \\
        [--tokens 65536] [--out runs/bench_sft_kd]

The teacher is the parent (SmolLM2-135M-Instruct), the data the demo chat mix (conf/data/instruct_demo.yaml).
Prints one Markdown table row per evaluation of the run (step 0 is the student before SFT).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nemo_plugins.train.metrics import MetricsLog

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="a megatron checkpoint directory (the long-context base)")
    parser.add_argument("--tokens", type=int, default=65536, help="training tokens (rows x seq_len)")
    parser.add_argument("--eval-interval", type=int, default=8, help="steps between held-out evaluations")
    parser.add_argument("--eval-rows", type=int, default=2, help="held-out rows per chat source at each evaluation")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_sft_kd"))
    args = parser.parse_args()
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "recipes.sft", f"student=megatron:{args.student}",
                    f"stage.sft_kd.train.train_tokens={args.tokens}",
                    f"stage.sft_kd.train.eval_interval={args.eval_interval}",
                    f"stage.sft_kd.train.eval_rows_per_source={args.eval_rows}", f"output_dir={args.out}"],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    manifest = json.loads((Path(args.out) / "manifest.json").read_text())
    evals = [r for r in MetricsLog.read(Path(args.out) / "metrics.jsonl") if r["kind"] == "eval"]
    print(f"SFT-KD of {args.student}: {manifest['tokens']:,} conversation tokens, {manifest['steps']} steps, "
          f"{time.monotonic() - started:.0f} s wall; held-out: {evals[0]['tokens']:,} assistant tokens")
    print("| step | assistant-token KL | student perplexity | teacher perplexity |")
    print("|---:|---:|---:|---:|")
    for r in evals:
        print(f"| {r['step']} | {r['kl']:.4f} | {r['student_ppl']:.2f} | {r['teacher_ppl']:.2f} |")
    print(f"KL after / before: {evals[-1]['kl'] / evals[0]['kl']:.3f}")


if __name__ == "__main__":
    main()
