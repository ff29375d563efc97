"""The run report: Markdown + PNGs under ``<run>/report.md``, built only from the stages' manifests and metrics
(and the parent's config, for the parameter fractions)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nemo_plugins.cascade.plan import REASONING_DIRS  # noqa: E402
from nemo_plugins.model.config import MistralConfig  # noqa: E402
from nemo_plugins.rl.online_stage import StepMetrics  # noqa: E402
from nemo_plugins.train.metrics import MetricsLog  # noqa: E402

PRUNE_PLOTS = ("layer_scores.png", "pca_explained.png", "ffn_scores.png")
# what a post-training stage's cursor counts
POSTTRAIN_READ = {"sft_kd": "chat tokens", "pwrm": "pair orderings",
                  "odpo": "chat tokens (of the prompts' conversations)",
                  "reasoning_sft": "reasoning chat tokens", "grpo_stem": "problem tokens",
                  "grpo_general": "problem tokens", "odpo_reasoning": "problem tokens"}
GRPO_STEP_METRICS = "grpo_metrics.jsonl"  # rl/grpo.py's per-step metrics (not imported: it loads megatron)


def _curves(child: str, stages: dict, out_dir: Path) -> Path:
    """Training loss (the KL) per step and held-out KL at each evaluation, one panel per distillation stage."""
    names = [s for s in ("distill_short", "distill_long") if s in stages]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        records = MetricsLog.read(out_dir / child / name / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (KL)")
        ax.plot([r["step"] for r in evals], [r["kl"] for r in evals], "o--", label="held-out KL")
        ax.set(title=f"{child} / {name}", xlabel="step", ylabel="KL (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "report" / f"curves_{child}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def stage_evals(stage_dir: Path) -> tuple[dict, dict]:
    """(first, last) held-out evaluation of a distillation stage, from its metrics file."""
    evals = [r for r in MetricsLog.read(Path(stage_dir) / "metrics.jsonl") if r["kind"] == "eval"]
    return evals[0], evals[-1]


def _fmt(value: float) -> str:
    return f"{value:,.2f}"


def non_embedding_parameters(config: MistralConfig) -> int:
    """Parameters outside the input embedding and the output layer (one matrix when tied): the transformer
    itself, which is what pruning depth and width shrinks and what sets the compute per token."""
    return config.num_parameters() - config.vocab_size * config.hidden_size * (1 if config.tie_embeddings else 2)


def _parameters_section(results: dict[str, dict], parent: MistralConfig) -> list[str]:
    total, core = parent.num_parameters(), non_embedding_parameters(parent)
    lines = ["## Parameters", "", "| model | parameters | % of parent | non-embedding parameters | % of parent's |",
             "|---|---:|---:|---:|---:|", f"| parent | {total:,} | 100.0 | {core:,} | 100.0 |"]
    for child, stages in results.items():
        config = MistralConfig.from_dict(stages["prune"]["child_config"])
        n, c = config.num_parameters(), non_embedding_parameters(config)
        lines.append(f"| {child} | {n:,} | {100 * n / total:.1f} | {c:,} | {100 * c / core:.1f} |")
    return lines + [""]


def _pwrm_section(pwrm: dict, out_dir: Path) -> list[str]:
    """The shared judge: held-out accuracy and position bias before/after training, calibration, reliability plot."""
    before, after, cal = pwrm["heldout"]["before"], pwrm["heldout"]["after"], pwrm["calibration"]
    pairs = pwrm["pairs"]
    train, held = sum(k["train"] for k in pairs.values()), sum(k["heldout"] for k in pairs.values())
    sampled = sum(k["chosen_sampled"] + k["rejected_sampled"] for k in pairs.values())
    by_kind = ", ".join(f"{kind} {acc:.2f}" for kind, acc in after["accuracy_by_kind"].items())
    lines = ["## Instruct: pairwise reward model (shared by every child's online DPO)", "",
             f"Initialised from `{pwrm['source']}` ({pwrm['init']}); {train} training pairs "
             f"({pwrm['pairs_dropped_too_long']} too long, dropped), {held} held out, {sampled} responses sampled from "
             f"the policy; {pwrm['steps']} steps, {pwrm['wall_seconds']:.0f} s. Held-out pairs, both orders averaged "
             "(ties count half):", "",
             "| | before training | after training |", "|---|---:|---:|",
             f"| held-out accuracy | {before['accuracy']:.3f} | {after['accuracy']:.3f} |",
             f"| position bias (mean p(first) - 1/2) | {before['position_bias']:.3f} | {after['position_bias']:.3f} |",
             "", f"Accuracy by kind after training: {by_kind}.", "",
             f"Temperature calibration: tau = {cal['tau']:.3g} fitted on {cal['fit_pairs']} held-out pairs "
             "(on the order-averaged margin), measured "
             f"on {cal['test_pairs']} other held-out pairs:", "",
             "| | before calibration (tau = 1) | after calibration |", "|---|---:|---:|",
             f"| NLL | {cal['nll_before']:.4f} | {cal['nll_after']:.4f} |",
             f"| expected calibration error | {cal['ece_before']:.4f} | {cal['ece_after']:.4f} |", "",
             f"![reliability]({(out_dir / 'pwrm' / 'reliability.png').relative_to(out_dir)})", ""]
    return lines


def _odpo_section(results: dict[str, dict], out_dir: Path) -> list[str]:
    """Online DPO per child: win rate against its SFT model and loop rate on held-out prompts, start and end."""
    done = {child: stages["odpo"] for child, stages in results.items() if "odpo" in stages}
    if not done:
        return []
    lines = ["## Instruct: online DPO", "",
             "Held-out prompts of the chat mix; the policy's sample against its SFT model's (the frozen reference), "
             "judged by the calibrated PWRM with the loop rule (a looping response loses). At the start both are the "
             "same model, so the win rate is 0.5.", "",
             "| child | steps | prompts | win rate vs SFT (start -> end) | loop rate (start -> end) | "
             "SFT loop rate | mean margin | mean abs(p - 0.5) | train loop rate | drop rate | Hugging Face export |",
             "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for child, m in done.items():
        start, end, means = m["eval_start"] or m["eval"], m["eval"], m["step_means"]
        lines.append(f"| {child} | {m['steps']} | {end['prompts']:.0f} | "
                     f"{start['win_rate']:.3f} -> {end['win_rate']:.3f} | "
                     f"{start['loop_rate']:.3f} -> {end['loop_rate']:.3f} | {end['reference_loop_rate']:.3f} | "
                     f"{means.get('margin', float('nan')):.3f} | {means.get('label_confidence', float('nan')):.3f} | "
                     f"{means.get('loop_rate', float('nan')):.3f} | {means.get('drop_rate', float('nan')):.3f} | "
                     f"`{out_dir / child / 'instruct_odpo' / 'hf'}` |")
    return lines + [""]


def _instruct_section(results: dict[str, dict], out_dir: Path) -> list[str]:
    """SFT with logit distillation per child: held-out assistant-token KL / perplexity before and after, samples."""
    done = {child: stages["sft_kd"] for child, stages in results.items() if "sft_kd" in stages}
    if not done:
        return []
    lines = ["## Instruct: SFT with logit distillation", "",
             "Held-out conversations of the chat mix (never trained on), assistant tokens only.", "",
             "| child | teacher | tokens | KL before | KL after | ppl before | ppl after | teacher ppl | "
             "conversations dropped (too long) | Hugging Face export |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for child, m in done.items():
        first, last = stage_evals(out_dir / child / "instruct_sft")
        dropped = sum(source["dropped"] for source in m["chat_data"].values())
        kl = f"{first['kl']:.3f} | {last['kl']:.3f}" if "kl" in first else "- (plain SFT) | -"  # no teacher: no KL
        teacher_ppl = _fmt(first["teacher_ppl"]) if "teacher_ppl" in first else "-"
        lines.append(f"| {child} | `{m['teacher']}` | {m['tokens']:,} | {kl} | "
                     f"{_fmt(first['student_ppl'])} | {_fmt(last['student_ppl'])} | {teacher_ppl} | "
                     f"{dropped} | `{out_dir / child / 'instruct_sft' / 'hf'}` |")
    lines.append("")
    for child, m in done.items():
        lines += [f"### {child}: chat samples (greedy)", ""]
        for before, after in zip(m["samples"]["before"], m["samples"]["after"]):
            lines += [f"**User:** {before['prompt']}", "", "Before SFT:", "```", before["response"], "```",
                      "After SFT:", "```", after["response"], "```", ""]
    return lines


def _filter_counts(chat_data: dict) -> str:
    """Records the reasoning SFT screen dropped, per filter (summed over sources and reasons)."""
    counts: dict[str, int] = {}
    for source in chat_data.values():
        for name, reasons in source.get("filtered", {}).items():
            counts[name] = counts.get(name, 0) + sum(reasons.values())
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"


def _arrow(start: dict | None, end: dict, key: str) -> str:
    return f"{(start or end)[key]:.3f} -> {end[key]:.3f}"


def _reasoning_sft_rows(results: dict[str, dict], out_dir: Path) -> list[str]:
    lines = ["| child | traces dropped by filter | dropped (too long) | tokens | held-out loss (start -> end) | "
             "held-out ppl (start -> end) | Hugging Face export |", "|---|---|---:|---:|---|---|---|"]
    for child, stages in results.items():
        m = stages.get("reasoning_sft")
        if m is None:
            continue
        first, last = stage_evals(out_dir / child / REASONING_DIRS["reasoning_sft"])
        loss = "kl" if "kl" in first else "loss"
        dropped = sum(source["dropped"] for source in m["chat_data"].values())
        lines.append(f"| {child} | {_filter_counts(m['chat_data'])} | {dropped} | {m['tokens']:,} | "
                     f"{loss} {first[loss]:.3f} -> {last[loss]:.3f} | {_fmt(first['student_ppl'])} -> "
                     f"{_fmt(last['student_ppl'])} | `{out_dir / child / REASONING_DIRS['reasoning_sft'] / 'hf'}` |")
    return lines + [""]


def _grpo_rows(results: dict[str, dict], out_dir: Path) -> list[str]:
    lines = ["| child | stage | steps | train reward (first -> last step) | held-out pass@1 (start -> end) | "
             "held-out reward (start -> end) | truncation rate (train; held-out end) | zero-advantage groups | "
             "problems filtered out |", "|---|---|---:|---|---|---|---|---:|---|"]
    for child, stages in results.items():
        for stage in ("grpo_stem", "grpo_general"):
            m = stages.get(stage)
            if m is None:
                continue
            steps = StepMetrics.read(out_dir / child / REASONING_DIRS[stage] / GRPO_STEP_METRICS)
            zero = sum(r["zero_advantage_groups"] for r in steps)
            groups = sum(r["zero_advantage_groups"] + r["kept_groups"] for r in steps)
            screened = m.get("problem_filter")
            filtered = (f"{screened['always_solved']:.0f} always / {screened['never_solved']:.0f} never solved of "
                        f"{screened['screened']:.0f}") if screened else "off"
            lines.append(f"| {child} | {stage} | {m['steps']} | "
                         f"{steps[0]['reward']:.3f} -> {steps[-1]['reward']:.3f} | "
                         f"{_arrow(m['eval_start'], m['eval'], 'pass_at_1')} | "
                         f"{_arrow(m['eval_start'], m['eval'], 'reward')} | "
                         f"{m['step_means'].get('truncation_rate', float('nan')):.3f}; "
                         f"{m['eval']['truncation_rate']:.3f} | "
                         f"{zero:.0f} of {groups:.0f} | {filtered} |")
    return lines + [""]


def _reasoning_section(results: dict[str, dict], out_dir: Path) -> list[str]:
    """The Reasoning branch per child: SFT filter counts and held-out loss, GRPO rewards / pass@1 / truncation,
    the reasoning online DPO's win rate against its GRPO model."""
    if not any("reasoning_sft" in stages for stages in results.values()):
        return []
    lines = ["## Reasoning: SFT on chain-of-thought traces", "",
             "Traces the stage's filters dropped when the mix was rendered (per filter), and the held-out assistant "
             "tokens (never trained on) before and after.", ""]
    lines += _reasoning_sft_rows(results, out_dir)
    lines += ["## Reasoning: GRPO (STEM, then General)", "",
              "Train reward: the mean reward of the step's G samples per problem; held-out pass@1: one answer per "
              "held-out problem at the evaluation temperature, graded by the same rewards; a zero-advantage group "
              "(all rewards equal) has no signal and is dropped.", ""]
    lines += _grpo_rows(results, out_dir)
    lines += ["## Reasoning: online DPO (thinking stripped before the PWRM judges)", "",
              "| child | steps | win rate vs GRPO model (start -> end) | loop rate (start -> end) | drop rate | "
              "Hugging Face export |", "|---|---:|---|---|---:|---|"]
    for child, stages in results.items():
        m = stages.get("odpo_reasoning")
        if m is not None:
            lines.append(f"| {child} | {m['steps']} | {_arrow(m['eval_start'], m['eval'], 'win_rate')} | "
                         f"{_arrow(m['eval_start'], m['eval'], 'loop_rate')} | "
                         f"{m['step_means'].get('drop_rate', float('nan')):.3f} | "
                         f"`{out_dir / child / REASONING_DIRS['odpo_reasoning'] / 'hf'}` |")
    return lines + [""]


