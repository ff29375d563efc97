"""Console logging for recipes: one format, rank-prefixed, quiet on non-zero ranks, megatron's noise muted.

Nothing here runs on import: the entry points call ``setup_logging()`` (and may call
``mute_megatron_import_warnings()`` before their first megatron import, whose warnings fire at import time).
"""

from __future__ import annotations

import logging
import os
import warnings

# megatron-core warns at import time for every optional accelerator it lacks; the model builder logs the one fact
# that matters (Transformer Engine spec or local spec), so these repeats are muted.
MEGATRON_IMPORT_WARNING = r".*(Transformer Engine|Apex).* not installed.*"


def mute_megatron_import_warnings() -> None:
    warnings.filterwarnings("ignore", message=MEGATRON_IMPORT_WARNING)


def setup_logging(level: int = logging.INFO) -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    mute_megatron_import_warnings()
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.checkpoint")
