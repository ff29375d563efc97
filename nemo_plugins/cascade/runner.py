"""Algorithm 1: for each child, prune the previous child's short-context checkpoint (the parent first), distill at
short context, extend to long context; the parent teaches every stage and the data cursor never rewinds. Then,
when post-training is on, the Instruct branch: the long-context base goes through SFT with logit distillation on
the chat mix, then online DPO from that SFT model (its reference) on the chat mix's next prompts, judged by the
pairwise reward model; the chat cursor runs once across all of it (child 1 SFT, child 1 ODPO, child 2 SFT, ...).
The PWRM is trained once, after the first child's SFT (``plan.py`` says from what), into ``<run>/pwrm/``; every
child's ODPO (``<run>/<child>/instruct_odpo/``) loads it from that manifest. SFT and ODPO results are exported to
Hugging Face (``<stage dir>/hf``).

When the Reasoning branch is on, each child's long-context base also goes through it (``plan.py``): reasoning SFT
on the screened reasoning mix (its own cursor, once across all children), then GRPO STEM on the problem mix's STEM
sources, GRPO General on all of them (rubric items answered by ``plan.rubric_judge``) and online DPO with the
thinking stripped, judged by the cascade's PWRM; the three read the problem mix with ONE cursor, once across all
children (child 1 STEM, General, ODPO, child 2 STEM, ...). Their folders are ``<run>/<child>/reasoning_*/``
(``REASONING_DIRS``), each exported to Hugging Face like the Instruct stages.

Every stage writes ``<run>/<child>/<stage>/`` and, last, its ``manifest.json``: re-running skips stages that have
one and resumes the one that does not from its newest checkpoint. Check first, write after: a stage finished (or
checkpointed) with another fingerprint is refused before anything is written, the data is checked against what
the whole cascade will read before the first stage, and ``resolved_config.yaml`` is written by the first step of
this invocation that does work (a refused or all-skipped rerun leaves it as it was).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nemo_plugins.cascade.plan import REASONING_DIRS, CascadePlan, ChildSpec
from nemo_plugins.convert.model_io import export_hf
from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat import ChatFormat, load_chat_format
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.mix import Cursor, DataMix, check_data_budget
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.distill.stage import DistillStage, long_context_eval, run_stage
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import DataError
from nemo_plugins.eval.generate import greedy_generate
from nemo_plugins.generation.torch_engine import generation_layout
from nemo_plugins.manifest import finished_stage, read_json, write_json_atomic
from nemo_plugins.prune.pipeline import PruneOptions
from nemo_plugins.prune.stage import CalibrationData, PruneEval, prune_stage_config, run_prune_stage
from nemo_plugins.rl.grpo import run_grpo_stage
from nemo_plugins.rl.odpo import run_odpo_stage
from nemo_plugins.rl.pwrm import load_judge, run_pwrm_stage
from nemo_plugins.rl.rewards import Rewards, build_rewards
from nemo_plugins.rl.rewards.rubric import load_judge as load_rubric_judge
from nemo_plugins.rl.sft_kd import run_sft_stage
from nemo_plugins.vision.checkpoint import export_mistral3, load_source_model, source_vision

logger = logging.getLogger(__name__)

HF_EXPORT = "hf"
RESOLVED_CONFIG = "resolved_config.yaml"
SAMPLE = "sample.json"
EXPORTED = "export.json"
INSTRUCT_SFT = "instruct_sft"
INSTRUCT_ODPO = "instruct_odpo"
PWRM = "pwrm"
PARENT_LONG_CONTEXT = "parent_long_context.json"
TEACHER_HELDOUT = "teacher_heldout"  # the parent's held-out pass, shared by every child's distillation stages


@dataclass
class CascadeInputs:
    """What every stage shares: the parent (teacher), data, tokenizer, prune settings, output root."""

    parent: ModelSource
    mix: DataMix
    tokenizer: object
    tokenizer_dir: Path
    prune_options: PruneOptions
    calibration: CalibrationData
    prune_eval: PruneEval
    out_dir: Path
    dtype: torch.dtype
    sample_prompt: str
    sample_tokens: int
    seed: int
    chat: ChatMix | None = None  # the SFT conversations, when post-training is on
    chat_format: ChatFormat | None = None
    pairs: "PairData | None" = None  # the PWRM's pairs, when a branch runs online DPO
    reasoning_chat: ChatMix | None = None  # the reasoning SFT mix (screened by its stage), when Reasoning is on
    problems: ChatMix | None = None  # GRPO's and the reasoning ODPO's problem mix, when Reasoning is on
    resolved_config: str | None = None  # the run's config as YAML, written by the first step that does work
    resume_with_changes: bool = False
    config_recorded: bool = field(default=False, init=False)


@dataclass(frozen=True)
class PairData:
    """The PWRM's pairwise data: ``load(sample_from, layout, seed)`` returns the pairs (answers sampled from the
    model source ``sample_from`` where it is given) and what the manifest records of them; ``chat_format`` is the
    format spec the PWRM renders its input with."""

    load: Callable[[ModelSource | None, ParallelConfig, int], tuple[list, dict]]
    chat_format: str


def record_config(inputs: CascadeInputs) -> None:
    """Write ``resolved_config.yaml`` once per invocation, when the first step starts work (not before: a rerun
    refused for a changed config must leave the record of the run that did the work)."""
    if inputs.config_recorded or inputs.resolved_config is None:
        return
    inputs.config_recorded = True
    if dist.get_rank() == 0:
        inputs.out_dir.mkdir(parents=True, exist_ok=True)
        (inputs.out_dir / RESOLVED_CONFIG).write_text(inputs.resolved_config)


def megatron_source(checkpoint: str) -> ModelSource:
    return ModelSource("megatron", str(checkpoint))


def check_data_budget_of_cascade(inputs: CascadeInputs, plan: CascadePlan) -> None:
    """Before the first stage: the text mix holds the tokens every distillation stage up to ``until`` reads (a bound:
    each stage's exact check, at its own row length, comes when it starts), and the chat mix every SFT row (exact:
    the SFT stages of all children read rows of one length from one continuing cursor)."""
    stages = plan.order()[: plan.order().index(plan.until) + 1] if plan.until else plan.order()
    text = sum(plan.training_stage(s).train.steps * plan.training_stage(s).train.tokens_per_step
               for _, s in stages if s in ("distill_short", "distill_long"))
    available = inputs.mix.train_tokens_left(Cursor())
    if text > available:
        raise DataError(f"the cascade's distillation stages read {text} training tokens but the data mix's training "
                        f"split holds {available} (single pass, no repetition): add data or lower the stages' "
                        "train_tokens (or token_scale)")
    for stage, chat in (("sft_kd", inputs.chat), ("reasoning_sft", inputs.reasoning_chat)):
        runs = sum(1 for _, s in stages if s == stage)
        if runs:
            train = plan.training_stage(stage).train
            check_data_budget(chat, Cursor(), runs * train.steps * train.global_batch_size, train.seq_len,
                              f"stage.{stage}.train.train_tokens (or token_scale)")
    check_problem_budget(inputs, plan, [s for _, s in stages])


def _problems_read(plan: CascadePlan, stages: list[str], names: tuple[str, ...]) -> tuple[int, int]:
    """(problems, longest row) the stages among ``names`` read, one per prompt (a lower bound for a filtered
    GRPO stage: it screens more than it keeps)."""
    specs = [plan.training_stage(s) for s in stages if s in names]
    problems = sum(s.train.steps * s.train.global_batch_size for s in specs)
    return problems, max((s.train.seq_len for s in specs), default=0)


def check_problem_budget(inputs: CascadeInputs, plan: CascadePlan, stages: list[str]) -> None:
    """Before the first stage: the problem mix holds a prompt for every GRPO and reasoning-ODPO step of every child
    up to ``until`` (one cursor, single pass), and its STEM sources one for every STEM step."""
    if inputs.problems is None:
        return
    for mix, names, key in ((stem_problems(inputs, plan), ("grpo_stem",), "grpo_stem_sources"),
                            (inputs.problems, ("grpo_stem", "grpo_general", "odpo_reasoning"), "problem_data.sources")):
        needed, seq_len = _problems_read(plan, stages, names)
        if needed:
            check_data_budget(ChatPrompts(mix, 0, Cursor(), 1), Cursor(), needed, seq_len,
                              f"the reasoning stages' train_tokens (or add problems to {key})")


def stem_problems(inputs: CascadeInputs, plan: CascadePlan) -> ChatMix:
    """The problem mix narrowed to ``plan.grpo_stem_sources`` (same token files: the one cursor stays valid)."""
    problems = inputs.problems
    return ChatMix([s for s in problems.sources if s.name in plan.grpo_stem_sources], problems.heldout_fraction,
                   problems.pad_id)


def prune_child(inputs: CascadeInputs, plan: CascadePlan, child: ChildSpec, parent: ModelSource,
                stage_dir: Path) -> dict:
    stage = prune_stage_config(child.target, inputs.prune_options, inputs.calibration, inputs.prune_eval)
    fingerprint = {"stage": stage, "parent": str(parent)}
    done = finished_stage(stage_dir, fingerprint, inputs.resume_with_changes)
    if done is not None:
        return done
    record_config(inputs)
    initialize(plan.layout("prune"), inputs.seed)
    return run_prune_stage(parent, child.target, inputs.prune_options, inputs.calibration, inputs.prune_eval, stage_dir,
                           plan.layout("prune"), inputs.dtype,
                           manifest_extra={"child": child.name, "input": str(parent), "fingerprint": fingerprint})


def distill_child(inputs: CascadeInputs, plan: CascadePlan, stage: DistillStage, child: ChildSpec, student: ModelSource,
                  cursor: Cursor, stage_dir: Path) -> dict:
    parallel = plan.layout(stage.name)

    def start() -> None:
        record_config(inputs)
        initialize(parallel, stage.train.seed)

    return run_stage(stage, inputs.parent, student, inputs.mix, inputs.tokenizer, inputs.tokenizer_dir, cursor,
                     stage_dir, parallel, manifest_extra={"child": child.name, "input": str(student)},
                     resume_with_changes=inputs.resume_with_changes, before_work=start,
                     heldout_cache=inputs.out_dir / TEACHER_HELDOUT)


def _write_hf(inputs: CascadeInputs, plan: CascadePlan, checkpoint: str, stage: str, hf_dir: Path):
    """Load ``checkpoint`` in the generation layout of ``stage`` (its TP, no PP / CP / SP: the export samples
    from it) and write it as a Hugging Face directory; returns the model."""
    layout = generation_layout(plan.layout(stage))
    initialize(layout, inputs.seed)
    source = megatron_source(checkpoint)
    config, model = load_source_model(source, layout, inputs.dtype)
    # streamed to rank 0 tensor by tensor; the runner owns the export folder: a rerun after a kill before the
    # sample replaces its own export. A vision-language child is a Mistral3 directory (the parent's encoder, its
    # own projector)
    vision = source_vision(source)
    extra_files = tokenizer_files(inputs.tokenizer_dir)
    if vision is not None:
        export_mistral3(model, config, vision, hf_dir, extra_files=extra_files, overwrite=True)
    else:
        export_hf(model, config, hf_dir, extra_files=extra_files, overwrite=True)
    return model


def export_child(inputs: CascadeInputs, plan: CascadePlan, checkpoint: str, child_dir: Path) -> dict:
    """The child's final base model as a Hugging Face directory, plus a greedy sample for the report."""
    sample_path = child_dir / SAMPLE
    finished = read_json(sample_path)
    if finished is not None:
        return finished
    record_config(inputs)
    model = _write_hf(inputs, plan, checkpoint, "distill_long", child_dir / HF_EXPORT)
    completion = greedy_generate(model, inputs.tokenizer, inputs.sample_prompt, inputs.sample_tokens)
    sample = {"prompt": inputs.sample_prompt, "completion": completion, "hf_dir": str(child_dir / HF_EXPORT)}
    if dist.get_rank() == 0:
        write_json_atomic(sample_path, sample)
    dist.barrier()
    return sample


