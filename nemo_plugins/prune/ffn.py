"""Width pruning of SwiGLU FFNs: keep the intermediate channels with the largest mean |silu(W1 x) * W3 x|."""

from __future__ import annotations

from enum import StrEnum

import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.shards import part, whole
from nemo_plugins.prune.state import ModelState, layer_key


class FfnMethod(StrEnum):
    """How SwiGLU channels are chosen: by activation (the paper), or at random (ablation)."""

    activation = "activation"
    random = "random"


def select_channels(scores: torch.Tensor, keep: int, method: FfnMethod = FfnMethod.activation,
                    seed: int = 0) -> torch.Tensor:
    """``[layers, keep]`` ascending channel indices per layer (``scores`` is ``[layers, ffn]``)."""
    layers, total = scores.shape
    if not 1 <= keep <= total:
        raise ConfigError(f"target ffn_hidden_size={keep} must be between 1 and the parent's {total}")
    if method == "activation":
        chosen = torch.topk(scores, keep, dim=1).indices
    elif method == "random":
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.stack([torch.randperm(total, generator=generator)[:keep] for _ in range(layers)])
    else:
        raise ConfigError(f"prune.ffn.method={method!r} is not one of activation, random")
    return torch.sort(chosen, dim=1).values


def keep_channels(state: ModelState, kept: torch.Tensor) -> ModelState:
    """Rows of W1 (gate) and W3 (up), and the matching columns of W2 (down), for each layer's kept channels.

    ``kept`` holds global channel indices: a TP-sliced state gathers one layer's tensors at a time, keeps the
    channels and takes its slice of the child's (the kept channels of a slice come from every slice).
    """
    tensors = dict(state.tensors)
    for layer in range(state.config.num_layers):
        rows = kept[layer]
        for name, dim in (("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)):
            key = layer_key(layer, name)
            full = whole(state.tensors[key], dim, state.slice)
            chosen = full[rows] if dim == 0 else full[:, rows]
            tensors[key] = part(chosen, dim, state.slice).contiguous()
    return state.derive(state.config.replace(ffn_hidden_size=int(kept.shape[1])), tensors)
