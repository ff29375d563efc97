"""Prune a parent into one child (Algorithm 2) and write a checkpoint, an HF directory and a report.

    python -m recipes.prune                                       # SmolLM2-135M -> the first demo child shape
    python -m recipes.prune stage.prune.target.hidden_size=256 stage.prune.options.hidden_method=magnitude
    torchrun --nproc-per-node 2 -m recipes.prune parallel.tp=2
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from nemo_plugins.config.schemas import PruneConfig
from nemo_plugins.convert.sources import ModelSource
from nemo_plugins.distributed import initialize
from nemo_plugins.errors import ConfigError, torch_dtype
from nemo_plugins.output_lock import output_lock
from nemo_plugins.prune.stage import run_prune_stage
from recipes._entry import hydra_entry


def run(cfg: PruneConfig) -> dict:
    stage = cfg.stage.prune
    if not cfg.model.source:
        raise ConfigError("model.source is null: say where the parent's weights are, e.g. model.source=hf:/path")
    parallel, dtype = cfg.parallel, torch_dtype(cfg.dtype)
    source = ModelSource.parse(cfg.model.source)
    initialize(parallel)
    with output_lock(cfg.output_dir):
        manifest = run_prune_stage(source, stage.target, stage.options, stage.calibration, stage.eval,
                                   Path(cfg.output_dir), parallel, dtype, cfg.model.architecture)
        if dist.get_rank() == 0:
            (Path(cfg.output_dir) / "resolved_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return manifest["report"]


main = hydra_entry("prune", run)


if __name__ == "__main__":
    main()