def export_stage(inputs: CascadeInputs, plan: CascadePlan, done: dict, stage: str, stage_dir: Path) -> None:
    """A finished post-training stage's model as ``<stage dir>/hf`` (once: ``export.json`` marks it done)."""
    if read_json(stage_dir / EXPORTED) is None:
        record_config(inputs)
        _write_hf(inputs, plan, done["checkpoint"], stage, stage_dir / HF_EXPORT)
        if dist.get_rank() == 0:
            write_json_atomic(stage_dir / EXPORTED, {"hf_dir": str(stage_dir / HF_EXPORT)})
        dist.barrier()


def sft_child(inputs: CascadeInputs, plan: CascadePlan, child: ChildSpec, base: ModelSource, cursor: Cursor,
              stage_dir: Path, stage_name: str = "sft_kd") -> dict:
    """SFT (with logit distillation unless the stage is plain) of the child's long-context base on the branch's
    chat mix (``sft_kd``: Instruct; ``reasoning_sft``: Reasoning), then its Hugging Face export."""
    stage = plan.training_stage(stage_name)
    chat = inputs.chat if stage_name == "sft_kd" else inputs.reasoning_chat
    teacher = stage.teacher_source(inputs.parent)
    done = run_sft_stage(stage, teacher, base, chat, inputs.chat_format, inputs.tokenizer_dir,
                         tokenizer_dir(teacher), cursor, stage_dir, plan.layout(stage_name),
                         manifest_extra={"child": child.name, "input": str(base)},
                         resume_with_changes=inputs.resume_with_changes, before_work=lambda: record_config(inputs))
    export_stage(inputs, plan, done, stage_name, stage_dir)
    return done


