"""The cascade's plan, validated before any work: children, stage order, per-stage layouts, token budgets.

Post-training (``posttrain=true``) adds the Instruct branch per child: ``sft_kd`` -> ``odpo``, with the pairwise
reward model (``pwrm``) trained ONCE, right after the first child's SFT, and shared by every child's online DPO.
In the stage order the PWRM is listed under the first child (``until=<first child>/pwrm``), its directory is
``<run>/pwrm/``. ``pwrm_init`` says what it starts from: ``parent`` (the strongest model at hand) or
``first_child`` (the first, largest child's SFT model: the policies' family and tokenizer, cheaper per token in
training and in every ODPO judging call); ``pwrm_pairs_from_policy`` makes the first child's SFT
model answer the pair prompts (``data/pairwise.EngineSampler``: the PWRM then sees the policies' distribution,
at the cost of sampling every pair prompt).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nemo_plugins.distill.stage import DistillStage
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.pipeline import PruneTarget
from nemo_plugins.rl.odpo import ODPOStage
from nemo_plugins.rl.online_stage import check_sampling_layout
from nemo_plugins.rl.pwrm import PWRMStage
from nemo_plugins.rl.sft_kd import SFTStage

BASE_STAGES = ("prune", "distill_short", "distill_long")
POSTTRAIN_STAGES = ("sft_kd", "pwrm", "odpo")
STAGES = BASE_STAGES + POSTTRAIN_STAGES
PWRM_INITS = ("first_child", "parent")
ABLATIONS = ("kl_ce_mix", "independent_pruning", "random_init", "odpo_labels", "odpo_beta_rescale", "odpo_loop_as_loser")


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
        if not self.children:
            raise ConfigError("cascade.children is empty")
        names = [c.name for c in self.children]
        if len(set(names)) != len(names):
            raise ConfigError(f"cascade.children names must be unique, got {names}")
        unknown = set(self.stage_parallel) - set(STAGES)
        if unknown:
            raise ConfigError(f"cascade.stage_parallel has unknown stage(s) {sorted(unknown)}; allowed: {', '.join(STAGES)}")
        if self.until is not None and self.until not in self.order():
            raise ConfigError(f"until={'/'.join(self.until)} is not a stage of this cascade; allowed: "
                              + ", ".join("/".join(s) for s in self.order()))
        bad = set(self.ablations) - set(ABLATIONS)
        if bad:
            raise ConfigError(f"unknown ablation(s) {sorted(bad)}; allowed: {', '.join(ABLATIONS)}")
        if self.long.context is not None and self.long.context.original_context != self.short.train.seq_len:
            raise ConfigError(f"stage.distill_long.context.original_context={self.long.context.original_context} must equal "
                              f"stage.distill_short.train.seq_len={self.short.train.seq_len} (YaRN extends the short context)")
        if self.odpo is None and any(a.startswith("odpo_") for a in self.ablations):
            raise ConfigError(f"ablations={list(self.ablations)}: the online-DPO ablations need posttrain=true")
        if len({self.sft is None, self.pwrm is None, self.odpo is None}) > 1:
            raise ConfigError("post-training needs all of stage.sft_kd, stage.pwrm and stage.odpo (posttrain=true) or none")
        if self.pwrm_init not in PWRM_INITS:
            raise ConfigError(f"pwrm_init={self.pwrm_init!r}; allowed: {', '.join(PWRM_INITS)}")
        if self.odpo is not None:
            check_sampling_layout(self.layout("odpo"), "online DPO")
            if self.layout("pwrm").cp > 1:
                raise ConfigError(f"cascade.stage_parallel.pwrm.cp={self.layout('pwrm').cp}: the PWRM reads one position per "
                                  "row, which context parallelism splits over ranks; set it to 1")

    def order(self) -> list[tuple[str, str]]:
        """(child, stage) in the order they run; the PWRM once, under the first child, after its SFT."""
        order = []
        for index, child in enumerate(self.children):
            posttrain = () if self.sft is None else ("sft_kd", "pwrm", "odpo") if index == 0 else ("sft_kd", "odpo")
            order += [(child.name, stage) for stage in BASE_STAGES + posttrain]
        return order

    def training_stage(self, stage: str) -> DistillStage | SFTStage | PWRMStage | ODPOStage:
        """The settings of a training stage (every stage but prune)."""
        return {"distill_short": self.short, "distill_long": self.long, "sft_kd": self.sft, "pwrm": self.pwrm,
                "odpo": self.odpo}[stage]

    def layout(self, stage: str) -> ParallelConfig:
        return self.stage_parallel.get(stage, self.parallel)

    def child_configs(self, parent: MistralConfig) -> dict[str, MistralConfig]:
        """Each child's config, checked: it fits its parent's heads / TP and is strictly smaller than the model
        before it."""
        configs, previous = {}, parent
        for child in self.children:
            child.target.check_against(previous, self.layout("prune").tp)
            config = previous.replace(num_layers=child.num_layers, hidden_size=child.hidden_size,
                                      ffn_hidden_size=child.ffn_hidden_size, tie_embeddings=child.tie_embeddings)
            if config.num_parameters() >= previous.num_parameters():
                raise ConfigError(f"cascade child {child.name!r} has {config.num_parameters():,} parameters, not fewer "
                                  f"than the model before it ({previous.num_parameters():,}): each child must be smaller")
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
