"""SFT with logit distillation of one model on conversations (assistant tokens only); resumable, single-pass data.

    python -m recipes.sft student=megatron:runs/demo/child_14b_like/distill_long/checkpoints/step_00000002
    python -m recipes.sft student=... stage.sft_kd.teacher=hf:/models/teacher-instruct chat_data=user_chat
    torchrun --nproc-per-node 2 -m recipes.sft parallel.tp=2 student=...

The teacher is ``stage.sft_kd.teacher``, else ``model.source`` (the parent). Running the same command again after
a kill resumes from the newest checkpoint under output_dir; with other settings it is refused, naming them, unless
resume_with_changes=true. A finished stage is skipped.
"""

from __future__ import annotations

from pathlib import Path

from nemo_plugins.config.schemas import SFTConfig
from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.from_config import load_chat_data
from nemo_plugins.data.mix import cursor_from_manifest
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.output_lock import output_lock
from nemo_plugins.rl.sft_kd import run_sft_stage
from recipes._entry import hydra_entry


def run(cfg: SFTConfig) -> dict:
    if not cfg.student:
        raise ConfigError("student is null: say where the student starts, "
                          "e.g. student=megatron:runs/demo/<child>/distill_long/...")
    stage, parallel = cfg.stage.sft_kd, cfg.parallel
    if stage.teacher is None and not cfg.model.source:
        raise ConfigError("no teacher: set stage.sft_kd.teacher or model.source")
    student = ModelSource.parse(cfg.student)
    teacher = stage.teacher_source(ModelSource.parse(cfg.model.source) if cfg.model.source else None)
    initialize(parallel, stage.train.seed)
    student_tokenizer = tokenizer_dir(student)
    chat_format, chat = load_chat_data(cfg, student_tokenizer, stage.data_screen())
    cursor = cursor_from_manifest(cfg.chat_cursor, chat.identity(), "chat_cursor")
    with output_lock(cfg.output_dir):
        return run_sft_stage(stage, teacher, student, chat, chat_format, student_tokenizer, tokenizer_dir(teacher),
                             cursor, Path(cfg.output_dir), parallel, resume_with_changes=cfg.resume_with_changes)


main = hydra_entry("sft", run)


if __name__ == "__main__":
    main()