def train_pwrm(inputs: CascadeInputs, plan: CascadePlan, first_sft: dict) -> dict:
    """The cascade's one pairwise reward model, from the parent or the first child's SFT model (``plan.pwrm_init``),
    on the pair data (answered by that SFT model when ``plan.pwrm_pairs_from_policy``); calibrated."""
    stage, layout = plan.pwrm, plan.layout("pwrm")
    sft_model = megatron_source(first_sft["checkpoint"])
    source = inputs.parent if plan.pwrm_init == "parent" else sft_model
    initialize(layout, stage.train.seed)
    pairs, record = inputs.pairs.load(sft_model if plan.pwrm_pairs_from_policy else None, layout, stage.train.seed)
    source_tokenizer = tokenizer_dir(source)
    return run_pwrm_stage(stage, source, pairs, load_chat_format(inputs.pairs.chat_format, source_tokenizer),
                          inputs.pairs.chat_format, source_tokenizer, inputs.out_dir / PWRM, layout,
                          manifest_extra={"init": plan.pwrm_init, "pair_data": record},
                          resume_with_changes=inputs.resume_with_changes, before_work=lambda: record_config(inputs))


def odpo_child(inputs: CascadeInputs, plan: CascadePlan, child: ChildSpec, start: dict, pwrm: dict, cursor: Cursor,
               stage_dir: Path, stage_name: str = "odpo") -> dict:
    """Online DPO of the branch's model so far (``start``'s checkpoint, also the frozen reference) judged by the
    cascade's PWRM, then its Hugging Face export: ``odpo`` on the chat mix after Instruct SFT, ``odpo_reasoning``
    on the problem mix after GRPO General. The judge's fingerprint is the PWRM's checkpoint and temperature: a
    retrained PWRM is a changed setting."""
    policy = megatron_source(start["checkpoint"])
    manifest = str(inputs.out_dir / PWRM / "manifest.json")
    judge = {"pwrm": pwrm["checkpoint"], "tau": pwrm["calibration"]["tau"]}
    chat = inputs.chat if stage_name == "odpo" else inputs.problems
    done = run_odpo_stage(plan.training_stage(stage_name), policy, policy, judge,
                          lambda: load_judge(manifest, str(policy), plan.pwrm.score_micro_batch_size), chat,
                          inputs.chat_format, inputs.tokenizer_dir, inputs.tokenizer_dir, cursor, stage_dir,
                          plan.layout(stage_name), manifest_extra={"child": child.name, "input": str(policy)},
                          resume_with_changes=inputs.resume_with_changes, before_work=lambda: record_config(inputs))
    export_stage(inputs, plan, done, stage_name, stage_dir)
    return done


