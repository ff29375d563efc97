"""Depth pruning: score blocks by how much they change the residual stream and keep the top-k in order."""

from __future__ import annotations

from enum import StrEnum

import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.state import ModelState


class LayerMethod(StrEnum):
    """How layers are chosen: by norm ratio (the paper), or the ablation baselines."""

    norm_ratio = "norm_ratio"
    random = "random"
    drop_last = "drop_last"


def select_layers(scores: torch.Tensor, keep: int, method: LayerMethod = LayerMethod.norm_ratio,
                  seed: int = 0) -> list[int]:
    """Indices of the blocks to keep, ascending.

    ``norm_ratio`` keeps the blocks with the largest mean ||x_out|| / ||x_in|| (a block that leaves the
    residual stream as it found it, ratio ~1, goes first); ``random`` and ``drop_last`` (keep the first k)
    are the ablation baselines on the same code path.
    """
    total = scores.numel()
    if not 1 <= keep <= total:
        raise ConfigError(f"target num_layers={keep} must be between 1 and the parent's {total}")
    if method == "norm_ratio":
        chosen = torch.topk(scores, keep).indices
    elif method == "random":
        chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:keep]
    elif method == "drop_last":
        chosen = torch.arange(keep)
    else:
        raise ConfigError(f"prune.layers.method={method!r} is not one of norm_ratio, random, drop_last")
    return sorted(int(i) for i in chosen)


def keep_layers(state: ModelState, kept: list[int]) -> ModelState:
    """The model made of the kept blocks, renumbered 0..k-1 in their original order."""
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(kept):
        prefix = f"model.layers.{old}."
        for name, tensor in state.tensors.items():
            if name.startswith(prefix):
                tensors[f"model.layers.{new}.{name[len(prefix):]}"] = tensor
    return state.derive(state.config.replace(num_layers=len(kept)), tensors)
