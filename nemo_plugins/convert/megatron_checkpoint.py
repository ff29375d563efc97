"""Megatron checkpoints: megatron-core dist_checkpointing (any TP/PP on load) + the model's config, atomically,
with a record of every file (``output_dir``); loading reads the pickled files as data first (``checkpoint_pickles``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from nemo_plugins.convert import checkpoint_pickles, output_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig

CONFIG_NAME = "model_config.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"


def save_model(model: torch.nn.Module, config: MistralConfig, out_dir: str | Path,
               tokenizer_dir: str | Path | None = None, extra_sharded: dict | None = None,
               json_files: dict[str, dict] | None = None, rank_json_files: dict[str, dict] | None = None,
               overwrite: bool = False) -> Path:
    """Write ``out_dir`` via a sibling temp dir renamed into place once every rank has written its shards.

    The tokenizer files travel with the weights so that every later stage tokenises the same way. Training
    checkpoints add their optimizer shards (``extra_sharded``, saved beside the model's) and small JSON files
    (``json_files`` from rank 0; ``rank_json_files`` from the rank passing them, under names no other rank uses):
    they stay loadable as plain model checkpoints. The record of every file's size and sha256 is written last.
    An existing ``out_dir`` is replaced only if it is an earlier megatron checkpoint of this project and
    ``overwrite`` is set: code that owns the directory (a stage re-saving its own checkpoint) passes it.
    """
    out_dir = Path(out_dir)
    output_dir.claim(out_dir, "megatron", overwrite)  # on every rank: a refusal raises everywhere, never a hang
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save killed midway
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if tokenizer_dir is not None:
            (tmp / TOKENIZER_DIR).mkdir()
            for name, path in tokenizer_files(tokenizer_dir).items():
                shutil.copy(path, tmp / TOKENIZER_DIR / name)
        # a model may carry files of its own (a vision-language model: its vision_config.json)
        for name, values in {**getattr(model, "checkpoint_files", dict)(), **(json_files or {})}.items():
            (tmp / name).write_text(json.dumps(values, indent=2) + "\n")
    dist.barrier()
    for name, values in (rank_json_files or {}).items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_text(json.dumps(values) + "\n")
    dist_checkpointing.save({"model": model.sharded_state_dict(), **(extra_sharded or {})}, str(tmp / WEIGHTS_DIR))
    dist.barrier()
    listing = [output_dir.listed_files(tmp) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(listing, src=0)
    files = _split_over_ranks(lambda names: output_dir.digests(tmp, names), listing[0])
    if dist.get_rank() == 0:
        output_dir.write_record(tmp, "megatron", files)
        output_dir.replace(tmp, out_dir)
    dist.barrier()
    return out_dir


def _split_over_ranks(work: Callable[[list[str]], dict], names: list[str]) -> dict:
    """``work`` on this rank's share of ``names`` (the same list on every rank); every rank gets all results.
    Hashing a 24B checkpoint with its optimizer state (~300 GB) would take minutes on one core."""
    mine = work(names[dist.get_rank()::dist.get_world_size()])
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return {key: value for part in gathered for key, value in part.items()}


def damage(ckpt_dir: str | Path) -> str | None:
    """What differs in ``ckpt_dir`` from the record written when it was saved (a missing, truncated or altered
    file, named), or None if it is intact. Every rank checks a share of the files; all get the same answer."""
    try:
        files = output_dir.read_record(ckpt_dir, "megatron")
    except CheckpointError as err:
        return str(err)
    found = _split_over_ranks(lambda names: output_dir.mismatches(ckpt_dir, files, names), sorted(files))
    return found[min(found)] if found else None


def read_config(ckpt_dir: str | Path) -> MistralConfig:
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir} is not a megatron checkpoint of this project ({CONFIG_NAME} missing)")
    return MistralConfig.from_dict(read_json(path))


def _megatron_version() -> tuple[int, int]:
    from megatron.core.package_info import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def load_weights(model: torch.nn.Module, ckpt_dir: str | Path, extra_sharded: dict | None = None) -> dict:
    """Load this rank's shards; a missing or truncated file (sizes against the record, when the checkpoint has
    one) or a damaged shard is reported, and pickled files holding anything but data are refused before
    megatron-core unpickles them.

    ``extra_sharded`` requests more of a training checkpoint (the optimizer); their loaded values are returned.
    """
    weights = Path(ckpt_dir) / WEIGHTS_DIR
    if not (weights / "metadata.json").is_file():
        raise CheckpointError(f"{weights}: no dist_checkpointing metadata; the checkpoint is incomplete")
    if not (weights / "common.pt").is_file() and _megatron_version() < (0, 19):
        # megatron-core 0.19 stores the common state inside the shards; older versions cannot read that
        raise ConfigError(
            f"{weights} was written by megatron-core >= 0.19 (no common.pt); load it with megatron-core >= 0.19"
        )
    if (Path(ckpt_dir) / output_dir.RECORD).is_file():
        files = output_dir.read_record(ckpt_dir, "megatron")
        wrong = output_dir.mismatches(ckpt_dir, files, sorted(files), checksums=False)
        if wrong:
            raise CheckpointError(f"{wrong[min(wrong)]}: the checkpoint is damaged")
    checkpoint_pickles.check_data_only(weights)
    try:
        state = dist_checkpointing.load({"model": model.sharded_state_dict(), **(extra_sharded or {})}, str(weights))
    except (Exception, CheckpointException) as err:  # several types (CheckpointException is a BaseException)
        first_line = next(iter(str(err).splitlines()), "")
        raise CheckpointError(f"{weights}: cannot load checkpoint shards ({type(err).__name__}: {first_line})") from err
    model.load_state_dict(state.pop("model"), strict=True)
    return state
