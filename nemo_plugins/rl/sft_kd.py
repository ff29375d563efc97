"""Instruct stage 1: SFT with logit distillation. The pretraining forward KL, masked to assistant tokens, from a
teacher that may be any model with the student's tokenizer (the paper: Mistral Medium 3; the demo: the parent).

It is the distillation step on the one training loop; only the data (a chat mix whose rows carry an assistant
target mask) and the report (assistant-token KL / perplexity and chat samples) differ from pretraining distillation.

Reasoning SFT (``conf/stage/reasoning_sft.yaml``) is this stage on reasoning data with two more settings, both
applied when the chat mix renders its sources (``SFTScreen``): ``filters`` (``rl/filters.py``: records with a
truncated or badly formatted trace, excessive repetition or a script switch are dropped, and counted per filter
and reason in the manifest's ``chat_data``) and ``system_prompt`` (put first in every conversation, before a system
message it already has).

``kl.ce_weight: 1.0`` makes it plain SFT: next-token cross-entropy on the assistant tokens (``PlainSFTStep``), held-out
assistant-token loss and perplexity (``heldout_nll``); the teacher is neither loaded nor run (its logits would be
multiplied by 0), and it is not part of the stage's fingerprint.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_plugins.convert.sources import ModelSource, source_config
from nemo_plugins.data.batches import local_batch
from nemo_plugins.data.chat import ChatFormat
from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.mix import Cursor
from nemo_plugins.data.tokenizer import same_tokenizer
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.stage import check_teacher_student, finish_training_stage, prepare_stage
from nemo_plugins.distill.step import (
    mean_loss_schedule,
    require_per_token_loss,
    split_micro_batches,
    train_with_distillation,
    use_per_token_loss,
)
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.eval.chat_samples import chat_samples
from nemo_plugins.generation.torch_engine import generation_layout
from nemo_plugins.manifest import write_manifest
from nemo_plugins.model.forward import forward_only
from nemo_plugins.parallel_ops import sum_from_last_stage
from nemo_plugins.rl.filters import FilterSettings, screen
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.facts import RunFacts
from nemo_plugins.train.loop import TrainingRun
from nemo_plugins.vision.checkpoint import load_source_model

logger = logging.getLogger(__name__)


@dataclass
class ChatSampleSettings:
    """Greedy answers to a few prompts, before and after the stage, for the report."""

    prompts: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    tools: bool = False  # offer the default tools (calculator, sandboxed Python) and run the calls the model makes

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
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

    def prompt_screen(self) -> "SFTScreen | None":
        """The screen of the prompts a model trained by this stage answers later (GRPO, online DPO): its system
        prompt, no filter (a problem is not a trace to judge)."""
        return None if self.system_prompt is None else SFTScreen(self.system_prompt, None)

    def teacher_source(self, parent: ModelSource) -> ModelSource:
        return ModelSource.parse(self.teacher) if self.teacher else parent

    @property
    def plain(self) -> bool:
        """Cross-entropy alone (``kl.ce_weight == 1``): the teacher has no part in the loss."""
        return self.kl.ce_weight == 1.0


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
    _, model = load_source_model(source, layout, dtype)
    return chat_samples(model, chat_format, stage.sample)


def stage_facts(stage: SFTStage, teacher_source: ModelSource, student_source: ModelSource, chat: ChatMix,
                chat_format: ChatFormat) -> dict:
    """What an SFT stage adds to the loop's fingerprint (``train/facts.py``): loss settings, both models' sources
    (the teacher's None for plain SFT), the chat format and the chat mix's identity (chat samples are a report,
    not part of the trajectory)."""
    data_screen = stage.data_screen()
    return {"stage": {"name": stage.name, "kl": dataclasses.asdict(stage.kl),
                      **({"data_screen": data_screen.fingerprint()} if data_screen else {})},
            "teacher": None if stage.plain else str(teacher_source), "student": str(student_source),
            "chat_format": chat_format.name, "data": chat.identity()}


@dataclass
class PlainSFTStep:
    """``step(ddp, batch) -> mean cross-entropy per assistant target of the global batch``: the per-token loss
    megatron's output layer computes from the labels (vocab-parallel), summed over the masked targets and divided
    by their global count (``use_per_token_loss``), as the distillation step normalises its KL."""

    train: TrainSettings

    def __call__(self, ddp: torch.nn.Module, batch: tuple) -> float:
        student = ddp.module
        require_per_token_loss(student, "target token")
        micro = split_micro_batches(batch, self.train)

        def forward_step(data_iterator, chunk):
            micro_batch = next(data_iterator)
            output = chunk(micro_batch["tokens"], micro_batch["positions"], labels=micro_batch["labels"])

            def loss_func(per_token_loss):
                mask = micro_batch["mask"]
                loss_sum = (per_token_loss.float() * mask).sum()
                count = mask.sum().to(torch.int)
                return loss_sum, count, {"loss_sum": loss_sum.detach().clone(), "tokens": count}

            return output, loss_func

        return mean_loss_schedule(ddp, micro, self.train, forward_step, "tokens")


@torch.no_grad()
def heldout_nll(student: torch.nn.Module, tokens: torch.Tensor, positions: torch.Tensor, target_mask: torch.Tensor,
                micro_batch_size: int) -> dict[str, float]:
    """Mean cross-entropy (``loss``) and perplexity of the student on the held-out assistant targets; DP ranks
    split the rows."""
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    rows = [t[dp_rank::dp_size] for t in (tokens, positions, target_mask)]
    totals = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(rows[0]), micro_batch_size):
        local = local_batch(*(t[start : start + micro_batch_size] for t in rows))
        mask = local["mask"]

        def reduce(per_token_loss, mask=mask):
            return {"nll": (per_token_loss.double() * mask).sum().cpu(), "count": mask.double().sum().cpu()}

        for out in forward_only(student, [(local["tokens"], local["positions"], local["labels"])], reduce):
            totals += torch.stack([out["nll"], out["count"]])
    nll, count = sum_from_last_stage(totals).tolist()
    return {"loss": nll / count, "student_ppl": math.exp(nll / count), "tokens": int(count)}


def train_plain(student: torch.nn.Module, config, chat: ChatMix, stage: SFTStage, out_dir: Path, cursor: Cursor,
                tokenizer_dir: Path, facts: RunFacts) -> dict:
    """The training loop with ``PlainSFTStep``, evaluated by ``heldout_nll`` on the chat mix's held-out rows."""
    tokens, positions, target_mask = chat.heldout_rows(stage.train.seq_len, stage.train.eval_rows_per_source)
    use_per_token_loss(student)
    run = TrainingRun(student, config, stage.train, stage.optimizer, Path(out_dir), tokenizer_dir, stage.name, facts)
    return run.run(PlainSFTStep(stage.train), chat,
                   lambda: heldout_nll(student, tokens, positions, target_mask, stage.train.micro_batch_size), cursor)


def run_sft_stage(stage: SFTStage, teacher_source: ModelSource, student_source: ModelSource, chat: ChatMix,
                  chat_format: ChatFormat, tokenizer_dir: Path, teacher_tokenizer_dir: Path, cursor: Cursor,
                  out_dir: Path, parallel: ParallelConfig, manifest_extra: dict | None = None,
                  resume_with_changes: bool = False, before_work: Callable[[], None] | None = None) -> dict:
    """Train ``student_source`` on the chat mix ``chat`` against ``teacher_source``; returns the stage's manifest
    (its ``checkpoint`` is the instruct model). ``before_work`` runs once the checks have passed, before anything
    is loaded or written; a finished stage with the same fingerprint is returned as it is."""
    started = time.monotonic()
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    s_config = source_config(student_source)
    t_config = None if stage.plain else source_config(teacher_source)
    if t_config is not None:
        check_teacher_student(t_config, s_config)
        check_tokenizers(teacher_tokenizer_dir, tokenizer_dir)
    check_screen(stage, chat)
    if chat_format.vocab_size > s_config.vocab_size:
        raise ConfigError(f"the chat format {chat_format.name} emits ids up to {chat_format.vocab_size} "
                          f"but the model's vocabulary has {s_config.vocab_size}: "
                          "set chat_data.format to the model's own (hf_template)")
    facts, done = prepare_stage(stage.name, stage.train, stage.optimizer,
                                stage_facts(stage, teacher_source, student_source, chat, chat_format), chat, cursor,
                                out_dir, resume_with_changes, before_work)
    if done is not None:
        return done
    samples = {"before": sample_model(student_source, parallel, dtype, chat_format, stage)}
    initialize(parallel, stage.train.seed)
    _, student = load_source_model(student_source, parallel, dtype, speed=stage.train.speed)
    if stage.plain:
        result = train_plain(student, s_config, chat, stage, out_dir, cursor, tokenizer_dir, facts)
    else:
        _, teacher_model = load_source_model(teacher_source, parallel, dtype)
        result = train_with_distillation(student, s_config, Teacher(teacher_model), chat, stage.train,
                                         stage.optimizer, stage.kl, out_dir, cursor, tokenizer_dir, stage.name, facts)
        del teacher_model
    del student
    samples["after"] = sample_model(ModelSource("megatron", result["checkpoint"]), parallel, dtype, chat_format, stage)
    extra = {**(manifest_extra or {}), "chat_data": chat.stats(stage.train.seq_len), "samples": samples}
    if stage.plain:
        return finish_plain_stage(stage, student_source, s_config, result, started, out_dir, extra)
    return finish_training_stage(stage, teacher_source, student_source, s_config, t_config, result, started, out_dir,
                                 extra, "held-out assistant-token KL")


def finish_plain_stage(stage: SFTStage, student_source: ModelSource, s_config, result: dict, started: float,
                       out_dir: Path, extra: dict) -> dict:
    """A plain SFT stage's manifest: ``finish_training_stage``'s keys, without a teacher (None) or its FLOPs."""
    manifest = {**extra, "stage": stage.name, "config": dataclasses.asdict(stage), "teacher": None,
                "student_input": str(student_source), "student_config": s_config.to_dict(),
                "parameters": s_config.num_parameters(), **result,
                "train_flops": 6 * s_config.num_parameters() * result["tokens"],
                "wall_seconds": time.monotonic() - started}
    if dist.get_rank() == 0:
        write_manifest(out_dir, manifest)
        logger.info("%s done (plain SFT): %d tokens, held-out assistant-token loss %.4f, ppl %.2f, %.0f s", stage.name,
                    result["tokens"], result["eval"]["loss"], result["eval"]["student_ppl"], manifest["wall_seconds"])
    dist.barrier()
    return manifest
