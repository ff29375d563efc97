"""Console logging for recipes: one format, rank-prefixed, quiet on non-zero ranks."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: int = logging.INFO) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
