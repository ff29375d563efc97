"""The project's error types, each printed by the recipes as one line (exit code 2): the class says what to fix (the
config, the data, the checkpoint, the machine), the message says where (the key, the file) and how."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ProjectError(Exception):
    """An error the user can fix from its message alone: the recipes print it as one line, without a traceback."""


class ConfigError(ProjectError, ValueError):
    """A configuration or input that cannot work; the message says which key and what to change."""


class DataError(ProjectError, ValueError):
    """Data on disk that cannot serve the run: exhausted, truncated, unparsable, or written for other data."""


class ResourceError(ProjectError, RuntimeError):
    """The machine refuses what the run needs: no disk space, an output folder in use by another run."""


class NonFiniteError(ProjectError, RuntimeError):
    """A NaN/inf where a number must be finite (weights, a loss, a perplexity)."""


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


class CheckpointError(ProjectError, ValueError):
    """An unreadable or inconsistent checkpoint: a damaged or missing file, or pickled code where data belongs."""
