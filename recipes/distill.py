"""One distillation stage: the parent (model.source) teaches a student; resumable, single-pass data.

    python -m recipes.distill student=megatron:runs/prune/22L_384h_1024f/megatron
    python -m recipes.distill stage@stage.distill=distill_long \\
        student=megatron:runs/distill/distill_short/checkpoints/step_00000016 \\
        cursor=runs/distill/distill_short/manifest.json
    torchrun --nproc-per-node 2 -m recipes.distill parallel.tp=2 student=...

Running the same command again after a kill resumes from the newest checkpoint under output_dir; with other
settings it is refused, naming them, unless resume_with_changes=true (they then apply from the resumed step). A
finished stage is skipped.
"""

from __future__ import annotations

from pathlib import Path

from nemo_plugins.config.schemas import DistillConfig
from nemo_plugins.convert.sources import ModelSource, check_declared, source_config, tokenizer_dir
from nemo_plugins.data.from_config import mix_images, prebuilt_by
from nemo_plugins.data.mix import build_mix, cursor_from_manifest
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.distill.stage import run_stage
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.output_lock import output_lock
from recipes._entry import hydra_entry


def run(cfg: DistillConfig) -> dict:
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the teacher's weights are")
    if not cfg.student:
        raise ConfigError("student is null: say where the student starts, "
                          "e.g. student=megatron:runs/prune/<child>/megatron")
    stage, parallel = cfg.stage.distill, cfg.parallel
    teacher_source, student_source = ModelSource.parse(cfg.model.source), ModelSource.parse(cfg.student)
    initialize(parallel, stage.train.seed)
    teacher_config = source_config(teacher_source)
    check_declared(cfg.model.architecture, teacher_config, cfg.model.source)
    tok_dir = tokenizer_dir(teacher_source)
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, teacher_config)
    mix = build_mix(tokenizer, cfg.data.sources, cfg.data.cache_dir, cfg.data.heldout_fraction, prebuilt_by(cfg),
                    mix_images(cfg, teacher_source))
    cursor = cursor_from_manifest(cfg.cursor, mix.identity())
    with output_lock(cfg.output_dir):
        return run_stage(stage, teacher_source, student_source, mix, tokenizer, tok_dir, cursor, Path(cfg.output_dir),
                         parallel, resume_with_changes=cfg.resume_with_changes)


main = hydra_entry("distill", run)


if __name__ == "__main__":
    main()
