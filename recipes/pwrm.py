"""Train the pairwise reward model (PWRM) on offline pairs with verifiable reasons, then calibrate its temperature.

    python -m recipes.pwrm source=megatron:runs/sft/sft_kd/checkpoints/step_00000008
    python -m recipes.pwrm source=... pairs.sample_from=megatron:runs/sft/sft_kd/checkpoints/step_00000008
    python -m recipes.pwrm source=... pairs.file=/data/my_pairs.jsonl
    torchrun --nproc-per-node 2 -m recipes.pwrm parallel.tp=2 source=...

The PWRM starts from ``source``, else ``model.source`` (the parent). The pairs are ``pairs.file`` (JSONL in
``data/pairwise.py``'s layout), else the demo pairs built once into ``pairs.cache_dir``: answers sampled from
``pairs.sample_from`` (the policy, so the PWRM sees its distribution) where they pass or fail the pair's check,
references and programmatic perturbations elsewhere (the manifest counts which). Writes checkpoints, the
manifest (held-out accuracy before/after training, position bias, tau, NLL and ECE before/after calibration),
``reliability.png``. Online DPO reads it as its judge:

    python -m recipes.odpo policy=... \
        'judge={_target_: nemo_plugins.rl.pwrm.load_judge, manifest: runs/pwrm/pwrm/manifest.json, policy: ${policy}}'

Re-running after a kill resumes from the newest checkpoint; other settings are refused unless
resume_with_changes=true; a finished stage is skipped.
"""

from __future__ import annotations

from pathlib import Path

from nemo_plugins.config.schemas import PWRMConfig
from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.from_config import load_pairs
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError
from nemo_plugins.output_lock import output_lock
from nemo_plugins.rl.pwrm import run_pwrm_stage
from recipes._entry import hydra_entry


def run(cfg: PWRMConfig) -> dict:
    if not cfg.source and not cfg.model.source:
        raise ConfigError("no model to start the PWRM from: set source=<model source> (the SFT model or the parent) "
                          "or model.source")
    stage, parallel = cfg.stage.pwrm, cfg.parallel
    source = ModelSource.parse(cfg.source or cfg.model.source)
    initialize(parallel, stage.train.seed)
    pairs, record = load_pairs(cfg.pairs, parallel, stage.train.seed)
    source_tokenizer = tokenizer_dir(source)
    chat_format = load_chat_format(cfg.pairs.format, source_tokenizer)
    with output_lock(cfg.output_dir):
        return run_pwrm_stage(stage, source, pairs, chat_format, str(cfg.pairs.format), source_tokenizer,
                              Path(cfg.output_dir), parallel, manifest_extra={"pair_data": record},
                              resume_with_changes=cfg.resume_with_changes)


main = hydra_entry("pwrm", run)


if __name__ == "__main__":
    main()
