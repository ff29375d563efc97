"""Instruct stage 1: SFT with logit distillation. The pretraining forward KL, masked to assistant tokens, from a
teacher that may be any model with the student's tokenizer (the paper: Mistral Medium 3; the demo: the parent).

It is the distillation step on the one training loop; only the data (a chat mix whose rows carry an assistant
target mask) and the report (assistant-token KL / perplexity and chat samples) differ from pretraining distillation.

Reasoning SFT (``conf/stage/reasoning_sft.yaml``) is this stage on reasoning data with two more settings, both
applied when the chat mix renders its sources (``SFTScreen``): ``filters`` (``rl/filters.py``: records with a
truncated or badly formatted trace, excessive repetition or a script switch are dropped, and counted per filter
and reason in the manifest's ``chat_data``) and ``system_prompt`` (put first in every conversation, before a system
message it already has). ``kl.ce_weight: 1.0`` makes it plain SFT (the teacher's forward still runs, unused).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nemo_plugins.convert.sources import ModelSource, load_model, source_config
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.tokenizer import same_tokenizer
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.stage import check_teacher_student, finish_training_stage, prepare_stage
from nemo_plugins.distill.step import train_with_distillation
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, typed_stage
from nemo_plugins.eval.chat_samples import chat_samples
from nemo_plugins.generation.torch_engine import generation_layout
from nemo_plugins.rl.filters import FilterSettings, screen
from nemo_plugins.train.config import OptimizerSettings, TrainSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatSampleSettings:
    """Greedy answers to a few prompts, before and after the stage, for the report."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    tools: bool = False  # offer the default tools (calculator, sandboxed Python) and run the calls the model makes

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class SFTStage:
    name: str
    train: TrainSettings
    optimizer: OptimizerSettings
    kl: KLOptions
    teacher: str | None = None  # a model source; None: the parent
    sample: ChatSampleSettings = field(default_factory=ChatSampleSettings)
    system_prompt: str | None = None  # put first in every training conversation (the reasoning system prompt)
    filters: FilterSettings | None = None  # reasoning-trace filters applied when the data is rendered; None: none

    def __post_init__(self) -> None:
        if self.teacher is not None:
            ModelSource.parse(self.teacher)
        if self.system_prompt is not None and not self.system_prompt.strip():
            raise ConfigError("stage.sft_kd.system_prompt is empty: give the prompt's text, or null for none")

    def data_screen(self) -> "SFTScreen | None":
        """What the chat mix applies to this stage's records when it renders them (None: records as they are)."""
        if self.system_prompt is None and self.filters is None:
            return None
        return SFTScreen(self.system_prompt, self.filters)

    @classmethod
    def from_config(cls, node, key: str) -> "SFTStage":
        return typed_stage(cls, node, key)

    def teacher_source(self, parent: ModelSource) -> ModelSource:
        return ModelSource.parse(self.teacher) if self.teacher else parent


@dataclass(frozen=True)
class SFTScreen:
    """The chat mix's ``RecordScreen`` for an SFT stage: its filters reject, its system prompt is prepended."""

    system_prompt: str | None
    filters: FilterSettings | None

    def fingerprint(self) -> str:
        return repr((self.system_prompt, self.filters.fingerprint() if self.filters else None))

    def reject(self, record: dict) -> tuple[str, str] | None:
        return screen(record, self.filters) if self.filters is not None else None

    def prepare(self, record: dict) -> dict:
        """The record with the system prompt first: a system message of its own, or before the one it has."""
        if self.system_prompt is None:
            return record
        messages = list(record["messages"])
        if messages and messages[0].get("role") == "system":
            messages[0] = {**messages[0], "content": f"{self.system_prompt}\n\n{messages[0].get('content') or ''}"}
        else:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {**record, "messages": messages}


def check_screen(stage: SFTStage, chat: ChatMix) -> None:
    """The stage's filters and system prompt act when the mix renders its sources: a mix rendered without them (or
    with another stage's) would train on unscreened data silently, so it is refused."""
    data_screen = stage.data_screen()
    expected = data_screen.fingerprint() if data_screen is not None else None
    for source in chat.sources:
        if source.data.file.metadata.get("screen") != expected:
            raise ConfigError(f"chat source {source.name!r} was rendered without stage {stage.name!r}'s filters and "
                              "system prompt: build the chat mix with screen=stage.data_screen()")