def _sources(record: dict) -> list[str]:
    """The mix's sources an evaluation record has figures for (``<source>/student_ppl``), in its order."""
    return [key[: -len("/student_ppl")] for key in record if key.endswith("/student_ppl")]


def _per_source_section(results: dict[str, dict], out_dir: Path) -> list[str]:
    """Held-out perplexity and KL per source of the mix (each source's own held-out split): code and prose move
    differently under distillation, which the pooled table hides. Empty for runs evaluated before per-source
    figures existed."""
    lines = ["### Held-out perplexity per source", "",
             "Each source's own held-out split at the stage's context; KL(teacher || student) in nats per token.", "",
             "| model | source | tokens | after prune | after distill_short | KL (start -> end) | after distill_long |",
             "|---|---|---:|---:|---:|---|---:|"]
    parent: dict[str, tuple[float, float | None]] = {}
    for child, stages in results.items():
        if "distill_short" not in stages:
            continue
        first, last = stage_evals(out_dir / child / "distill_short")
        long_last = stage_evals(out_dir / child / "distill_long")[1] if "distill_long" in stages else {}
        for source in _sources(first):
            key = f"{source}/student_ppl"
            long_ppl = _fmt(long_last[key]) if key in long_last else "-"
            lines.append(f"| {child} | {source} | {first[f'{source}/tokens']:,} | "
                         f"{_fmt(first[key])} | {_fmt(last[key])} | "
                         f"{first[f'{source}/kl']:.3f} -> {last[f'{source}/kl']:.3f} | {long_ppl} |")
            parent[source] = (first[f"{source}/teacher_ppl"], long_last.get(f"{source}/teacher_ppl"))
    if not parent:
        return []
    for source, (short, long) in parent.items():
        lines.append(f"| parent (teacher) | {source} | | {_fmt(short)} | {_fmt(short)} | | "
                     f"{_fmt(long) if long is not None else '-'} |")
    return lines + [""]


