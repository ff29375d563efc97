"""Cascade Distillation (Algorithm 1) end to end, resumable stage by stage, with a run report.

    python -m recipes.cascade                                 # the CPU demo: SmolLM2-135M -> three children
    python -m recipes.cascade token_scale=4                   # 4x the distillation tokens
    python -m recipes.cascade ablations=[kl_ce_mix,random_init]
    torchrun ... -m recipes.cascade cascade=ministral3 until=ministral3_14b/distill_short   (see slurm/)

Running the same command again skips finished stages and resumes an interrupted one; a stage finished or
checkpointed with other settings is refused, naming them, before anything is written (resume_with_changes=true:
unfinished stages continue with the new settings, finished ones are kept as they are).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo_plugins.cascade.ablations import run_ablations
from nemo_plugins.cascade.plan import CascadePlan, ChildSpec, parse_until, scale_tokens
from nemo_plugins.cascade.report import write_report
from nemo_plugins.cascade.runner import CascadeInputs, parent_long_context, run_cascade
from nemo_plugins.convert.sources import (
    ModelSource,
    check_declared,
    declared_architecture,
    source_config,
    tokenizer_dir,
)
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.mix import build_mix, source_specs
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distill.stage import DistillStage
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, checked, torch_dtype, typed
from nemo_plugins.output_lock import output_lock
from nemo_plugins.prune.pipeline import PruneOptions
from nemo_plugins.prune.stage import CalibrationData, PruneEval
from nemo_plugins.rl.sft_kd import SFTStage
from recipes._entry import hydra_entry
from recipes.tokenize import prebuilt_by


def build_plan(cfg: DictConfig) -> CascadePlan:
    """Every typed piece of the config, validated before any model or data is touched."""
    children = [typed(ChildSpec, c, f"cascade.children[{i}]")
                for i, c in enumerate(OmegaConf.to_container(cfg.cascade.children, resolve=True))]
    stage_parallel = {name: typed(ParallelConfig, {**OmegaConf.to_container(cfg.parallel), **layout},
                                  f"cascade.stage_parallel.{name}")
                      for name, layout in OmegaConf.to_container(cfg.cascade.stage_parallel, resolve=True).items()}
    return CascadePlan(
        children=children,
        short=scale_tokens(DistillStage.from_config(cfg.stage.distill_short, "stage.distill_short"), cfg.token_scale),
        long=scale_tokens(DistillStage.from_config(cfg.stage.distill_long, "stage.distill_long"), cfg.token_scale),
        parallel=typed(ParallelConfig, cfg.parallel, "parallel"),
        stage_parallel=stage_parallel,
        until=parse_until(cfg.until),
        ablations=tuple(cfg.ablations or ()),
        sft=scale_tokens(SFTStage.from_config(cfg.stage.sft_kd, "stage.sft_kd"), cfg.token_scale) if cfg.posttrain else None,
    )


def run(cfg: DictConfig) -> dict:
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the parent's weights are, e.g. model.source=hf:/path")
    plan = build_plan(cfg)
    stage = cfg.stage.prune
    prune_options = typed(PruneOptions, stage.options, "stage.prune.options")
    calibration = typed(CalibrationData, stage.calibration, "stage.prune.calibration")
    prune_eval = typed(PruneEval, stage.eval, "stage.prune.eval")
    dtype = torch_dtype(cfg.dtype)
    sources = source_specs(cfg.data.sources)
    parent = ModelSource.parse(cfg.model.source)
    parent_config = source_config(parent)
    check_declared(declared_architecture(cfg.model.architecture), parent_config, cfg.model.source)
    plan.child_configs(parent_config)

    initialize(plan.layout("prune"), plan.short.train.seed)
    out_dir = Path(cfg.output_dir)
    tok_dir = tokenizer_dir(parent)
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, parent_config)
    chat_format = load_chat_format(cfg.chat_data.format, tok_dir) if plan.sft is not None else None
    inputs = CascadeInputs(parent=parent, mix=build_mix(tokenizer, sources, cfg.data.cache_dir, cfg.data.heldout_fraction,
                                                         prebuilt_by(cfg)),
                           tokenizer=tokenizer, tokenizer_dir=tok_dir, prune_options=prune_options,
                           calibration=calibration, prune_eval=prune_eval, out_dir=out_dir, dtype=dtype,
                           sample_prompt=cfg.report.sample_prompt, sample_tokens=cfg.report.sample_tokens,
                           seed=plan.short.train.seed, chat_format=chat_format,
                           chat=None if chat_format is None else build_chat_mix(
                               chat_format, source_specs(cfg.chat_data.sources), cfg.chat_data.cache_dir,
                               cfg.chat_data.heldout_fraction, prebuilt_by(cfg, "chat_data")),
                           resolved_config=OmegaConf.to_yaml(cfg, resolve=True),
                           resume_with_changes=checked(cfg.resume_with_changes, bool, "resume_with_changes"))
    with output_lock(out_dir):
        results = run_cascade(inputs, plan)
        finished = plan.until is None
        tables = run_ablations(inputs, plan, results) if finished else []
        parent_long = parent_long_context(inputs, plan) if finished else None
        if dist.get_rank() == 0:
            report = write_report(results, out_dir, parent_config.num_parameters(), cfg.cascade.name, tables, parent_long)
            print(f"cascade {cfg.cascade.name}: report at {report}")
    return results


main = hydra_entry("cascade", run)


if __name__ == "__main__":
    main()