def rubric_judge_source(inputs: CascadeInputs, plan: CascadePlan) -> ModelSource:
    return inputs.parent if plan.rubric_judge == "parent" else ModelSource.parse(plan.rubric_judge)


def grpo_child(inputs: CascadeInputs, plan: CascadePlan, child: ChildSpec, start: dict, cursor: Cursor,
               stage_name: str, stage_dir: Path) -> dict:
    """GRPO of the branch's model so far (``start``'s checkpoint) on the problem mix (``grpo_stem``: its STEM
    sources, verifiable rewards only; ``grpo_general``: every source, rubric items answered by the rubric judge),
    then its Hugging Face export. The judge's source is part of the stage's fingerprint."""
    stage = plan.training_stage(stage_name)
    policy = megatron_source(start["checkpoint"])
    judge = str(rubric_judge_source(inputs, plan)) if stage_name == "grpo_general" else None
    problems = stem_problems(inputs, plan) if stage_name == "grpo_stem" else inputs.problems

    def make_rewards() -> Rewards:
        graders = None if judge is None else load_rubric_judge(judge, stage.rewards.rubric, inputs.dtype)
        return build_rewards(stage.rewards, graders)

    done = run_grpo_stage(stage, policy, policy, {"rewards": None, "judge": judge}, make_rewards, problems,
                          inputs.chat_format, inputs.tokenizer_dir, inputs.tokenizer_dir, cursor, stage_dir,
                          plan.layout(stage_name), manifest_extra={"child": child.name, "input": str(policy)},
                          resume_with_changes=inputs.resume_with_changes, before_work=lambda: record_config(inputs))
    export_stage(inputs, plan, done, stage_name, stage_dir)
    return done


