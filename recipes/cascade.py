"""Cascade Distillation (Algorithm 1) end to end, resumable stage by stage, with a run report.

    python -m recipes.cascade                                 # the CPU demo: SmolLM2-135M -> three children
    python -m recipes.cascade token_scale=4                   # 4x the distillation tokens
    python -m recipes.cascade ablations=[kl_ce_mix,random_init]
    python -m recipes.cascade posttrain=false                 # base models only (no Instruct branch)
    python -m recipes.cascade pwrm_init=parent pwrm_pairs_from_policy=true
    torchrun ... -m recipes.cascade cascade=ministral3 until=ministral3_14b/distill_short   (see slurm/)

Running the same command again skips finished stages and resumes an interrupted one; a stage finished or
checkpointed with other settings is refused, naming them, before anything is written (resume_with_changes=true:
unfinished stages continue with the new settings, finished ones are kept as they are).

With ``posttrain=true`` (the default) every child also gets the Instruct branch: SFT with logit distillation
(``stage.sft_kd``), then online DPO (``stage.odpo``) judged by one pairwise reward model (``stage.pwrm``, pairs
from ``pairs``) trained after the first child's SFT (nemo_plugins/cascade/plan.py: ``pwrm_init``,
``pwrm_pairs_from_policy``).
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo_plugins.cascade.ablations import run_ablations
from nemo_plugins.cascade.plan import CascadePlan, ChildSpec, parse_until, scale_tokens
from nemo_plugins.cascade.report import write_report
from nemo_plugins.cascade.runner import CascadeInputs, PairData, parent_long_context, run_cascade
from nemo_plugins.convert.sources import (
    ModelSource,
    check_declared,
    declared_architecture,
    source_config,
    tokenizer_dir,
)
from nemo_plugins.data.mix import build_mix, source_specs
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distill.stage import DistillStage
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, checked, torch_dtype, typed
from nemo_plugins.output_lock import output_lock
from nemo_plugins.prune.pipeline import PruneOptions
from nemo_plugins.prune.stage import CalibrationData, PruneEval
from nemo_plugins.rl.odpo import ODPOStage
from nemo_plugins.rl.pwrm import PWRMStage
from nemo_plugins.rl.sft_kd import SFTStage
from recipes._chat_data import load_chat_data
from recipes._entry import hydra_entry
from recipes.pwrm import load_pairs
from recipes.tokenize import prebuilt_by


def build_plan(cfg: DictConfig) -> CascadePlan:
    """Every typed piece of the config, validated before any model or data is touched."""
    children = [typed(ChildSpec, c, f"cascade.children[{i}]")
                for i, c in enumerate(OmegaConf.to_container(cfg.cascade.children, resolve=True))]
    stage_parallel = {name: typed(ParallelConfig, {**OmegaConf.to_container(cfg.parallel), **layout},
                                  f"cascade.stage_parallel.{name}")
                      for name, layout in OmegaConf.to_container(cfg.cascade.stage_parallel, resolve=True).items()}
    posttrain = checked(cfg.posttrain, bool, "posttrain")
    if posttrain and cfg.pairs.sample_from:
        raise ConfigError(f"pairs.sample_from={cfg.pairs.sample_from}: in the cascade the pair answers come from the "
                          "first child's SFT model; set pwrm_pairs_from_policy=true and pairs.sample_from=null")
    return CascadePlan(
        children=children,
        short=scale_tokens(DistillStage.from_config(cfg.stage.distill_short, "stage.distill_short"), cfg.token_scale),
        long=scale_tokens(DistillStage.from_config(cfg.stage.distill_long, "stage.distill_long"), cfg.token_scale),
        parallel=typed(ParallelConfig, cfg.parallel, "parallel"),
        stage_parallel=stage_parallel,
        until=parse_until(cfg.until),
        ablations=tuple(cfg.ablations or ()),
        sft=scale_tokens(SFTStage.from_config(cfg.stage.sft_kd, "stage.sft_kd"), cfg.token_scale) if posttrain else None,
        pwrm=PWRMStage.from_config(cfg.stage.pwrm, "stage.pwrm") if posttrain else None,
        odpo=ODPOStage.from_config(cfg.stage.odpo, "stage.odpo") if posttrain else None,
        pwrm_init=checked(cfg.pwrm_init, str, "pwrm_init"),
        pwrm_pairs_from_policy=checked(cfg.pwrm_pairs_from_policy, bool, "pwrm_pairs_from_policy"),
    )


def pair_data(cfg: DictConfig) -> PairData:
    """The PWRM's pairs as ``recipes.pwrm`` builds them (``pairs``), answered by the model the runner names when
    ``pwrm_pairs_from_policy`` is on (``pairs.sample_from`` is the runner's to set in a cascade)."""

    def load(sample_from: ModelSource | None, layout: ParallelConfig, seed: int) -> tuple[list, dict]:
        pairs = OmegaConf.merge(cfg.pairs, {"sample_from": None if sample_from is None else str(sample_from)})
        return load_pairs(pairs, layout, seed)

    return PairData(load, str(cfg.pairs.format))


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
    chat_format, chat = load_chat_data(cfg, tok_dir) if plan.sft is not None else (None, None)
    inputs = CascadeInputs(parent=parent, mix=build_mix(tokenizer, sources, cfg.data.cache_dir, cfg.data.heldout_fraction,
                                                         prebuilt_by(cfg)),
                           tokenizer=tokenizer, tokenizer_dir=tok_dir, prune_options=prune_options,
                           calibration=calibration, prune_eval=prune_eval, out_dir=out_dir, dtype=dtype,
                           sample_prompt=cfg.report.sample_prompt, sample_tokens=cfg.report.sample_tokens,
                           seed=plan.short.train.seed, chat_format=chat_format, chat=chat,
                           pairs=pair_data(cfg) if plan.sft is not None else None,
                           resolved_config=OmegaConf.to_yaml(cfg, resolve=True),
                           resume_with_changes=checked(cfg.resume_with_changes, bool, "resume_with_changes"))
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
