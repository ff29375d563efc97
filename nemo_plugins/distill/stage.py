"""One distillation stage (short- or long-context) from config to artefacts: teacher + student loading,
optional context extension, the training run, long-context evaluation before and after, a manifest.

Before anything is loaded the stage checks what it can: a finished stage with the same fingerprint is skipped,
one with other settings (or a checkpoint written with them) is refused naming the keys, and the data must hold
every row the stage will read."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from nemo_plugins.convert.sources import ModelSource, source_config
from nemo_plugins.data.mix import Cursor, DataMix, check_data_budget
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.distill.context import ContextExtension
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import train_with_distillation
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.eval.long_context import (
    heldout_windows,
    model_multiple,
    passkey_accuracy,
    perplexity_by_position,
    plot_long_context,
    sequence_multiple,
)
from nemo_plugins.manifest import write_manifest
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.facts import RunFacts, check_stage_dir, run_fingerprint
from nemo_plugins.vision.checkpoint import load_source_model

logger = logging.getLogger(__name__)


@dataclass
class LongContextEval:
    """Perplexity by position on ``windows`` windows of the stage's seq_len from the text of ``paths``, and passkey
    retrieval at the ``passkey_lengths`` up to seq_len.

    The windows are bounded by the text: held-out text shorter than ``windows`` x (seq_len + 1) tokens gives the
    longest window it holds (rounded down to what the stage's layout can take), as many as fit, with a warning;
    the results record it under ``windows`` (``window_tokens``, ``windows``, what was asked, ``text_tokens``).
    The paper's 262,144-token stage on ~60k tokens of held-out text thus measures perplexity by position up to
    ~60k. Text shorter than one such length is a DataError, raised before any model is loaded.
    """

    paths: list[str] = field(default_factory=lambda: ["stdlib:json", "stdlib:logging"])
    windows: int = 2
    buckets: int = 4
    passkey_lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    passkey_samples: int = 4


@dataclass
class DistillStage:
    name: str
    train: TrainSettings
    optimizer: OptimizerSettings
    kl: KLOptions
    context: ContextExtension | None = None
    long_eval: LongContextEval | None = None

    def __post_init__(self) -> None:
        if self.context is not None and self.train.seq_len > self.context.max_context:
            raise ConfigError(f"stage.{self.name}.train.seq_len={self.train.seq_len} exceeds the extended context "
                              f"{self.context.max_context} (original_context x yarn_factor)")


def student_config(stage: DistillStage, source: ModelSource) -> MistralConfig:
    config = source_config(source)
    return stage.context.apply(config) if stage.context is not None else config


def check_teacher_student(teacher: MistralConfig, student: MistralConfig) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise ConfigError(f"teacher vocabulary {teacher.vocab_size} != student vocabulary {student.vocab_size}: "
                          "logit distillation needs the same tokenizer")


def check_image_models(data, teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Rows with images need a vision-language teacher and student (both embed the images)."""
    if getattr(data, "images", None) is not None:
        text_only = [name for name, model in (("teacher", teacher), ("student", student))
                     if not hasattr(model, "vision")]
        if text_only:
            raise ConfigError(f"the data mix has interleaved image-text sources but the {' and '.join(text_only)} "
                              "has no vision part: distil from and into Mistral3 (vision-language) checkpoints")


def long_context_windows(tokenizer, stage: DistillStage, multiple: int) -> tuple[torch.Tensor, dict]:
    """The held-out windows of the stage's long-context evaluation, their lengths a multiple of ``multiple`` (the
    layout's, ``sequence_multiple``) when the text bounds them (see LongContextEval)."""
    spec = stage.long_eval
    return heldout_windows(tokenizer, iter_documents(spec.paths), stage.train.seq_len, spec.windows, multiple,
                           f"the long_eval.paths of stage {stage.name}")


def long_context_eval(model, tokenizer, stage: DistillStage,
                      windows: tuple[torch.Tensor, dict] | None = None) -> dict:
    """Perplexity by position and passkey accuracy at the stage's context (``stage.long_eval`` settings), on
    ``windows`` from ``long_context_windows`` (made here for the model's layout if not given)."""
    spec = stage.long_eval
    rows, record = windows or long_context_windows(tokenizer, stage, model_multiple(model))
    return {"windows": record, "position_perplexity": perplexity_by_position(model, rows, spec.buckets),
            "passkey": passkey_accuracy(model, tokenizer, [n for n in spec.passkey_lengths if n <= stage.train.seq_len],
                                        spec.passkey_samples)}


def stage_facts(stage: DistillStage, teacher_source: ModelSource, student_source: ModelSource, data) -> dict:
    """What a distillation stage adds to the loop's fingerprint (``train/facts.py``): loss and context settings,
    both models' sources, the data mix's identity (``data``: a ``DataMix`` or a ``ChatMix``)."""
    return {"stage": {"name": stage.name, "kl": dataclasses.asdict(stage.kl),
                      "context": dataclasses.asdict(stage.context) if stage.context is not None else None},
            "teacher": str(teacher_source), "student": str(student_source), "data": data.identity()}


def prepare_stage(name: str, train: TrainSettings, optimizer: OptimizerSettings, facts: dict, data, cursor: Cursor,
                  out_dir: Path, resume_with_changes: bool,
                  before_work: Callable[[], None] | None) -> tuple[RunFacts, dict | None]:
    """The checks every training stage makes before it loads anything; returns the loop's ``RunFacts`` and the
    manifest of the stage if it finished earlier (then it is skipped)."""
    done = check_stage_dir(out_dir, run_fingerprint(train, optimizer, cursor, facts), resume_with_changes)
    if done is None:
        check_data_budget(data, cursor, train.steps * train.global_batch_size, train.seq_len,
                          f"the train_tokens of stage {name}")
        if before_work is not None:
            before_work()
    return RunFacts(facts, resume_with_changes), done


def run_stage(stage: DistillStage, teacher_source: ModelSource, student_source: ModelSource, mix: DataMix, tokenizer,
              tokenizer_dir: Path, cursor: Cursor, out_dir: Path, parallel: ParallelConfig,
              manifest_extra: dict | None = None, resume_with_changes: bool = False,
              before_work: Callable[[], None] | None = None, heldout_cache: Path | None = None) -> dict:
    """Train ``student_source`` against ``teacher_source`` from ``cursor``; returns the stage's manifest.

    The student's newest checkpoint (``manifest["checkpoint"]``) is the stage's output model. ``before_work`` runs
    once the checks have passed, before anything is loaded or written (the cascade records its config there).
    ``heldout_cache``: a directory the run's stages share for the teacher's held-out pass (``distill/heldout.py``).
    """
    started = time.monotonic()
    dtype = torch.bfloat16 if stage.train.precision == "bfloat16" else torch.float32
    s_config = student_config(stage, student_source)
    t_config = source_config(teacher_source)
    check_teacher_student(t_config, s_config)
    facts, done = prepare_stage(stage.name, stage.train, stage.optimizer,
                                stage_facts(stage, teacher_source, student_source, mix),
                                mix, cursor, out_dir, resume_with_changes, before_work)
    if done is not None:
        return done
    windows = None
    if stage.long_eval is not None:  # a DataError before anything is loaded
        windows = long_context_windows(tokenizer, stage, sequence_multiple(parallel.tp, parallel.cp,
                                                                           parallel.sequence_parallel))
    # vision-language sources load with encoder and projector: the teacher with its own, the student with the one
    # it trains (the encoder frozen: requires_grad=False, so the optimizer holds no state for it)
    _, teacher_model = load_source_model(teacher_source, parallel, dtype)
    _, student = load_source_model(student_source, parallel, dtype, config=s_config, speed=stage.train.speed)
    check_image_models(mix, teacher_model, student)
    teacher = Teacher(teacher_model)
    long_context = {}
    if windows is not None:
        long_context["before"] = long_context_eval(student, tokenizer, stage, windows)
    result = train_with_distillation(student, s_config, teacher, mix, stage.train, stage.optimizer, stage.kl, out_dir,
                                     cursor, tokenizer_dir, stage.name, facts, str(teacher_source), heldout_cache)
    if windows is not None:
        long_context["after"] = long_context_eval(student, tokenizer, stage, windows)
    if dist.get_rank() == 0 and long_context:
        plot_long_context({f"{stage.name} {k}": v for k, v in long_context.items()}, Path(out_dir) / "long_context.png")
    return finish_training_stage(stage, teacher_source, student_source, s_config, t_config, result, started, out_dir,
                                 {**(manifest_extra or {}), "long_context": long_context}, "held-out KL")


def finish_training_stage(stage, teacher_source: ModelSource, student_source: ModelSource, s_config: MistralConfig,
                          t_config: MistralConfig, result: dict, started: float, out_dir: Path, extra: dict,
                          kl_name: str) -> dict:
    """Write a distillation-trained stage's manifest (what it read, trained, measured, its cost) and log its line."""
    tokens = result["tokens"]
    manifest = {
        **extra,
        "stage": stage.name,
        "config": dataclasses.asdict(stage),
        "teacher": str(teacher_source),
        "student_input": str(student_source),
        "student_config": s_config.to_dict(),
        "parameters": s_config.num_parameters(),
        **result,
        "train_flops": 6 * s_config.num_parameters() * tokens + 2 * t_config.num_parameters() * tokens,
        "wall_seconds": time.monotonic() - started,
    }
    if dist.get_rank() == 0:
        write_manifest(out_dir, manifest)
        logger.info("%s done: %d tokens, %s %.4f, student ppl %.2f (teacher %.2f), %.0f s", stage.name, tokens, kl_name,
                    result["eval"]["kl"], result["eval"]["student_ppl"], result["eval"]["teacher_ppl"],
                    manifest["wall_seconds"])
    dist.barrier()
    return manifest
