"""The cascade's plan, validated before any work: children, stage order, per-stage layouts, token budgets.

Post-training (``posttrain=true``) adds the Instruct branch per child: ``sft_kd`` -> ``odpo``, with the pairwise
reward model (``pwrm``) trained ONCE, right after the first child's SFT, and shared by every child's online DPO.
In the stage order the PWRM is listed under the first child (``until=<first child>/pwrm``), its directory is
``<run>/pwrm/``. ``pwrm_init`` says what it starts from: ``parent`` (the strongest model at hand) or
``first_child`` (the first, largest child's SFT model: the policies' family and tokenizer, cheaper per token in
training and in every ODPO judging call); ``pwrm_pairs_from_policy`` makes the first child's SFT
model answer the pair prompts (``data/pairwise.EngineSampler``: the PWRM then sees the policies' distribution,
at the cost of sampling every pair prompt).

Reasoning (``reasoning=true``) adds the paper's Reasoning branch per child, also from the child's long-context base
(not from Instruct): ``reasoning_sft`` -> ``grpo_stem`` -> ``grpo_general`` -> ``odpo_reasoning`` (online DPO with
the thinking stripped before the judge reads). The GRPO stages read the problem mix (STEM: only the sources named
by ``grpo_stem_sources``), the rubric items of ``grpo_general`` are judged by ``rubric_judge`` (``parent`` or a model
source), and the reasoning ODPO is judged by the cascade's one PWRM: with the Instruct branch off, the PWRM is
trained after the first child's first SFT stage, which is then ``reasoning_sft``. A reasoning stage without a layout
of its own in ``stage_parallel`` runs in its Instruct counterpart's (``REASONING_LAYOUTS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nemo_plugins.config.build import build
from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.distill.stage import DistillStage
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.pipeline import PruneTarget
from nemo_plugins.rl.grpo import GRPOStage
from nemo_plugins.rl.odpo import ODPOStage
from nemo_plugins.rl.online_stage import check_sampling_layout
from nemo_plugins.rl.pwrm import PWRMStage
from nemo_plugins.rl.sft_kd import SFTStage

if TYPE_CHECKING:
    from nemo_plugins.config.schemas import CascadeConfig

BASE_STAGES = ("prune", "distill_short", "distill_long")
POSTTRAIN_STAGES = ("sft_kd", "pwrm", "odpo")
REASONING_STAGES = ("reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning")
STAGES = BASE_STAGES + POSTTRAIN_STAGES + REASONING_STAGES
# the layout a reasoning stage runs in when stage_parallel names none for it: its Instruct counterpart's
REASONING_LAYOUTS = {"reasoning_sft": "sft_kd", "grpo_stem": "odpo", "grpo_general": "odpo", "odpo_reasoning": "odpo"}
# each reasoning stage's folder under <run>/<child>/
REASONING_DIRS = {"reasoning_sft": "reasoning_sft", "grpo_stem": "reasoning_grpo_stem",
                  "grpo_general": "reasoning_grpo_general", "odpo_reasoning": "reasoning_odpo"}
SAMPLING_STAGES = {"odpo": "online DPO", "grpo_stem": "GRPO (STEM)", "grpo_general": "GRPO (General)",
                   "odpo_reasoning": "reasoning online DPO"}
PWRM_INITS = ("first_child", "parent")
ABLATIONS = ("kl_ce_mix", "independent_pruning", "random_init", "odpo_labels", "odpo_beta_rescale",
             "odpo_loop_as_loser")


@dataclass
class ChildSpec:
    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    tie_embeddings: bool = False

    @property
    def target(self) -> PruneTarget:
        return PruneTarget(self.num_layers, self.hidden_size, self.ffn_hidden_size, self.tie_embeddings)


@dataclass(frozen=True)
class CascadePlan:
    children: list[ChildSpec]
    short: DistillStage
    long: DistillStage
    parallel: ParallelConfig
    stage_parallel: dict[str, ParallelConfig] = field(default_factory=dict)
    until: tuple[str, str] | None = None
    ablations: tuple[str, ...] = ()
    sft: SFTStage | None = None  # None: base models only (posttrain=false)
    pwrm: PWRMStage | None = None  # set with sft and odpo (posttrain=true)
    odpo: ODPOStage | None = None
    pwrm_init: str = "parent"  # parent | first_child: what the PWRM starts from
    pwrm_pairs_from_policy: bool = False  # the first child's SFT model answers the pair prompts
    reasoning_sft: SFTStage | None = None  # None: no Reasoning branch (reasoning=false)
    grpo_stem: GRPOStage | None = None  # set with reasoning_sft, grpo_general and odpo_reasoning
    grpo_general: GRPOStage | None = None
    odpo_reasoning: ODPOStage | None = None
    grpo_stem_sources: tuple[str, ...] = ()  # the problem sources the STEM stage reads (General: all of them)
    rubric_judge: str = "parent"  # parent | a model source: who answers grpo_general's rubric items

    def __post_init__(self) -> None:
        if not self.children:
            raise ConfigError("cascade.children is empty")
        names = [c.name for c in self.children]
        if len(set(names)) != len(names):
            raise ConfigError(f"cascade.children names must be unique, got {names}")
        unknown = set(self.stage_parallel) - set(STAGES)
        if unknown:
            raise ConfigError(f"cascade.stage_parallel has unknown stage(s) {sorted(unknown)}; "
                              f"allowed: {', '.join(STAGES)}")
        if self.until is not None and self.until not in self.order():
            raise ConfigError(f"until={'/'.join(self.until)} is not a stage of this cascade; allowed: "
                              + ", ".join("/".join(s) for s in self.order()))
        bad = set(self.ablations) - set(ABLATIONS)
        if bad:
            raise ConfigError(f"unknown ablation(s) {sorted(bad)}; allowed: {', '.join(ABLATIONS)}")
        if self.long.context is not None and self.long.context.original_context != self.short.train.seq_len:
            raise ConfigError(f"stage.distill_long.context.original_context={self.long.context.original_context} "
                              f"must equal stage.distill_short.train.seq_len={self.short.train.seq_len} "
                              "(YaRN extends the short context)")
        if self.odpo is None and any(a.startswith("odpo_") for a in self.ablations):
            raise ConfigError(f"ablations={list(self.ablations)}: the online-DPO ablations need posttrain=true")
        if (self.sft is None) != (self.odpo is None):
            raise ConfigError("the Instruct branch needs both stage.sft_kd and stage.odpo (posttrain=true) or neither")
        if (self.pwrm is None) != (self.odpo is None and self.odpo_reasoning is None):
            raise ConfigError("stage.pwrm is needed exactly when a branch runs online DPO "
                              "(posttrain=true or reasoning=true)")
        if self.pwrm_init not in PWRM_INITS:
            raise ConfigError(f"pwrm_init={self.pwrm_init!r}; allowed: {', '.join(PWRM_INITS)}")
        self._check_reasoning()
        for stage, name in SAMPLING_STAGES.items():
            if self.training_stage(stage) is not None:
                try:
                    check_sampling_layout(self.layout(stage), name)
                except ConfigError as err:
                    raise ConfigError(f"{self.layout_key(stage)} (the layout of {stage}): {err}") from None
        if self.pwrm is not None:
            if self.layout("pwrm").cp > 1:
                raise ConfigError(f"cascade.stage_parallel.pwrm.cp={self.layout('pwrm').cp}: the PWRM reads one "
                                  "position per row, which context parallelism splits over ranks; set it to 1")

    def _check_reasoning(self) -> None:
        stages = (self.reasoning_sft, self.grpo_stem, self.grpo_general, self.odpo_reasoning)
        if any(s is None for s in stages):
            if any(s is not None for s in stages):
                raise ConfigError("the Reasoning branch needs all of stage.reasoning_sft, stage.grpo_stem, "
                                  "stage.grpo_general and stage.odpo_reasoning (reasoning=true) or none")
            return
        if not self.odpo_reasoning.sampling.strip_thinking:
            raise ConfigError("stage.odpo_reasoning.sampling.strip_thinking=false: the PWRM was trained on answers, "
                              "not on thinking; set it to true (the paper strips the thinking before judging)")
        if not self.grpo_stem_sources:
            raise ConfigError("grpo_stem_sources is empty: name the problem sources of the STEM stage (verifiable "
                              "rewards: math, code), e.g. [reasoning_math, reasoning_code]")
        if self.rubric_judge != "parent":
            ModelSource.parse(self.rubric_judge)

    def order(self) -> list[tuple[str, str]]:
        """(child, stage) in the order they run; the PWRM once, under the first child, after its first SFT stage
        (Instruct's when that branch is on, else the Reasoning SFT)."""
        order = []
        for index, child in enumerate(self.children):
            instruct = () if self.sft is None else ("sft_kd", "odpo")
            reasoning = () if self.reasoning_sft is None else REASONING_STAGES
            stages = list(BASE_STAGES + instruct + reasoning)
            if index == 0 and self.pwrm is not None:
                stages.insert(len(BASE_STAGES) + 1, "pwrm")
            order += [(child.name, stage) for stage in stages]
        return order

    def training_stage(self, stage: str) -> DistillStage | SFTStage | PWRMStage | ODPOStage | GRPOStage | None:
        """The settings of a training stage (every stage but prune); None for a branch that is off."""
        return {"distill_short": self.short, "distill_long": self.long, "sft_kd": self.sft, "pwrm": self.pwrm,
                "odpo": self.odpo, "reasoning_sft": self.reasoning_sft, "grpo_stem": self.grpo_stem,
                "grpo_general": self.grpo_general, "odpo_reasoning": self.odpo_reasoning}[stage]

    def layout(self, stage: str) -> ParallelConfig:
        fallback = self.stage_parallel.get(REASONING_LAYOUTS.get(stage, stage), self.parallel)
        return self.stage_parallel.get(stage, fallback)

    def layout_key(self, stage: str) -> str:
        """The config key ``layout(stage)`` comes from (what to change)."""
        for key in (stage, REASONING_LAYOUTS.get(stage)):
            if key in self.stage_parallel:
                return f"cascade.stage_parallel.{key}"
        return "parallel"

    def child_configs(self, parent: MistralConfig) -> dict[str, MistralConfig]:
        """Each child's config, checked: it fits its parent's heads / TP and is strictly smaller than the model
        before it."""
        configs, previous = {}, parent
        for child in self.children:
            child.target.check_against(previous, self.layout("prune").tp)
            config = previous.replace(num_layers=child.num_layers, hidden_size=child.hidden_size,
                                      ffn_hidden_size=child.ffn_hidden_size, tie_embeddings=child.tie_embeddings)
            if config.num_parameters() >= previous.num_parameters():
                raise ConfigError(f"cascade child {child.name!r} has {config.num_parameters():,} parameters, "
                                  f"not fewer than the model before it ({previous.num_parameters():,}): "
                                  "each child must be smaller")
            configs[child.name] = previous = config
        return configs


def scale_tokens(stage: DistillStage | SFTStage, factor: float) -> DistillStage | SFTStage:
    """The stage with ``train_tokens`` multiplied (at least one step)."""
    if factor <= 0:
        raise ConfigError(f"token_scale must be > 0, got {factor}")
    tokens = max(stage.train.tokens_per_step, int(stage.train.train_tokens * factor))
    return dataclasses.replace(stage, train=dataclasses.replace(stage.train, train_tokens=tokens))


def parse_until(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    child, sep, stage = str(text).partition("/")
    if not sep:
        raise ConfigError(f"until={text!r} must look like <child>/<stage>, stage one of {', '.join(STAGES)}")
    return child, stage


def plan_from_config(cfg: CascadeConfig) -> CascadePlan:
    """The plan of a typed cascade config (``conf/cascade.yaml``), checked before any model or data is touched;
    the stages of a branch that is off stay None."""
    posttrain, reasoning = cfg.posttrain, cfg.reasoning
    stages = cfg.stage
    if (posttrain or reasoning) and cfg.pairs.sample_from:
        raise ConfigError(f"pairs.sample_from={cfg.pairs.sample_from}: in the cascade the pair answers come from the "
                          "first child's SFT model; set pwrm_pairs_from_policy=true and pairs.sample_from=null")
    layouts = {name: build(ParallelConfig, {**dataclasses.asdict(cfg.parallel), **layout},
                           f"cascade.stage_parallel.{name}")
               for name, layout in cfg.cascade.stage_parallel.items()}
    branch = {}
    if posttrain:
        branch.update(sft=scale_tokens(stages.sft_kd, cfg.token_scale), odpo=stages.odpo)
    if reasoning:
        check_reasoning_data(cfg, posttrain)
        branch.update(reasoning_sft=scale_tokens(stages.reasoning_sft, cfg.token_scale), grpo_stem=stages.grpo_stem,
                      grpo_general=stages.grpo_general, odpo_reasoning=stages.odpo_reasoning,
                      grpo_stem_sources=tuple(cfg.grpo_stem_sources), rubric_judge=cfg.rubric_judge)
    return CascadePlan(
        children=list(cfg.cascade.children),
        short=scale_tokens(stages.distill_short, cfg.token_scale),
        long=scale_tokens(stages.distill_long, cfg.token_scale),
        parallel=cfg.parallel,
        stage_parallel=layouts,
        until=parse_until(cfg.until),
        ablations=tuple(cfg.ablations),
        pwrm=stages.pwrm if posttrain or reasoning else None,
        pwrm_init=cfg.pwrm_init,
        pwrm_pairs_from_policy=cfg.pwrm_pairs_from_policy,
        **branch,
    )


def check_reasoning_data(cfg: CascadeConfig, posttrain: bool) -> None:
    """The STEM sources are problem sources, and every chat mix the run reads renders in one format (the runner
    samples and trains every branch with one chat format)."""
    problem_sources = [s.name for s in cfg.problem_data.sources]
    unknown = sorted(set(cfg.grpo_stem_sources) - set(problem_sources))
    if unknown:
        raise ConfigError(f"grpo_stem_sources names {unknown}, which are not sources of problem_data "
                          f"({', '.join(problem_sources)})")
    groups = ["reasoning_data", "problem_data"] + (["chat_data"] if posttrain else [])
    formats = {group: getattr(cfg, group).format for group in groups}
    if len(set(formats.values())) > 1:
        raise ConfigError(f"the chat mixes render in different formats ({formats}): give them one format (e.g. "
                          + " ".join(f"{group}.format={formats[groups[-1]]}" for group in groups[:-1]) + ")")
