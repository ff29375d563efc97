"""Cascade Distillation (Algorithm 1) end to end, resumable stage by stage, with a run report.

    python -m recipes.cascade                                 # the CPU demo: SmolLM2-135M -> three children,
                                                              # each through the Instruct and Reasoning branches
    python -m recipes.cascade token_scale=4                   # 4x the distillation tokens
    python -m recipes.cascade ablations=[kl_ce_mix,random_init]
    python -m recipes.cascade posttrain=false                 # base models only (no post-training)
    python -m recipes.cascade reasoning=false                 # the Instruct branch only
    python -m recipes.cascade pwrm_init=parent pwrm_pairs_from_policy=true
    torchrun ... -m recipes.cascade cascade=ministral3 until=ministral3_14b/distill_short   (see slurm/)

Running the same command again skips finished stages and resumes an interrupted one; a stage finished or
checkpointed with other settings is refused, naming them, before anything is written (resume_with_changes=true:
unfinished stages continue with the new settings, finished ones are kept as they are).

With ``posttrain=true`` (the default) every child also gets the Instruct branch: SFT with logit distillation
(``stage.sft_kd``), then online DPO (``stage.odpo``) judged by one pairwise reward model (``stage.pwrm``, pairs
from ``pairs``) trained after the first child's SFT (nemo_plugins/cascade/plan.py: ``pwrm_init``,
``pwrm_pairs_from_policy``).

With ``reasoning=true`` (its default follows ``posttrain``; ``cascade=ministral3`` sets it false until it has
paper-scale reasoning budgets) every child also gets the Reasoning branch from its long-context base:
``stage.reasoning_sft`` on ``reasoning_data`` (screened by the stage's filters and system prompt), GRPO
``stage.grpo_stem`` (on the ``grpo_stem_sources`` of ``problem_data``) and ``stage.grpo_general`` (all of them; rubric
items answered by ``rubric_judge``), then ``stage.odpo_reasoning`` judged by the same PWRM (trained after the first
child's first SFT stage, whichever branch it belongs to). The problems are rendered with the reasoning system prompt,
the one the reasoning SFT trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_plugins.cascade.ablations import run_ablations
from nemo_plugins.cascade.plan import CascadePlan, plan_from_config
from nemo_plugins.cascade.report import write_report
from nemo_plugins.cascade.runner import CascadeInputs, PairData, parent_long_context, run_cascade
from nemo_plugins.config.schemas import CascadeConfig
from nemo_plugins.convert.sources import ModelSource, check_declared, source_config, tokenizer_dir
from nemo_plugins.data.from_config import load_chat_data, load_pairs, mix_images, prebuilt_by
from nemo_plugins.data.mix import build_mix
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, torch_dtype
from nemo_plugins.output_lock import output_lock
from recipes._entry import hydra_entry


def reasoning_data(cfg: CascadeConfig, plan: CascadePlan, tok_dir) -> tuple:
    """The reasoning SFT mix (screened as its stage screens it) and the problem mix (with the reasoning system
    prompt only: no filter drops a problem), rendered once and cached."""
    chat_format, reasoning = load_chat_data(cfg, tok_dir, plan.reasoning_sft.data_screen(), "reasoning_data")
    _, problems = load_chat_data(cfg, tok_dir, plan.reasoning_sft.prompt_screen(), "problem_data")
    return chat_format, reasoning, problems


def pair_data(cfg: CascadeConfig) -> PairData:
    """The PWRM's pairs as ``recipes.pwrm`` builds them (``pairs``), answered by the model the runner names when
    ``pwrm_pairs_from_policy`` is on (``pairs.sample_from`` is the runner's to set in a cascade)."""

    def load(sample_from: ModelSource | None, layout: ParallelConfig, seed: int) -> tuple[list, dict]:
        pairs = dataclasses.replace(cfg.pairs, sample_from=None if sample_from is None else str(sample_from))
        return load_pairs(pairs, layout, seed)

    return PairData(load, cfg.pairs.format)


def run(cfg: CascadeConfig) -> dict:
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the parent's weights are, e.g. model.source=hf:/path")
    plan = plan_from_config(cfg)
    prune = cfg.stage.prune
    parent = ModelSource.parse(cfg.model.source)
    parent_config = source_config(parent)
    check_declared(cfg.model.architecture, parent_config, cfg.model.source)
    plan.child_configs(parent_config)

    initialize(plan.layout("prune"), plan.short.train.seed)
    out_dir = Path(cfg.output_dir)
    tok_dir = tokenizer_dir(parent)
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, parent_config)
    chat_format, chat = load_chat_data(cfg, tok_dir, plan.sft.data_screen()) if plan.sft is not None else (None, None)
    reasoning_chat = problems = None
    if plan.reasoning_sft is not None:
        chat_format, reasoning_chat, problems = reasoning_data(cfg, plan, tok_dir)
    mix = build_mix(tokenizer, cfg.data.sources, cfg.data.cache_dir, cfg.data.heldout_fraction, prebuilt_by(cfg),
                    mix_images(cfg, parent))
    inputs = CascadeInputs(parent=parent, mix=mix, tokenizer=tokenizer, tokenizer_dir=tok_dir,
                           prune_options=prune.options, calibration=prune.calibration, prune_eval=prune.eval,
                           out_dir=out_dir, dtype=torch_dtype(cfg.dtype), sample_prompt=cfg.report.sample_prompt,
                           sample_tokens=cfg.report.sample_tokens, seed=plan.short.train.seed,
                           chat_format=chat_format, chat=chat, pairs=pair_data(cfg) if plan.pwrm is not None else None,
                           reasoning_chat=reasoning_chat, problems=problems,
                           resolved_config=OmegaConf.to_yaml(OmegaConf.structured(cfg)),
                           resume_with_changes=cfg.resume_with_changes)
    with output_lock(out_dir):
        results = run_cascade(inputs, plan)
        finished = plan.until is None
        tables = run_ablations(inputs, plan, results) if finished else []
        parent_long = parent_long_context(inputs, plan) if finished else None
        if dist.get_rank() == 0:
            report = write_report(results, out_dir, parent_config, cfg.cascade.name, tables, parent_long)
            print(f"cascade {cfg.cascade.name}: report at {report}")
    return results


main = hydra_entry("cascade", run)


if __name__ == "__main__":
    main()
