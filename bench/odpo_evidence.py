"""End-to-end evidence for issue 15: a calibrated PWRM judging a short online-DPO run of the real SmolLM2 parent.

    python bench/odpo_evidence.py --pwrm-from runs/pwrm/pwrm --out runs/odpo_evidence [--steps 6] [--lr 2e-5]

1. The PWRM: a finished or interrupted ``recipes.pwrm`` stage directory (``--pwrm-from``: the demo pairs, trained
   from the parent) is copied to ``<out>/pwrm`` without its manifest and completed there by ``run_pwrm_stage``:
   it resumes at its last checkpoint, so nothing is retrained, and calibrates with the current calibration
   (held-out accuracy, tau, NLL / ECE before and after, ``reliability.png``).
2. Online DPO of the parent (policy and frozen reference) on held-out-disjoint arithmetic prompts of the chat mix,
   judged by that PWRM (``load_judge``), a few small steps.
3. Checkable properties of the responses to the held-out prompts, start model vs trained policy (the same prompts
   and sampling seeds as the stage's win-rate evaluation): the rate of responses that end their turn within
   ``max_new_tokens`` (the PWRM's "loops" pairs prefer a clean end) and of those ending with an
   ``Answer: <value>`` line (its "format" and "arithmetic" pairs), with the win rate against the start model and
   the loop rate from the stage's own evaluation. Prints a markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_plugins import cpu_compat
from nemo_plugins.config.build import build
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.mix import Cursor, SourceSpec
from nemo_plugins.data.pairwise import final_answer, read_pairs
from nemo_plugins.distributed import ParallelConfig, initialize, shutdown
from nemo_plugins.logs import setup_logging
from nemo_plugins.rl.odpo import ODPOStage, loops, run_odpo_stage, sample_pairs
from nemo_plugins.rl.pwrm import PWRMStage, load_judge, run_pwrm_stage

CONF = Path(__file__).resolve().parents[1] / "conf"


def finish_pwrm(previous: Path, out: Path) -> dict:
    """``previous``'s PWRM copied to ``out`` (without its manifest) and completed: re-scored and calibrated."""
    record = json.loads((previous / "manifest.json").read_text())
    if not (out / "manifest.json").is_file():
        shutil.copytree(previous, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json", ".lock"))
    stage = build(PWRMStage, record["config"], "pwrm manifest config")
    source = ModelSource.parse(record["source"])
    pairs = read_pairs(Path(record["pair_data"]["file"]))
    cpu_compat.install()
    initialize(ParallelConfig(), stage.train.seed)
    chat_format = load_chat_format(record["chat_format"], tokenizer_dir(source))
    return run_pwrm_stage(stage, source, pairs, chat_format, record["chat_format"], tokenizer_dir(source), out,
                          ParallelConfig(), manifest_extra={"pair_data": record["pair_data"]}, resume_with_changes=True)


def odpo_stage(args: argparse.Namespace) -> ODPOStage:
    node = OmegaConf.load(CONF / "stage" / "odpo.yaml")
    seq_len = args.max_prompt_tokens + args.max_new_tokens
    node.merge_with({"train": {"precision": "float32", "seq_len": seq_len, "global_batch_size": args.prompts_per_step,
                               "micro_batch_size": 1,
                               "train_tokens": seq_len * args.prompts_per_step * args.steps, "save_interval": 0},
                     "optimizer": {"lr": args.lr, "min_lr": args.lr, "warmup_fraction": 0.0, "decay_style": "constant"},
                     "sampling": {"max_new_tokens": args.max_new_tokens, "max_batch_size": 2 * args.prompts_per_step,
                                  "truncation_is_loop": args.truncation_is_loop},
                     "eval_prompts": args.eval_prompts})
    return build(ODPOStage, node, "stage.odpo")


def properties(model: torch.nn.Module, prompts, stage: ODPOStage, chat_format) -> dict:
    """Rates over the held-out prompts' responses, sampled as the stage's win-rate evaluation samples them."""
    seeds = [stage.train.seed + 2 * i for i in range(len(prompts))]
    pairs = sample_pairs(model, prompts, seeds, chat_format, stage.sampling, stage.train.seq_len)
    responses = [p.a for p in pairs if p]
    texts = [chat_format.decode(r.token_ids) for r in responses]
    ends = [chat_format.end_of_turn_id in r.token_ids for r in responses]
    return {"responses": len(responses), "ends_turn": sum(ends) / len(responses),
            "answer_line": sum(final_answer(t) is not None for t in texts) / len(responses),
            "loop_rate": sum(loops(r, stage.sampling) for r in responses) / len(responses),
            "tokens": sum(len(r.token_ids) for r in responses) / len(responses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pwrm-from", type=Path, required=True, help="a recipes.pwrm stage directory")
    parser.add_argument("--out", type=Path, default=Path("runs/odpo_evidence"))
    parser.add_argument("--policy", default="embedded:smollm2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-prompt-tokens", type=int, default=160)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-5)
    # off by default here: at a CPU-sized max_new_tokens most of the parent's answers are cut (measured: 15 of 16),
    # and with truncation as a loop nearly every pair is dropped; off, the PWRM judges the cut answers
    parser.add_argument("--truncation-is-loop", action="store_true")
    parser.add_argument("--chat-cache", type=Path, default=Path.home() / ".cache" / "cascade" / "chat")
    args = parser.parse_args()
    setup_logging()
    started = time.monotonic()
    pwrm = finish_pwrm(args.pwrm_from, args.out / "pwrm")
    pwrm_seconds = time.monotonic() - started

    policy = ModelSource.parse(args.policy)
    stage = odpo_stage(args)
    cpu_compat.install()
    initialize(ParallelConfig(), stage.train.seed)
    chat_format = load_chat_format("hf_template", tokenizer_dir(policy))
    arithmetic = [SourceSpec("arithmetic", ["builtin:arithmetic?count=2000"], 1.0)]
    chat = build_chat_mix(chat_format, arithmetic, args.chat_cache, 0.05)
    manifest_path = str(args.out / "pwrm" / "manifest.json")
    odpo = run_odpo_stage(stage, policy, policy, {"pwrm": pwrm["checkpoint"], "tau": pwrm["calibration"]["tau"]},
                          lambda: load_judge(manifest_path, str(policy)), chat, chat_format,
                          tokenizer_dir(policy), tokenizer_dir(policy), Cursor(), args.out / "odpo", ParallelConfig(),
                          resume_with_changes=True)
    prompts = ChatPrompts(chat, stage.train.seed, Cursor(), stage.train.global_batch_size).heldout(stage.eval_prompts)
    rates = {}
    for name, source in (("start", policy), ("after ODPO", ModelSource("megatron", odpo["checkpoint"]))):
        _, model = load_model(source, ParallelConfig())
        rates[name] = properties(model, prompts, stage, chat_format)
        del model
    cal, held = pwrm["calibration"], pwrm["heldout"]["after"]
    lines = [f"PWRM ({pwrm['source']}, {pwrm['steps']} steps): held-out accuracy {held['accuracy']:.3f}, "
             f"position bias {held['position_bias']:.3f}; tau {cal['tau']:.4g} fitted on {cal['fit_pairs']} pairs, "
             f"on {cal['test_pairs']} others: NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}, "
             f"ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f} ({pwrm_seconds:.0f} s)", "",
             f"Online DPO of `{policy}`: {odpo['steps']} steps x {stage.train.global_batch_size} prompts, "
             f"lr {args.lr:g}, beta {stage.dpo.beta:g} ({stage.dpo.beta_rescale}), "
             f"max_new_tokens {args.max_new_tokens}; {odpo['wall_seconds']:.0f} s; "
             f"step means: mean abs(p - 0.5) {odpo['step_means'].get('label_confidence', 0):.3f}, "
             f"drop rate {odpo['step_means'].get('drop_rate', 0):.3f}", "",
             f"| on {len(prompts)} held-out prompts | win rate vs start (PWRM) | ends its turn | 'Answer:' line | "
             "loop rate | response tokens |", "|---|---:|---:|---:|---:|---:|"]
    for name, eval_record in (("start", odpo["eval_start"]), ("after ODPO", odpo["eval"])):
        r = rates[name]
        lines.append(f"| {name} | {eval_record['win_rate']:.3f} | {r['ends_turn']:.3f} | {r['answer_line']:.3f} | "
                     f"{eval_record['loop_rate']:.3f} | {r['tokens']:.1f} |")
    lines.append(f"\nTotal {time.monotonic() - started:.0f} s.")
    print("\n".join(lines))
    (args.out / "evidence.md").write_text("\n".join(lines) + "\n")
    shutdown()


if __name__ == "__main__":
    main()
