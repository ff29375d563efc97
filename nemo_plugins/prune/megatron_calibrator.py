"""The calibrator the recipe uses: build the megatron model of a ModelState and run streaming calibration."""

from __future__ import annotations

import torch

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model
from nemo_plugins.prune.calibration import CalibrationStats, calibrate
from nemo_plugins.prune.pipeline import Calibrator
from nemo_plugins.prune.shards import load_slice
from nemo_plugins.prune.state import ModelState


def model_from_state(state: ModelState, parallel: ParallelConfig,
                     dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = build_model(state.config, parallel, dtype)
    if state.slice.whole:
        load_hf_state(model, state.tensors, state.config)
    else:
        load_slice(model, state)
    return model.eval()


def megatron_calibrator(
    parallel: ParallelConfig,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    micro_batch_size: int = 4,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    token_normalized: bool = True,
) -> Calibrator:
    def run(state: ModelState, want: frozenset[str]) -> CalibrationStats:
        model = model_from_state(state, parallel, dtype)
        return calibrate(model, state.config, tokens, positions, want, micro_batch_size, progress=progress,
                         token_normalized=token_normalized)

    return run
