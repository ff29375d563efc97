"""Cascade Distillation (Algorithm 1) end to end, resumable stage by stage, with a run report.

    python -m recipes.cascade                                 # the CPU demo: SmolLM2-135M -> three children
    python -m recipes.cascade token_scale=4                   # 4x the distillation tokens
    python -m recipes.cascade ablations=[kl_ce_mix,random_init]
    python -m recipes.cascade posttrain=false                 # base models only (no Instruct branch)
    python -m recipes.cascade pwrm_init=parent pwrm_pairs_from_policy=true
    python -m recipes.cascade reasoning=true                  # + the Reasoning branch per child
    torchrun ... -m recipes.cascade cascade=ministral3 until=ministral3_14b/distill_short   (see slurm/)

Running the same command again skips finished stages and resumes an interrupted one; a stage finished or
checkpointed with other settings is refused, naming them, before anything is written (resume_with_changes=true:
unfinished stages continue with the new settings, finished ones are kept as they are).

With ``posttrain=true`` (the default) every child also gets the Instruct branch: SFT with logit distillation
(``stage.sft_kd``), then online DPO (``stage.odpo``) judged by one pairwise reward model (``stage.pwrm``, pairs
from ``pairs``) trained after the first child's SFT (nemo_plugins/cascade/plan.py: ``pwrm_init``,
``pwrm_pairs_from_policy``).

With ``reasoning=true`` every child also gets the Reasoning branch from its long-context base: ``stage.reasoning_sft``
on ``reasoning_data`` (screened by the stage's filters and system prompt), GRPO ``stage.grpo_stem`` (on the
``grpo_stem_sources`` of ``problem_data``) and ``stage.grpo_general`` (all of them; rubric items answered by
``rubric_judge``), then ``stage.odpo_reasoning`` judged by the same PWRM (trained after the first child's first SFT
stage, whichever branch it belongs to). The problems are rendered with the reasoning system prompt, the one the
reasoning SFT trained with.
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
from nemo_plugins.rl.grpo import GRPOStage
from nemo_plugins.rl.odpo import ODPOStage
from nemo_plugins.rl.pwrm import PWRMStage
from nemo_plugins.rl.sft_kd import SFTStage
from recipes._chat_data import load_chat_data
from recipes._entry import hydra_entry
from recipes.pwrm import load_pairs
from recipes.tokenize import mix_images, prebuilt_by


def build_plan(cfg: DictConfig) -> CascadePlan:
    """Every typed piece of the config, validated before any model or data is touched."""
    children = [typed(ChildSpec, c, f"cascade.children[{i}]")
                for i, c in enumerate(OmegaConf.to_container(cfg.cascade.children, resolve=True))]
    stage_parallel = {name: typed(ParallelConfig, {**OmegaConf.to_container(cfg.parallel), **layout},
                                  f"cascade.stage_parallel.{name}")
                      for name, layout in OmegaConf.to_container(cfg.cascade.stage_parallel, resolve=True).items()}
    posttrain = checked(cfg.posttrain, bool, "posttrain")
    reasoning = checked(cfg.reasoning, bool, "reasoning")
    if (posttrain or reasoning) and cfg.pairs.sample_from:
        raise ConfigError(f"pairs.sample_from={cfg.pairs.sample_from}: in the cascade the pair answers come from the "
                          "first child's SFT model; set pwrm_pairs_from_policy=true and pairs.sample_from=null")
    if reasoning:
        check_reasoning_data(cfg, posttrain)
    return CascadePlan(
        children=children,
        short=scale_tokens(DistillStage.from_config(cfg.stage.distill_short, "stage.distill_short"), cfg.token_scale),
        long=scale_tokens(DistillStage.from_config(cfg.stage.distill_long, "stage.distill_long"), cfg.token_scale),
        parallel=typed(ParallelConfig, cfg.parallel, "parallel"),
        stage_parallel=stage_parallel,
        until=parse_until(cfg.until),
        ablations=tuple(cfg.ablations or ()),
        sft=scale_tokens(SFTStage.from_config(cfg.stage.sft_kd, "stage.sft_kd"), cfg.token_scale) if posttrain else None,
        pwrm=PWRMStage.from_config(cfg.stage.pwrm, "stage.pwrm") if posttrain or reasoning else None,
        odpo=ODPOStage.from_config(cfg.stage.odpo, "stage.odpo") if posttrain else None,
        pwrm_init=checked(cfg.pwrm_init, str, "pwrm_init"),
        pwrm_pairs_from_policy=checked(cfg.pwrm_pairs_from_policy, bool, "pwrm_pairs_from_policy"),
        **(reasoning_stages(cfg) if reasoning else {}),
    )


def reasoning_stages(cfg: DictConfig) -> dict:
    """The Reasoning branch's part of the plan (``reasoning=true``)."""
    return {
        "reasoning_sft": scale_tokens(SFTStage.from_config(cfg.stage.reasoning_sft, "stage.reasoning_sft"), cfg.token_scale),
        "grpo_stem": GRPOStage.from_config(cfg.stage.grpo_stem, "stage.grpo_stem"),
        "grpo_general": GRPOStage.from_config(cfg.stage.grpo_general, "stage.grpo_general"),
        "odpo_reasoning": ODPOStage.from_config(cfg.stage.odpo_reasoning, "stage.odpo_reasoning"),
        "grpo_stem_sources": tuple(str(name) for name in cfg.grpo_stem_sources or ()),
        "rubric_judge": checked(cfg.rubric_judge, str, "rubric_judge"),
    }


