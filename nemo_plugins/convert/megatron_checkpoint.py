"""Megatron checkpoints: megatron-core dist_checkpointing (any TP/PP on load) + the model's config, atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

CONFIG_NAME = "model_config.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"


def save_model(model: torch.nn.Module, config: MistralConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               extra_sharded: dict | None = None, json_files: dict[str, dict] | None = None) -> Path:
    """Write ``out_dir`` via a sibling temp dir renamed into place once every rank has written its shards.

    The tokenizer files travel with the weights so that every later stage tokenises the same way. Training
    checkpoints add their optimizer / RNG shards (``extra_sharded``, saved beside the model's) and small JSON
    files (written by rank 0 before the rename): they stay loadable as plain model checkpoints.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer_dir is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            for name, path in tokenizer_files(tokenizer_dir).items():
                shutil.copy(path, tmp / TOKENIZER_DIR / name)
        for name, values in (json_files or {}).items():
            (tmp / name).write_text(json.dumps(values, indent=2) + "\n")
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), **(extra_sharded or {})}, str(tmp / WEIGHTS_DIR))
    dist.barrier()
    if dist.get_rank() == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    dist.barrier()
    return out_dir


def read_config(ckpt_dir: str | Path) -> MistralConfig:
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir} is not a megatron checkpoint of this project ({CONFIG_NAME} missing)")
    return MistralConfig.from_dict(json.loads(path.read_text()))


def _megatron_version() -> tuple[int, int]:
    from megatron.core.package_info import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path, extra_sharded: dict | None = None) -> dict:
    """Load this rank's shards; a missing or damaged shard file is reported with the directory to fix.

    ``extra_sharded`` requests more of a training checkpoint (optimizer, RNG); their loaded values are returned.
    """
    weights = Path(ckpt_dir) / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise ConfigError(f"{weights}: no dist_checkpointing metadata; the checkpoint is incomplete")
    if not (weights / "common.pt").is_file() and _megatron_version() < (0, 19):
        # megatron-core 0.19 stores the common state inside the shards; older versions cannot read that
        raise ConfigError(
            f"{weights} was written by megatron-core >= 0.19 (no common.pt); load it with megatron-core >= 0.19"
        )
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict(), **(extra_sharded or {})}, str(weights))
    except (Exception, CheckpointException) as err:  # several types (CheckpointException is a BaseException)
        raise ConfigError(f"{weights}: cannot load checkpoint shards ({type(err).__name__}: {err})") from err
    model.load_state_dict(state.pop("model"), strict=True)
    return state
