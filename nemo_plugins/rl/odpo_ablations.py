"""The online-DPO ablations (issue 15): soft vs hard labels, beta-rescaling on / off at two betas, loops as losers
on / off. Each is a set of variants of ONE ODPO stage that differ in the studied setting only, run from the same
policy, reference, judge and data cursor, so every variant sees the same prompts with the same sampling seeds
(``odpo``: a step's seeds come from the cursor it starts at and the stage's seed); each ends as a markdown table.

The caller says how to run a stage (``run(stage, out_dir) -> manifest``, e.g. ``run_odpo_stage`` with the child's SFT
model and the cascade's judge); a variant equal to the stage already run (``done``) is that run's row, not a
second identical run. The table: win rate against the reference (the SFT model) on held-out prompts at the start
and the end, the end's loop rate, and the step means of mean |p - 0.5| (label confidence), the log-ratio margin,
the training loop rate and the drop rate (pairs where both responses loop).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.odpo import ODPOStage

# The stage default and 5x it (not 1.0: there loss / beta is the loss). Under Adam a constant gradient scale
# cancels (up to eps and gradient clipping), so on / off at one beta is expected to differ little: measured.
ABLATION_BETAS = (0.1, 0.5)


@dataclass(frozen=True)
class Variant:
    label: str
    slug: str  # its directory under the ablation's root
    stage: ODPOStage


def _with_dpo(stage: ODPOStage, **changes) -> ODPOStage:
    return dataclasses.replace(stage, dpo=dataclasses.replace(stage.dpo, **changes))


def label_variants(stage: ODPOStage) -> list[Variant]:
    return [Variant("soft labels (p)", "soft", _with_dpo(stage, hard_labels=False)),
            Variant("hard labels (p rounded)", "hard", _with_dpo(stage, hard_labels=True))]


def beta_rescale_variants(stage: ODPOStage) -> list[Variant]:
    return [Variant(f"beta {beta:g}, {rescale}", f"beta_{beta:g}_{rescale}",
                    _with_dpo(stage, beta=beta, beta_rescale=rescale))
            for beta in ABLATION_BETAS for rescale in ("none", "inv_beta")]


def loop_as_loser_variants(stage: ODPOStage) -> list[Variant]:
    return [Variant("loops lose (both looping: dropped)", "loop_loses", dataclasses.replace(stage, loop_as_loser=True)),
            Variant("the judge alone decides", "judge_only", dataclasses.replace(stage, loop_as_loser=False))]


ODPO_ABLATIONS: dict[str, tuple[str, Callable[[ODPOStage], list[Variant]]]] = {
    "odpo_labels": ("soft vs hard labels", label_variants),
    "odpo_beta_rescale": ("beta-rescaling (loss / beta) on and off at two betas", beta_rescale_variants),
    "odpo_loop_as_loser": ("a looping response loses, on and off", loop_as_loser_variants),
}

COLUMNS = ("win rate vs SFT (start -> end)", "loop rate (end)", "mean abs(p - 0.5)", "margin", "train loop rate",
           "drop rate")


def row(label: str, manifest: dict) -> str:
    """One variant's table row from its ODPO manifest."""
    start, end, means = manifest["eval_start"] or {}, manifest["eval"], manifest["step_means"]
    return (f"| {label} | {start.get('win_rate', float('nan')):.3f} -> {end['win_rate']:.3f} | "
            f"{end['loop_rate']:.3f} | {means['label_confidence']:.3f} | {means['margin']:.4f} | "
            f"{means['loop_rate']:.3f} | {means['drop_rate']:.3f} |")


def run_ablation(name: str, stage: ODPOStage, run: Callable[[ODPOStage, Path], dict], root: Path,
                 done: tuple[Path, dict] | None = None, context: str = "") -> str:
    """The ablation ``name``'s variants of ``stage`` run with ``run(variant_stage, out_dir)`` under ``root/<slug>``
    (``done``: the stage's own finished run, directory and manifest, reused for the variant equal to it); returns
    the markdown table."""
    if name not in ODPO_ABLATIONS:
        raise ConfigError(f"unknown online-DPO ablation {name!r}; allowed: {', '.join(ODPO_ABLATIONS)}")
    title, variants = ODPO_ABLATIONS[name]
    rows = []
    for variant in variants(stage):
        if done is not None and variant.stage == stage:
            rows.append(row(f"{variant.label} (the stage's own run)", done[1]))
        else:
            rows.append(row(variant.label, run(variant.stage, Path(root) / variant.slug)))
    header = f"## Ablation: online DPO, {title}" + (f" ({context})" if context else "")
    return "\n".join([header, "", "Equal prompts and sampling seeds; win rate judged by the PWRM against the SFT model "
                      "on held-out prompts.", "", "| variant | " + " | ".join(COLUMNS) + " |",
                      "|---|" + "---:|" * len(COLUMNS), *rows])