def check_reasoning_data(cfg: DictConfig, posttrain: bool) -> None:
    """The STEM sources are problem sources, and every chat mix the run reads renders in one format (the runner
    samples and trains every branch with one chat format)."""
    problem_sources = [s["name"] for s in cfg.problem_data.sources]
    unknown = sorted(set(cfg.grpo_stem_sources or []) - set(problem_sources))
    if unknown:
        raise ConfigError(f"grpo_stem_sources names {unknown}, which are not sources of problem_data "
                          f"({', '.join(problem_sources)})")
    groups = ["reasoning_data", "problem_data"] + (["chat_data"] if posttrain else [])
    formats = {group: str(cfg[group].format) for group in groups}
    if len(set(formats.values())) > 1:
        raise ConfigError(f"the chat mixes render in different formats ({formats}): give them one format (e.g. "
                          + " ".join(f"{group}.format={formats[groups[-1]]}" for group in groups[:-1]) + ")")


def reasoning_data(cfg: DictConfig, plan: CascadePlan, tok_dir) -> tuple:
    """The reasoning SFT mix (screened as its stage screens it) and the problem mix (with the reasoning system
    prompt only: no filter drops a problem), rendered once and cached."""
    chat_format = load_chat_format(cfg.reasoning_data.format, tok_dir)
    mixes = []
    for group, screen in (("reasoning_data", plan.reasoning_sft.data_screen()),
                          ("problem_data", plan.reasoning_sft.prompt_screen())):
        data = cfg[group]
        mixes.append(build_chat_mix(chat_format, source_specs(data.sources), data.cache_dir, data.heldout_fraction,
                                    prebuilt_by(cfg, group), screen))
    return chat_format, *mixes


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
    chat_format, chat = load_chat_data(cfg, tok_dir, plan.sft.data_screen()) if plan.sft is not None else (None, None)
    reasoning_chat = problems = None
    if plan.reasoning_sft is not None:
        chat_format, reasoning_chat, problems = reasoning_data(cfg, plan, tok_dir)
    inputs = CascadeInputs(parent=parent, mix=build_mix(tokenizer, sources, cfg.data.cache_dir, cfg.data.heldout_fraction,
                                                         prebuilt_by(cfg), mix_images(cfg, parent)),
                           tokenizer=tokenizer, tokenizer_dir=tok_dir, prune_options=prune_options,
                           calibration=calibration, prune_eval=prune_eval, out_dir=out_dir, dtype=dtype,
                           sample_prompt=cfg.report.sample_prompt, sample_tokens=cfg.report.sample_tokens,
                           seed=plan.short.train.seed, chat_format=chat_format, chat=chat,
                           pairs=pair_data(cfg) if plan.pwrm is not None else None,
                           reasoning_chat=reasoning_chat, problems=problems,
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
