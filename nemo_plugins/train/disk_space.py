"""Disk space for checkpoints: checked before every save, and a full disk named as such when a save fails anyway.

Without this a full disk surfaces deep inside torch's writer as ``unexpected pos 704 vs 598`` (the zip writer
loses the errno) after the step's work is done. The estimate is the checkpoint's content: weights in the training
precision plus Adam's two fp32 moments (and fp32 main weights under bf16), plus the tokenizer files that travel
with every checkpoint, plus 1 MiB of metadata, RNG and train state (measured: a 3.3M-parameter fp32 checkpoint
is 39.55 MB for an estimate of 39.34 MB + 1 MiB). Old checkpoints are deleted only after the new one is complete,
so that much must be free.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.distributed import device
from nemo_plugins.errors import ResourceError
from nemo_plugins.model.config import MistralConfig

MIB = 2**20
OVERHEAD = MIB  # dist_checkpointing metadata, RNG state, train_state.json, model config
ZIP_SHORT_WRITE = "unexpected pos"  # torch's PyTorchStreamWriter when a write came up short


def checkpoint_bytes(config: MistralConfig, precision: str, tokenizer_dir: str | Path | None) -> int:
    """What one training checkpoint of ``config`` occupies (all ranks together)."""
    weight = 2 if precision == "bfloat16" else 4
    optimizer = 8 + (4 if precision == "bfloat16" else 0)
    tokenizer = sum(p.stat().st_size for p in tokenizer_files(tokenizer_dir).values()) if tokenizer_dir else 0
    return config.num_parameters() * (weight + optimizer) + tokenizer + OVERHEAD


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds (or will hold) ``path``."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, what it was raised from, and what each rank of a distributed-checkpoint failure raised."""
    seen: set[int] = set()
    pending = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        pending += [failure[0] if isinstance(failure, tuple) else failure
                    for failure in getattr(current, "failures", {}).values()]


def _no_space(err: BaseException, path: Path, needed: int) -> bool:
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        return False
    # torch's zip writer drops the errno of a short write ("unexpected pos ..."): a full disk (or quota) is its cause
    if any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(e)
           or ZIP_SHORT_WRITE in str(e) for e in _causes(err)):
        return True
    return free_bytes(path) < needed


def _no_space_message(path: Path, needed: int) -> str:
    return (f"no space left on {path} for a checkpoint (about {needed / MIB:.0f} MiB needed, "
            f"{free_bytes(path) / MIB:.0f} MiB free): free some space or move output_dir, then run the same command "
            "to resume from the last complete checkpoint")


@contextmanager
def space_for_checkpoint(path: str | Path, needed: int) -> Iterator[None]:
    """Refuse a save that cannot fit (every rank agrees, so none waits on the others at a barrier), and report a
    save that failed for lack of space as exactly that."""
    path = Path(path)
    short = torch.tensor([1.0 if free_bytes(path) < needed else 0.0], device=device())
    dist.all_reduce(short)
    if short.item():
        raise ResourceError(_no_space_message(path, needed))
    try:
        yield
    except BaseException as err:
        if _no_space(err, path, needed):
            raise ResourceError(_no_space_message(path, needed)) from err
        raise
