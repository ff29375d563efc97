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

from omegaconf import DictConfig, OmegaConf

from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.pairwise import (
    EngineSampler,
    Pair,
    PairSampling,
    PairwiseSettings,
    build_or_load_pairs,
    read_pairs,
)
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import ConfigError, checked, typed
from nemo_plugins.generation.torch_engine import generation_layout
from nemo_plugins.output_lock import output_lock
from nemo_plugins.rl.pwrm import PWRMStage, run_pwrm_stage
from recipes._entry import hydra_entry


def load_pairs(pairs: DictConfig, parallel: ParallelConfig, seed: int) -> tuple[list[Pair], dict]:
    """The pairs and what the manifest records of them (file, sampling model)."""
    if pairs.file:
        return read_pairs(Path(pairs.file)), {"file": str(pairs.file)}
    settings = PairwiseSettings(counts=dict(OmegaConf.to_container(pairs.counts, resolve=True)),
                                heldout_fraction=checked(pairs.heldout_fraction, float, "pairs.heldout_fraction"),
                                seed=checked(pairs.seed, int, "pairs.seed"))
    sampling = typed(PairSampling, pairs.sampling, "pairs.sampling")
    make_sampler, identity = None, None
    if pairs.sample_from:
        sample_source = ModelSource.parse(pairs.sample_from)
        identity = f"{sample_source}|{OmegaConf.to_container(pairs.sampling, resolve=True)}|{pairs.format}"

        def make_sampler() -> EngineSampler:
            layout = generation_layout(parallel)  # the engine decodes one token per step: TP only
            initialize(layout, seed)
            _, model = load_model(sample_source, layout)
            return EngineSampler(model, load_chat_format(pairs.format, tokenizer_dir(sample_source)), sampling, seed)

    found, path = build_or_load_pairs(settings, pairs.cache_dir, make_sampler, identity)
    initialize(parallel, seed)
    return found, {"file": str(path), "sample_from": pairs.sample_from}


def run(cfg: DictConfig) -> dict:
    if not cfg.source and not cfg.model.source:
        raise ConfigError("no model to start the PWRM from: set source=<model source> (the SFT model or the parent) "
                          "or model.source")
    stage = PWRMStage.from_config(cfg.stage.pwrm, "stage.pwrm")
    parallel = typed(ParallelConfig, cfg.parallel, "parallel")
    source = ModelSource.parse(cfg.source or cfg.model.source)
    initialize(parallel, stage.train.seed)
    pairs, record = load_pairs(cfg.pairs, parallel, stage.train.seed)
    source_tokenizer = tokenizer_dir(source)
    chat_format = load_chat_format(cfg.pairs.format, source_tokenizer)
    with output_lock(cfg.output_dir):
        return run_pwrm_stage(stage, source, pairs, chat_format, str(cfg.pairs.format), source_tokenizer,
                              Path(cfg.output_dir), parallel, manifest_extra={"pair_data": record},
                              resume_with_changes=checked(cfg.resume_with_changes, bool, "resume_with_changes"))


main = hydra_entry("pwrm", run)


if __name__ == "__main__":
    main()
