"""Resumable training checkpoints: model + optimizer shards (dist_checkpointing) + JSON for the rest.

Layout: ``<root>/step_00000042/`` is a complete megatron model checkpoint of this project (loadable by every
stage as ``megatron:<dir>``) plus optimizer shards, ``rng/pp<i>_tp<j>.json`` (each model-parallel rank's
generators, as JSON rather than pickled objects: a checkpoint is data) and ``train_state.json`` (step, data
cursor, schedule, counters). It appears under its final name only once complete (temp dir + rename), with a
record of every file's size and sha256, and only the newest ``keep_last`` are kept. A resume takes the newest
checkpoint that still matches its record, so a job killed at any moment, or a file damaged later, costs at most
the steps since the checkpoint before.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.errors import CheckpointError
from nemo_plugins.model.config import MistralConfig

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
RNG_DIR = "rng"
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


def intact_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint whose files match the record written when it was saved (None: there is none yet).

    Newer damaged ones are named in a warning and set aside, so the run resumes from the one before and re-saves
    their steps; if every checkpoint is damaged, a CheckpointError says what to delete.
    """
    damaged: list[tuple[Path, str]] = []
    for candidate in reversed(complete_checkpoints(root)):
        problem = megatron_checkpoint.damage(candidate)
        if problem is None:
            _set_aside(damaged)
            return candidate
        if dist.get_rank() == 0:
            logger.warning("checkpoint %s is damaged: %s; falling back to the one before it", candidate.name, problem)
        damaged.append((candidate, problem))
    if damaged:
        raise CheckpointError(f"no intact checkpoint under {root} ({len(damaged)} damaged; the newest: "
                              f"{damaged[0][1]}); delete {root} to start this stage over from its input model")
    return None


def _set_aside(damaged: list[tuple[Path, str]]) -> None:
    """Renamed, not deleted (worth a look); complete_checkpoints no longer lists them, and their steps are re-saved."""
    if dist.get_rank() == 0:
        for path, _ in damaged:
            aside = path.with_name(f".{path.name}.damaged-{int(time.time())}")
            os.rename(path, aside)
            logger.warning("moved damaged %s to %s", path, aside.name)
    dist.barrier()


def _rng_file() -> str:
    """One RNG file per (pipeline, tensor) rank; data-parallel replicas hold the same state."""
    return (f"{RNG_DIR}/pp{parallel_state.get_pipeline_model_parallel_rank():03d}"
            f"_tp{parallel_state.get_tensor_model_parallel_rank():03d}.json")


def _rng_state() -> dict:
    """This rank's generators as JSON values: a checkpoint holds data, never pickled objects."""
    version, mt_state, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": {**numpy, "state": {"key": numpy["state"]["key"].tolist(), "pos": numpy["state"]["pos"]}},
        "torch": torch.get_rng_state().tolist(),
        "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None,
        "tracker": {name: s.tolist() for name, s in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: dict) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    numpy = state["numpy"]
    np.random.set_state({**numpy, "state": {"key": np.array(numpy["state"]["key"], dtype=np.uint32),
                                            "pos": numpy["state"]["pos"]}})
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {name: torch.tensor(values, dtype=torch.uint8) for name, values in state["tracker"].items()})


def _read_json(path: Path, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {missing}") from None
    except (OSError, ValueError) as err:
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{path} is unreadable ({reason}); the checkpoint is damaged") from None


# How megatron's DistributedOptimizer (GPU runs) lays its state out in a checkpoint. Its default,
# 'fully_sharded_model_space', builds flattened ShardedTensors that megatron-core's own validation refuses
# ("ShardedTensor.flattened_range is not supported", 0.16 and 0.19: the first save of a GPU run failed until this was
# set). 'dp_reshardable' is Megatron-LM's training default: every rank writes its own buckets, nothing is gathered,
# and a resume may change the data-parallel size but not TP/PP (which a resume keeps anyway). The plain optimizer of
# CPU runs ignores it.
OPTIMIZER_STATE_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, optimizer, config: MistralConfig,
                    train_state: dict, tokenizer_dir: str | Path | None, keep_last: int) -> Path:
    """Write step ``step`` atomically, then delete all but the newest ``keep_last`` checkpoints.

    The step directory belongs to this run: a step saved again (after a fallback, a resume from an earlier step)
    replaces the earlier one, which is why ``overwrite`` is set.
    """
    model_state = model.sharded_state_dict()
    replica = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    out = megatron_checkpoint.save_model(
        model, config, step_dir(root, step), tokenizer_dir,
        extra_sharded={"optimizer": optimizer.sharded_state_dict(model_state, metadata=OPTIMIZER_STATE_FORMAT)},
        json_files={TRAIN_STATE: {"step": step, **train_state}},
        rank_json_files={_rng_file(): _rng_state()} if replica == 0 else None,
        overwrite=True,
    )
    if dist.get_rank() == 0:
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()
    return out


def _fill_fresh_distributed_optimizer_state(optimizer) -> None:
    """Give a DistributedOptimizer that has not stepped yet its Adam state (zeros), so that it can describe the state
    it is about to load. Without Apex or Transformer Engine megatron reads Adam's step count from each parameter's
    state when it builds the sharded state dict, and a fresh optimizer has none (``assert len(steps) == 1``: every
    resume of a GPU run without them failed). One step on zero gradients makes the state, as megatron does before
    loading Megatron-FSDP checkpoints; the load then overwrites the main weights, moments and step count."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(chained, DistributedOptimizer):
            continue
        inner = chained.optimizer
        params = [p for group in inner.param_groups for p in group["params"]]
        if all(inner.state[p] for p in params):
            continue
        for param in params:
            param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad()


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer) -> dict:
    """Restore model, optimizer and RNG from ``path``; returns its train state (step, cursor, schedule...)."""
    path = Path(path)
    if not (path / TRAIN_STATE).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint ({TRAIN_STATE} missing): resume from a "
                              "directory the training loop wrote (<output_dir>/checkpoints/step_*)")
    model_state = model.sharded_state_dict()
    _fill_fresh_distributed_optimizer_state(optimizer)
    loaded = megatron_checkpoint.load_weights(
        model, path, extra_sharded={"optimizer": optimizer.sharded_state_dict(model_state, is_loading=True,
                                                            metadata=OPTIMIZER_STATE_FORMAT)})
    with torch.no_grad():  # the distributed optimizer's fp32 main weights of an fp32 model are views of its leaves
        optimizer.load_state_dict(loaded["optimizer"])
    _set_rng_state(_read_json(path / _rng_file(), "the checkpoint was written with another tensor/pipeline layout; "
                                                  "resume with the parallel settings it was written with"))
    return _read_json(path / TRAIN_STATE, "the checkpoint is incomplete")
