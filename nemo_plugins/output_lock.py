"""One run per output folder: an exclusive ``flock`` on ``<dir>/.lock`` for the run's lifetime.

Two runs writing one folder would interleave checkpoints and manifests; the second is refused at once, in one
line naming the holder (``<dir> is in use by pid N on <host>``). The kernel drops the lock when the process ends,
however it ends, so a killed run never leaves a stale lock behind. Rank 0 holds it for the whole job; every rank
learns the outcome, so all of them stop together. A folder the lock itself created is removed again if the run
wrote nothing else into it (a refused run leaves no trace).
"""

from __future__ import annotations

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_plugins.distributed import device
from nemo_plugins.errors import ResourceError

LOCK = ".lock"


def _holder(handle) -> str:
    handle.seek(0)
    return handle.read().strip() or "another process (starting up)"


@contextmanager
def output_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold ``out_dir`` for this job; refuse with ``ResourceError`` if another job holds it."""
    out_dir = Path(out_dir)
    handle, created, holder = None, False, ""
    if dist.get_rank() == 0:
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        handle = open(out_dir / LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(handle)
            handle.close()
            handle = None
        else:
            handle.truncate(0)
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
    refused = torch.tensor([1.0 if holder else 0.0], device=device())
    dist.all_reduce(refused)
    if refused.item():
        raise ResourceError(f"{out_dir} is in use by {holder or 'another run (see rank 0)'}: wait for that run to end, "
                            "or use another output_dir")
    try:
        yield
    finally:
        if handle is not None:
            if created and [p.name for p in out_dir.iterdir()] == [LOCK]:
                (out_dir / LOCK).unlink()
                out_dir.rmdir()
            handle.close()
