"""Ablations (opt-in; each a table in the report), all at the token budget and data range of the stage they
are compared with, so only the studied choice differs:

* ``kl_ce_mix``: the first child's short stage with (1 - w) KL + w CE for w in 0.25 / 0.5 / 0.75 vs KL alone;
* ``independent_pruning``: every later child pruned straight from the parent instead of the previous child;
* ``random_init``: the first child's shape from random initialisation instead of pruning;
* ``odpo_labels``, ``odpo_beta_rescale``, ``odpo_loop_as_loser``: the first child's online DPO with soft vs hard
  labels, beta-rescaling on / off at two betas, loops as losers on / off (``rl/odpo_ablations.py``), from its SFT
  model, judged by the cascade's PWRM, from the cascade's ODPO data cursor (equal prompts and sampling seeds).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nemo_plugins.cascade.plan import CascadePlan
from nemo_plugins.cascade.report import stage_evals
from nemo_plugins.cascade.runner import (
    INSTRUCT_ODPO,
    PWRM,
    CascadeInputs,
    distill_child,
    megatron_source,
    prune_child,
)
from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distributed import initialize
from nemo_plugins.model.builder import build_model
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.rl.odpo import ODPOStage, run_odpo_stage
from nemo_plugins.rl.odpo_ablations import ODPO_ABLATIONS, run_ablation
from nemo_plugins.rl.pwrm import load_judge

CE_WEIGHTS = (0.25, 0.5, 0.75)


def _row(label: str, stage_dir: Path) -> str:
    """Held-out KL and perplexity at the end of a short stage (the cascade's own, or an ablation run's)."""
    _, last = stage_evals(stage_dir)
    return f"| {label} | {last['kl']:.4f} | {last['student_ppl']:,.2f} |"


def kl_ce_mix(inputs: CascadeInputs, plan: CascadePlan, results: dict) -> str:
    child = plan.children[0]
    base = results[child.name]
    root = inputs.out_dir / "ablations" / "kl_ce_mix"
    rows = [_row("KL alone (w = 0, the cascade)", inputs.out_dir / child.name / "distill_short")]
    for weight in CE_WEIGHTS:
        stage = dataclasses.replace(plan.short, kl=dataclasses.replace(plan.short.kl, ce_weight=weight))
        distill_child(inputs, plan, stage, child, megatron_source(base["prune"]["checkpoint"]),
                      Cursor.from_dict(base["distill_short"]["cursor_start"]), root / f"ce_{weight}" / "distill_short")
        rows.append(_row(f"(1 - {weight}) KL + {weight} CE", root / f"ce_{weight}" / "distill_short"))
    return "\n".join([f"## Ablation: loss mix ({child.name}, distill_short, equal tokens)", "",
                      "| loss | held-out KL | held-out perplexity |", "|---|---:|---:|", *rows])


def independent_pruning(inputs: CascadeInputs, plan: CascadePlan, results: dict) -> str:
    root = inputs.out_dir / "ablations" / "independent_pruning"
    rows = []
    for child in plan.children[1:]:
        cascade = results[child.name]
        pruned = prune_child(inputs, plan, child, inputs.parent, root / child.name / "prune")
        distill_child(inputs, plan, plan.short, child, megatron_source(pruned["checkpoint"]),
                      Cursor.from_dict(cascade["distill_short"]["cursor_start"]), root / child.name / "distill_short")
        rows += [_row(f"{child.name}: cascade (pruned from the previous child)",
                      inputs.out_dir / child.name / "distill_short"),
                 _row(f"{child.name}: pruned straight from the parent", root / child.name / "distill_short")]
    return "\n".join(["## Ablation: cascade vs pruning each child from the parent "
                      "(after distill_short, equal tokens)", "",
                      "| model | held-out KL | held-out perplexity |", "|---|---:|---:|", *rows])


def random_init(inputs: CascadeInputs, plan: CascadePlan, results: dict) -> str:
    child = plan.children[0]
    cascade = results[child.name]
    root = inputs.out_dir / "ablations" / "random_init" / child.name
    init_dir = root / "init"
    if not init_dir.is_dir():
        initialize(plan.layout("distill_short"), inputs.seed)
        config = MistralConfig.from_dict(cascade["prune"]["child_config"])
        torch.manual_seed(inputs.seed)
        model = build_model(config, plan.layout("distill_short"), inputs.dtype)
        megatron_checkpoint.save_model(model, config, init_dir, tokenizer_dir=inputs.tokenizer_dir)
    distill_child(inputs, plan, plan.short, child, megatron_source(str(init_dir)),
                  Cursor.from_dict(cascade["distill_short"]["cursor_start"]), root / "distill_short")
    return "\n".join([f"## Ablation: pruned vs random initialisation "
                      f"({child.name}, after distill_short, equal tokens)", "",
                      "| initialisation | held-out KL | held-out perplexity |", "|---|---:|---:|",
                      _row("pruned from the parent (the cascade)", inputs.out_dir / child.name / "distill_short"),
                      _row("random", root / "distill_short")])


def odpo_ablation(name: str):
    """The cascade's runner of the online-DPO ablation ``name``: variants of the first child's ODPO stage, each
    from that child's SFT model (policy and reference) at the cascade ODPO's starting cursor, judged by the
    cascade's PWRM, under ``<run>/ablations/<name>/<variant>/`` (not exported)."""

    def run(inputs: CascadeInputs, plan: CascadePlan, results: dict) -> str:
        child = plan.children[0]
        done = results[child.name]
        policy = megatron_source(done["sft_kd"]["checkpoint"])
        judge_manifest = str(inputs.out_dir / PWRM / "manifest.json")
        pwrm = next(stages["pwrm"] for stages in results.values() if "pwrm" in stages)
        judge = {"pwrm": pwrm["checkpoint"], "tau": pwrm["calibration"]["tau"]}
        cursor = Cursor.from_dict(done["odpo"]["cursor_start"])

        def run_stage(stage: ODPOStage, out_dir: Path) -> dict:
            return run_odpo_stage(stage, policy, policy, judge,
                                  lambda: load_judge(judge_manifest, str(policy), plan.pwrm.score_micro_batch_size),
                                  inputs.chat, inputs.chat_format, inputs.tokenizer_dir, inputs.tokenizer_dir, cursor,
                                  out_dir, plan.layout("odpo"), manifest_extra={"child": child.name, "ablation": name},
                                  resume_with_changes=inputs.resume_with_changes)

        return run_ablation(name, plan.odpo, run_stage, inputs.out_dir / "ablations" / name,
                            done=(inputs.out_dir / child.name / INSTRUCT_ODPO, done["odpo"]), context=child.name)

    return run


ABLATION_RUNS = {"kl_ce_mix": kl_ce_mix, "independent_pruning": independent_pruning, "random_init": random_init,
                 **{name: odpo_ablation(name) for name in ODPO_ABLATIONS}}


def run_ablations(inputs: CascadeInputs, plan: CascadePlan, results: dict) -> list[str]:
    return [ABLATION_RUNS[name](inputs, plan, results) for name in plan.ablations]
