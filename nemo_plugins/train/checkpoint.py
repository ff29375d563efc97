"""Resumable training checkpoints: model + optimizer + RNG shards (dist_checkpointing) + a JSON train state.

Layout: ``<root>/step_00000042/`` is a complete megatron model checkpoint of this project (loadable by every
stage as ``megatron:<dir>``) plus optimizer shards, every rank's RNG state and ``train_state.json`` (step,
data cursor, schedule, counters). It appears under its final name only once complete (temp dir + rename),
and only the newest ``keep_last`` are kept, so a job killed at any moment resumes from the last whole one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

TRAIN_STATE = "train_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoints under ``root``, oldest first (a partial one never has its final name)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / TRAIN_STATE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded(state: dict | None) -> ShardedObject:
    """One RNG object per (pipeline, tensor) rank; data-parallel replicas hold the same one."""
    return ShardedObject(
        "rng_state",
        state,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer, config: MistralConfig,
                    train_state: dict, tokenizer_dir: str | Path | None, keep_last: int) -> Path:
    """Write step ``step`` atomically, then delete all but the newest ``keep_last`` checkpoints."""
    model_state = model.sharded_state_dict()
    out = megatron_checkpoint.save_model(
        model, config, step_dir(root, step), tokenizer_dir,
        extra_sharded={"optimizer": optimizer.sharded_state_dict(model_state), "rng": _rng_sharded(_rng_state())},
        json_files={TRAIN_STATE: {"step": step, **train_state}},
    )
    if dist.get_rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return out


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``path``; returns its train state (step, cursor, schedule...)."""
    path = Path(path)
    state_file = path / TRAIN_STATE
    if not state_file.is_file():
        raise ConfigError(f"{path} is not a training checkpoint ({TRAIN_STATE} missing)")
    model_state = model.sharded_state_dict()
    loaded = megatron_checkpoint.load_weights(
        model, path,
        extra_sharded={"optimizer": optimizer.sharded_state_dict(model_state, is_loading=True), "rng": _rng_sharded(None)},
    )
    optimizer.load_state_dict(loaded["optimizer"])
    _set_rng_state(loaded["rng"])
    return json.loads(state_file.read_text())