def check_tokenizers(teacher_dir: Path, student_dir: Path) -> None:
    """Logit distillation compares distributions id by id: both models must use one tokenizer."""
    if not same_tokenizer(teacher_dir, student_dir):
        raise ConfigError(f"the SFT teacher's tokenizer ({teacher_dir}) differs from the student's ({student_dir}): "
                          "logit distillation needs the same vocabulary; pick a teacher of the student's family "
                          "(stage.sft_kd.teacher)")


def sample_model(source: ModelSource, parallel: ParallelConfig, dtype: torch.dtype, chat_format: ChatFormat,
                 stage: SFTStage) -> list[dict]:
    """Chat samples of ``source``, loaded in the generation layout of ``parallel`` (the engine decodes one token
    per step: no pipeline, context or sequence parallelism), so any training layout can report samples."""
    layout = generation_layout(parallel)
    initialize(layout, stage.train.seed)
    _, model = load_model(source, layout, dtype)
    return chat_samples(model, chat_format, stage.sample)


def stage_facts(stage: SFTStage, teacher_source: ModelSource, student_source: ModelSource, chat: ChatMix,
                chat_format: ChatFormat) -> dict:
    """What an SFT stage adds to the loop's fingerprint (``train/facts.py``): loss settings, both models' sources,
    the chat format and the chat mix's identity (chat samples are a report, not part of the trajectory)."""
    data_screen = stage.data_screen()
    return {"stage": {"name": stage.name, "kl": dataclasses.asdict(stage.kl),
                      **({"data_screen": data_screen.fingerprint()} if data_screen else {})}, "teacher": str(teacher_source),
            "student": str(student_source), "chat_format": chat_format.name, "data": chat.identity()}


def run_sft_stage(stage: SFTStage, teacher_source: ModelSource, student_source: ModelSource, chat: ChatMix,
                  chat_format: ChatFormat, tokenizer_dir: Path, teacher_tokenizer_dir: Path, cursor: Cursor,
                  out_dir: Path, parallel: ParallelConfig, manifest_extra: dict | None = None,
                  resume_with_changes: bool = False, before_work: Callable[[], None] | None = None) -> dict:
    """Train ``student_source`` on the chat mix ``chat`` against ``teacher_source``; returns the stage's manifest
    (its ``checkpoint`` is the instruct model). ``before_work`` runs once the checks have passed, before anything
    is loaded or written; a finished stage with the same fingerprint is returned as it is."""
    started = time.monotonic()
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    s_config, t_config = source_config(student_source), source_config(teacher_source)
    check_teacher_student(t_config, s_config)
    check_tokenizers(teacher_tokenizer_dir, tokenizer_dir)
    check_screen(stage, chat)
    if chat_format.vocab_size > s_config.vocab_size:
        raise ConfigError(f"the chat format {chat_format.name} emits ids up to {chat_format.vocab_size} but the model's "
                          f"vocabulary has {s_config.vocab_size}: set chat_data.format to the model's own (hf_template)")
    facts, done = prepare_stage(stage.name, stage.train, stage.optimizer,
                                stage_facts(stage, teacher_source, student_source, chat, chat_format), chat, cursor,
                                out_dir, resume_with_changes, before_work)
    if done is not None:
        return done
    samples = {"before": sample_model(student_source, parallel, dtype, chat_format, stage)}
    initialize(parallel, stage.train.seed)
    _, teacher_model = load_model(teacher_source, parallel, dtype)
    _, student = load_model(student_source, parallel, dtype, speed=stage.train.speed)
    result = train_with_distillation(student, s_config, Teacher(teacher_model), chat, stage.train, stage.optimizer,
                                     stage.kl, out_dir, cursor, tokenizer_dir, stage.name, facts)
    del teacher_model, student
    samples["after"] = sample_model(ModelSource("megatron", result["checkpoint"]), parallel, dtype, chat_format, stage)
    extra = {**(manifest_extra or {}), "chat_data": chat.stats(stage.train.seq_len), "samples": samples}
    return finish_training_stage(stage, teacher_source, student_source, s_config, t_config, result, started, out_dir,
                                 extra, "held-out assistant-token KL")