def parent_long_context(inputs: CascadeInputs, plan: CascadePlan) -> dict | None:
    """The parent's long-context numbers at the long stage's length: the reference the children aim at."""
    if plan.long.long_eval is None:
        return None
    path = inputs.out_dir / PARENT_LONG_CONTEXT
    finished = read_json(path)
    if finished is not None:
        return finished
    record_config(inputs)
    initialize(plan.layout("distill_long"), inputs.seed)
    _, model = load_model(inputs.parent, plan.layout("distill_long"), inputs.dtype)
    result = long_context_eval(model, inputs.tokenizer, plan.long)
    if dist.get_rank() == 0:
        write_json_atomic(path, result)
    dist.barrier()
    return result


@dataclass
class BranchState:
    """What the post-training branches carry from child to child: their data cursors and the one PWRM."""

    chat: Cursor = field(default_factory=Cursor)  # the Instruct chat mix
    reasoning: Cursor = field(default_factory=Cursor)  # the reasoning SFT mix
    problems: Cursor = field(default_factory=Cursor)  # the problem mix (GRPO STEM, General, reasoning ODPO)
    pwrm: dict | None = None  # the cascade's PWRM manifest, trained after the first child's first SFT stage


def pwrm_after_sft(inputs: CascadeInputs, plan: CascadePlan, done: dict, sft: dict, state: BranchState) -> bool:
    """Train the PWRM after the first SFT stage of the cascade (once); True when ``until`` stops the run there."""
    if state.pwrm is not None:
        return False
    state.pwrm = done["pwrm"] = train_pwrm(inputs, plan, sft)
    return plan.until is not None and plan.until[1] == "pwrm"


