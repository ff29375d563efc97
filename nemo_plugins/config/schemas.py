"""The structured-config schemas of every recipe: one root dataclass per ``conf/<recipe>.yaml``, whose fields are the
config groups' dataclasses (the stage settings, the data mixes, the parallel layout, the cluster, ...).

Each root YAML names its schema first in its defaults list (``- schema@_global_: distill``), so Hydra composes every
group file and override onto the schema and rejects an unknown key or a value of the wrong type with its full path
(``stage.distill.optimizer.lrr``) before the recipe runs; ``nemo_plugins.config.build.typed_config`` then builds the
root dataclass once (each group's ``__post_init__`` checks what a type cannot say). Groups that several recipes share
(a data mix, a stage kind) have one dataclass here or next to the code that reads it. None of them is frozen:
OmegaConf makes a frozen dataclass's node read-only, and Hydra could not compose the YAML files onto it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING

from nemo_plugins.cascade.launch import ClusterConfig
from nemo_plugins.cascade.plan import ChildSpec
from nemo_plugins.data.mix import SourceSpec
from nemo_plugins.data.pairwise import PairSampling
from nemo_plugins.distill.stage import DistillStage
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import DTYPES, ConfigError
from nemo_plugins.eval.humaneval import HumanEvalSettings
from nemo_plugins.eval.pass_at_k import ProblemsSettings
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget
from nemo_plugins.prune.stage import CalibrationData, PruneEval
from nemo_plugins.rl.grpo import GRPOStage
from nemo_plugins.rl.odpo import ODPOStage
from nemo_plugins.rl.pwrm import PWRMStage
from nemo_plugins.rl.rewards import RewardSettings
from nemo_plugins.rl.sft_kd import SFTStage


# ------------------------------------------------------------------------------------------------ groups
@dataclass
class ModelGroup:
    """``conf/model/*.yaml``: where the parent's weights are, and the shape it is declared to have (checked
    against the weights; null: read from them)."""

    source: str | None = None
    architecture: MistralConfig | None = None


@dataclass
class TokenData:
    """``conf/data/{demo,user_corpus,vision_demo}.yaml`` as ``data``: the pretraining-style token mix."""

    cache_dir: str = MISSING
    sources: list[SourceSpec] = MISSING
    heldout_fraction: float = 0.02
    require_prebuilt: bool = False
    max_image_side: int = 16384  # interleaved sources: an input image with a longer side (px) is refused
    calibration_paths: list[str] = field(default_factory=list)  # a user corpus's pruning statistics
    heldout_paths: list[str] = field(default_factory=list)  # ... and its held-out text (prune eval, long eval)

    def __post_init__(self) -> None:
        if self.max_image_side < 1:
            raise ConfigError(f"data.max_image_side={self.max_image_side} must be a positive number of pixels (the "
                              "longest side an input image may have; larger ones are refused with file:line)")


@dataclass
class ChatData:
    """``conf/data/{instruct_demo,reasoning_demo,reasoning_rl_demo,user_chat}.yaml``: a conversation mix."""

    cache_dir: str = MISSING
    sources: list[SourceSpec] = MISSING
    heldout_fraction: float = 0.05
    require_prebuilt: bool = False
    format: str = "hf_template"  # hf_template | tekken[:<file>] (nemo_plugins/data/chat.py)


@dataclass
class PairData:
    """``conf/data/pairwise_demo.yaml`` as ``pairs``: the PWRM's pairs (built, or read from ``file``)."""

    cache_dir: str = MISSING
    format: str = "hf_template"
    file: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    heldout_fraction: float = 0.2
    seed: int = 0
    sample_from: str | None = None
    sampling: PairSampling = field(default_factory=PairSampling)


@dataclass
class TextEvalData:
    """``recipes.evaluate task=perplexity``'s text: windows of ``seq_len`` tokens from ``paths``."""

    paths: list[str] = MISSING
    seq_len: int = 512
    max_windows: int = 32


@dataclass
class PruneMethod:
    """``conf/stage/prune.yaml``: how a child is pruned (its shape is the cascade's child or the prune recipe's
    ``stage.prune.target``)."""

    options: PruneOptions = field(default_factory=PruneOptions)
    calibration: CalibrationData = field(default_factory=CalibrationData)
    eval: PruneEval = field(default_factory=PruneEval)


@dataclass
class PruneOneChild(PruneMethod):
    """``recipes.prune``'s stage: the method and the one child's shape."""

    target: PruneTarget = MISSING


@dataclass
class CascadeSettings:
    """``conf/cascade/*.yaml``'s ``cascade`` node: the children in order, and per-stage overrides of ``parallel``
    (``{stage: {tp: 8, cp: 8, ...}}``, merged over ``parallel`` and checked as a layout)."""

    name: str = MISSING
    children: list[ChildSpec] = MISSING
    stage_parallel: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ReportSettings:
    sample_prompt: str = "import json\n\n\ndef read_config(path):\n"
    sample_tokens: int = 24


# The dtype of every model a run loads and trains (``dtype=bfloat16`` on GPUs); the stages' ``train.precision``
# follow it unless set on their own. Its members are the names ``errors.torch_dtype`` maps.
Dtype = StrEnum("Dtype", {name: name for name in DTYPES})


# ------------------------------------------------------------------------------------------------ roots
@dataclass
class CascadeStages:
    prune: PruneMethod = MISSING
    distill_short: DistillStage = MISSING
    distill_long: DistillStage = MISSING
    sft_kd: SFTStage = MISSING
    pwrm: PWRMStage = MISSING
    odpo: ODPOStage = MISSING
    reasoning_sft: SFTStage = MISSING
    grpo_stem: GRPOStage = MISSING
    grpo_general: GRPOStage = MISSING
    odpo_reasoning: ODPOStage = MISSING


@dataclass
class CascadeConfig:
    """``conf/cascade.yaml`` (``recipes.cascade``, ``recipes.plan``)."""

    model: ModelGroup = MISSING
    data: TokenData = MISSING
    stage: CascadeStages = field(default_factory=CascadeStages)
    chat_data: ChatData = MISSING
    pairs: PairData = MISSING
    reasoning_data: ChatData = MISSING
    problem_data: ChatData = MISSING
    parallel: ParallelConfig = MISSING
    cluster: ClusterConfig = MISSING
    cascade: CascadeSettings = MISSING
    output_dir: str = MISSING
    dtype: Dtype = Dtype.float32
    token_scale: float = 1.0
    until: str | None = None
    posttrain: bool = True
    reasoning: bool = II("posttrain")
    grpo_stem_sources: list[str] = field(default_factory=list)
    rubric_judge: str = "parent"
    pwrm_init: str = "parent"
    pwrm_pairs_from_policy: bool = False
    ablations: list[str] = field(default_factory=list)
    resume_with_changes: bool = False
    report: ReportSettings = field(default_factory=ReportSettings)


@dataclass
class TokenizeConfig(CascadeConfig):
    """``conf/tokenize.yaml``: the cascade's config (the run it prepares) and how to tokenise."""

    workers: int = 1
    parts: int | None = None
    shard: str | None = None
    chat: bool = True


@dataclass
class OneStageConfig:
    """What every single-stage recipe's config has: the parent (``model``: the teacher, or the start), the layout,
    the dtype, where the stage writes, and whether a resumed run may change its settings."""

    model: ModelGroup = MISSING
    parallel: ParallelConfig = MISSING
    dtype: Dtype = Dtype.float32
    output_dir: str = MISSING
    resume_with_changes: bool = False


@dataclass
class DistillStages:
    distill: DistillStage = MISSING


@dataclass
class DistillConfig(OneStageConfig):
    """``conf/distill.yaml`` (``recipes.distill``)."""

    data: TokenData = MISSING
    stage: DistillStages = field(default_factory=DistillStages)
    student: str | None = None
    cursor: str | None = None


@dataclass
class PruneStages:
    prune: PruneOneChild = MISSING


@dataclass
class PruneConfig:
    """``conf/prune.yaml`` (``recipes.prune``: no training state, so nothing to resume with changes)."""

    model: ModelGroup = MISSING
    stage: PruneStages = field(default_factory=PruneStages)
    parallel: ParallelConfig = MISSING
    dtype: Dtype = Dtype.float32
    output_dir: str = MISSING


@dataclass
class SFTStages:
    sft_kd: SFTStage = MISSING


@dataclass
class SFTConfig(OneStageConfig):
    """``conf/sft.yaml`` (``recipes.sft``)."""

    chat_data: ChatData = MISSING
    stage: SFTStages = field(default_factory=SFTStages)
    student: str | None = None
    chat_cursor: str | None = None


@dataclass
class PWRMStages:
    pwrm: PWRMStage = MISSING


@dataclass
class PWRMConfig(OneStageConfig):
    """``conf/pwrm.yaml`` (``recipes.pwrm``)."""

    pairs: PairData = MISSING
    stage: PWRMStages = field(default_factory=PWRMStages)
    source: str | None = None


@dataclass
class SampledStageConfig(OneStageConfig):
    """A stage that samples from its policy on a chat mix's prompts and grades the answers (online DPO, GRPO).
    ``judge``: ``{_target_: ...}``, instantiated by Hydra once the process group exists."""

    chat_data: ChatData = MISSING
    policy: str | None = None
    reference: str | None = None
    judge: Any = None
    chat_cursor: str | None = None


@dataclass
class ODPOStages:
    odpo: ODPOStage = MISSING


@dataclass
class ODPOConfig(SampledStageConfig):
    """``conf/odpo.yaml`` (``recipes.odpo``)."""

    stage: ODPOStages = field(default_factory=ODPOStages)


@dataclass
class GRPOStages:
    grpo: GRPOStage = MISSING
    sft_kd: SFTStage = MISSING  # the stage the policy was SFT'd with: its system prompt screens the problems


@dataclass
class GRPOConfig(SampledStageConfig):
    """``conf/grpo.yaml`` (``recipes.grpo``). ``rewards``: null, or ``{_target_: ...}`` replacing the graders."""

    stage: GRPOStages = field(default_factory=GRPOStages)
    rewards: Any = None


class Task(StrEnum):
    perplexity = "perplexity"
    problems = "problems"
    humaneval = "humaneval"


@dataclass
class EvaluateConfig:
    """``conf/evaluate.yaml`` (``recipes.evaluate``): one task on one model."""

    model: ModelGroup = MISSING
    parallel: ParallelConfig = MISSING
    chat_data: ChatData = MISSING
    task: Task = Task.perplexity
    dtype: Dtype = Dtype.float32
    output: str = MISSING
    data: TextEvalData = field(default_factory=TextEvalData)
    micro_batch_size: int = 4
    problems: ProblemsSettings = field(default_factory=ProblemsSettings)
    rewards: RewardSettings = field(default_factory=RewardSettings)
    judge: str | None = None
    humaneval: HumanEvalSettings = field(default_factory=HumanEvalSettings)


SCHEMAS: dict[str, type] = {"cascade": CascadeConfig, "tokenize": TokenizeConfig, "distill": DistillConfig,
                            "prune": PruneConfig, "sft": SFTConfig, "pwrm": PWRMConfig, "odpo": ODPOConfig,
                            "grpo": GRPOConfig, "evaluate": EvaluateConfig}


def register_schemas() -> None:
    """Store every root schema in Hydra's ConfigStore as ``schema/<recipe>`` (the root YAMLs name them first in
    their defaults list); called by the entry points before composing, idempotent."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(group="schema", name=name, node=schema)