def write_report(results: dict[str, dict], out_dir: Path, parent: MistralConfig, name: str,
                 ablation_tables: list[str] | None = None, parent_long_context: dict | None = None) -> Path:
    out_dir = Path(out_dir)
    lines = [f"# Cascade report: {name}", ""]
    first_child = next(iter(results.values()), {})
    short_seq = first_child.get("distill_short", {}).get("config", {}).get("train", {}).get("seq_len", "?")
    long_seq = first_child.get("distill_long", {}).get("config", {}).get("train", {}).get("seq_len", "?")

    lines += _parameters_section(results, parent)
    lines += ["## Held-out perplexity", "",
              f"Held-out split of the data mix (never trained on). Prune / short columns at {short_seq} tokens of "
              f"context, long columns at {long_seq}.", "",
              "| model | after prune | after distill_short | long stage start | after distill_long |",
              "|---|---:|---:|---:|---:|"]
    teacher_short = teacher_long = None
    for child, stages in results.items():
        row = [child, "-", "-", "-", "-"]
        if "distill_short" in stages:
            first, last = stage_evals(out_dir / child / "distill_short")
            row[1], row[2] = _fmt(first["student_ppl"]), _fmt(last["student_ppl"])
            teacher_short = first["teacher_ppl"]
        if "distill_long" in stages:
            first, last = stage_evals(out_dir / child / "distill_long")
            row[3], row[4] = _fmt(first["student_ppl"]), _fmt(last["student_ppl"])
            teacher_long = first["teacher_ppl"]
        lines.append("| " + " | ".join(row) + " |")
    if teacher_short is not None:
        lines.append(f"| parent (teacher) | {_fmt(teacher_short)} | {_fmt(teacher_short)} | "
                     f"{_fmt(teacher_long) if teacher_long else '-'} | {_fmt(teacher_long) if teacher_long else '-'} |")
    lines += ["", "Perplexity right after pruning, also on the prune stage's own evaluation text:", "",
              "| child | input model | child after prune |", "|---|---:|---:|"]
    for child, stages in results.items():
        ppl = stages["prune"]["perplexity"]
        lines.append(f"| {child} | {_fmt(ppl['parent']['perplexity'])} | {_fmt(ppl['child']['perplexity'])} |")
    lines += [""] + _per_source_section(results, out_dir)

    lines += ["", "## Tokens, compute and wall time per stage", "",
              "FLOPs: 6 x student parameters x tokens (training) + 2 x teacher parameters x tokens "
              "(teacher forward).", "",
              "| child | stage | tokens read (range) | steps | FLOPs | wall time (s) |",
              "|---|---|---|---:|---:|---:|"]
    for child, stages in results.items():
        prune = stages["prune"]
        lines.append(f"| {child} | prune | calibration only | - | - | {prune['wall_seconds']:.0f} |")
        for stage in ("distill_short", "distill_long"):
            if stage in stages:
                m = stages[stage]
                start, end = m["cursor_start"]["offsets"], m["cursor_end"]["offsets"]
                ranges = ", ".join(f"{k} [{start.get(k, 0):,}, {v:,})" for k, v in sorted(end.items()))
                lines.append(f"| {child} | {stage} | {m['tokens']:,}: {ranges} | {m['steps']} | "
                             f"{m['train_flops']:.3g} | {m['wall_seconds']:.0f} |")
        for stage, unit in POSTTRAIN_READ.items():
            if stage in stages:
                m = stages[stage]
                flops = f"{m['train_flops']:.3g}" if "train_flops" in m else "-"
                lines.append(f"| {child} | {stage} | {m['tokens']:,} {unit} | {m['steps']} | {flops} | "
                             f"{m['wall_seconds']:.0f} |")
    lines += ["", "Wall time counts the last (resumed) run of a stage only.", ""]

    lines += ["## Long context: perplexity by position, before and after distill_long", ""]
    for child, stages in results.items():
        long_context = stages.get("distill_long", {}).get("long_context")
        if not long_context:
            continue
        before, after = long_context["before"], long_context["after"]
        parent = parent_long_context or {"position_perplexity": [None] * len(before["position_perplexity"]),
                                         "passkey": [None] * len(before["passkey"])}
        lines += [f"### {child}", "", "| target positions | before | after | parent |", "|---|---:|---:|---:|"]
        for b, a, p in zip(before["position_perplexity"], after["position_perplexity"], parent["position_perplexity"]):
            reference = _fmt(p["perplexity"]) if p else "-"
            lines.append(f"| [{b['start']}, {b['end']}) | {_fmt(b['perplexity'])} | {_fmt(a['perplexity'])} | "
                         f"{reference} |")
        lines += ["", "| passkey length | accuracy before | accuracy after | parent |", "|---|---:|---:|---:|"]
        for b, a, p in zip(before["passkey"], after["passkey"], parent["passkey"]):
            reference = f"{p['accuracy']:.2f}" if p else "-"
            lines.append(f"| {b['length']} | {b['accuracy']:.2f} | {a['accuracy']:.2f} | {reference} |")
        lines += ["", f"![long context {child}]({child}/distill_long/long_context.png)", ""]

    lines += ["## Training curves", ""]
    for child, stages in results.items():
        if "distill_short" in stages:
            path = _curves(child, stages, out_dir)
            lines += [f"![curves {child}]({path.relative_to(out_dir)})", ""]

    lines += ["## Pruning", ""]
    for child in results:
        lines += [f"### {child}", ""] + [f"![{p}]({child}/prune/{p})" for p in PRUNE_PLOTS] + [""]

    lines += ["## Samples (greedy)", ""]
    for child, stages in results.items():
        sample = stages.get("export")
        if sample:
            lines += [f"### {child}", "", "```", sample["prompt"] + sample["completion"], "```",
                      f"Hugging Face export: `{sample['hf_dir']}`", ""]
    lines += _instruct_section(results, out_dir)
    pwrm = next((stages["pwrm"] for stages in results.values() if "pwrm" in stages), None)
    if pwrm is not None:
        lines += _pwrm_section(pwrm, out_dir)
    lines += _odpo_section(results, out_dir)
    lines += _reasoning_section(results, out_dir)
    for table in ablation_tables or []:
        lines += [table, ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