def reasoning_branch(inputs: CascadeInputs, plan: CascadePlan, child: ChildSpec, done: dict,
                     state: BranchState) -> bool:
    """The Reasoning branch of one child from its long-context base; True when ``until`` stops the run in it."""
    child_dir = inputs.out_dir / child.name
    done["reasoning_sft"] = sft_child(inputs, plan, child, megatron_source(done["distill_long"]["checkpoint"]),
                                      state.reasoning, child_dir / REASONING_DIRS["reasoning_sft"], "reasoning_sft")
    state.reasoning = Cursor.from_dict(done["reasoning_sft"]["cursor_end"])
    if plan.until == (child.name, "reasoning_sft") or pwrm_after_sft(inputs, plan, done, done["reasoning_sft"], state):
        return True
    previous = done["reasoning_sft"]
    for stage in ("grpo_stem", "grpo_general"):
        previous = done[stage] = grpo_child(inputs, plan, child, previous, state.problems, stage,
                                            child_dir / REASONING_DIRS[stage])
        state.problems = Cursor.from_dict(previous["cursor_end"])
        if plan.until == (child.name, stage):
            return True
    done["odpo_reasoning"] = odpo_child(inputs, plan, child, previous, state.pwrm, state.problems,
                                        child_dir / REASONING_DIRS["odpo_reasoning"], "odpo_reasoning")
    state.problems = Cursor.from_dict(done["odpo_reasoning"]["cursor_end"])
    return plan.until == (child.name, "odpo_reasoning")


def run_cascade(inputs: CascadeInputs, plan: CascadePlan) -> dict:
    """All stages in order (or up to ``plan.until``); returns every stage's manifest per child."""
    check_data_budget_of_cascade(inputs, plan)
    results: dict[str, dict] = {}
    cursor, state = Cursor(), BranchState()
    parent = inputs.parent
    for child in plan.children:
        child_dir = inputs.out_dir / child.name
        done: dict = {}
        results[child.name] = done
        done["prune"] = prune_child(inputs, plan, child, parent, child_dir / "prune")
        if plan.until == (child.name, "prune"):
            break
        done["distill_short"] = distill_child(inputs, plan, plan.short, child,
                                              megatron_source(done["prune"]["checkpoint"]), cursor,
                                              child_dir / "distill_short")
        cursor = Cursor.from_dict(done["distill_short"]["cursor_end"])
        if plan.until == (child.name, "distill_short"):
            break
        done["distill_long"] = distill_child(inputs, plan, plan.long, child,
                                             megatron_source(done["distill_short"]["checkpoint"]), cursor,
                                             child_dir / "distill_long")
        cursor = Cursor.from_dict(done["distill_long"]["cursor_end"])
        done["export"] = export_child(inputs, plan, done["distill_long"]["checkpoint"], child_dir)
        parent = megatron_source(done["distill_short"]["checkpoint"])  # Alg. 1: the next child starts from SHORT
        if plan.until == (child.name, "distill_long"):
            break
        if plan.sft is not None:
            done["sft_kd"] = sft_child(inputs, plan, child, megatron_source(done["distill_long"]["checkpoint"]),
                                       state.chat, child_dir / INSTRUCT_SFT)
            state.chat = Cursor.from_dict(done["sft_kd"]["cursor_end"])
            if plan.until == (child.name, "sft_kd") or pwrm_after_sft(inputs, plan, done, done["sft_kd"], state):
                break
            done["odpo"] = odpo_child(inputs, plan, child, done["sft_kd"], state.pwrm, state.chat,
                                      child_dir / INSTRUCT_ODPO)
            state.chat = Cursor.from_dict(done["odpo"]["cursor_end"])
            if plan.until == (child.name, "odpo"):
                break
        if plan.reasoning_sft is not None and reasoning_branch(inputs, plan, child, done, state):
            break
    return results
