"""Algorithm 2 end to end: layers -> hidden size (one PCA rotation) -> FFN channels -> embedding tying.

``prune`` only needs a ``calibrate(state, statistics)`` callable, so it runs the same with a megatron model
under any TP/PP/DP (the recipe) or with a toy calibrator (tests). By default every step is calibrated on the
model the previous step left; ``recalibrate=False`` reuses one pass over the parent.

The state may be whole or this rank's TP slice (``prune/shards.py``). Decisions are made once: layer and channel
selection from the small statistics every rank holds (the same on all), the hidden basis (an fp64
eigen-decomposition of an h x h moment, on all the machine's cores) and the norm scales on global rank 0, which
alone holds the moments; its result reaches the other ranks as tensors on the job's device.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.prune.calibration import STATISTICS, CalibrationStats
from nemo_plugins.prune.embeddings import TieMethod, set_tied
from nemo_plugins.prune.ffn import FfnMethod, keep_channels, select_channels
from nemo_plugins.prune.hidden import (
    NORM_SITES,
    HiddenBasis,
    HiddenMethod,
    NormCompensation,
    fold_norms,
    hidden_basis,
    norm_scale,
    rotate_hidden,
)
from nemo_plugins.prune.layers import LayerMethod, keep_layers, select_layers
from nemo_plugins.prune.state import ModelState

Calibrator = Callable[[ModelState, frozenset[str]], CalibrationStats]


@dataclass
class PruneTarget:
    """The child's shape; heads and head_dim are never pruned (Ministral 3 keeps 32 q / 8 kv heads)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    tie_embeddings: bool

    def check_against(self, parent, tensor_parallel: int = 1) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size"):
            value, limit = getattr(self, name), getattr(parent, name)
            if not 1 <= value <= limit:
                raise ConfigError(f"prune.target.{name}={value} must be between 1 and the parent's {limit}")
        if self.ffn_hidden_size % tensor_parallel:
            raise ConfigError(f"prune.target.ffn_hidden_size={self.ffn_hidden_size} is not divisible by "
                              f"parallel.tp={tensor_parallel}")


@dataclass
class PruneOptions:
    layer_method: LayerMethod = LayerMethod.norm_ratio
    hidden_method: HiddenMethod = HiddenMethod.pca
    centred: bool = False
    norm_compensation: NormCompensation = NormCompensation.energy
    ffn_method: FfnMethod = FfnMethod.activation
    tie_method: TieMethod = TieMethod.output
    recalibrate: bool = True
    seed: int = 0


def _first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _from_first_rank(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Global rank 0's tensors on every rank (the others pass placeholders of the same shapes), via the device."""
    if not dist.is_initialized():
        return tensors
    out = []
    for tensor in tensors:
        on_device = tensor.to(device()).contiguous()
        dist.broadcast(on_device, src=0)
        out.append(on_device.cpu())
    return out


@contextmanager
def _all_cores() -> Iterator[None]:
    """torchrun starts every rank with one thread; the rank doing the fp64 work alone borrows the node's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _norm_sites(num_layers: int) -> list[str]:
    """The norms of a model, in the order the report lists their scales."""
    return [f"model.layers.{layer}.{site}" for layer in range(num_layers) for site in NORM_SITES] + ["model.norm"]


def _hidden_decision(stats: CalibrationStats, layer_index: list[int], renumber_from: list[int] | None,
                     config: MistralConfig, target: PruneTarget,
                     options: PruneOptions) -> tuple[HiddenBasis, dict[str, float]]:
    """The basis (every column, for the report) and one scale per norm of ``config``'s model, made on rank 0."""
    names, d = _norm_sites(config.num_layers), config.hidden_size
    vectors, importance = torch.empty(d, d, dtype=torch.float64), torch.empty(d, dtype=torch.float64)
    values = torch.empty(len(names), dtype=torch.float64)
    if _first_rank():
        with _all_cores():
            moment, mean = stats.hidden_moment(layer_index)
            basis = hidden_basis(moment, mean, options.hidden_method, options.centred)
        vectors, importance = basis.vectors, basis.importance
        sites = stats.site_moments()
        if renumber_from is not None:  # parent numbering -> child numbering
            sites = {_renumber(name, renumber_from): m for name, m in sites.items()
                     if _renumber(name, renumber_from) is not None}
        basis_k = vectors[:, : target.hidden_size]
        values = torch.tensor([norm_scale(sites[name], basis_k, options.norm_compensation) for name in names],
                              dtype=torch.float64)
    vectors, importance, values = _from_first_rank([vectors, importance, values])
    return HiddenBasis(vectors, importance), dict(zip(names, values.tolist()))


def prune(parent: ModelState, target: PruneTarget, options: PruneOptions,
          calibrate: Calibrator) -> tuple[ModelState, dict]:
    target.check_against(parent.config)
    report: dict = {"options": dataclasses.asdict(options), "target": dataclasses.asdict(target),
                    "parameters": {"parent": parent.config.num_parameters()}}
    once = None if options.recalibrate else calibrate(parent, frozenset(STATISTICS))

    # 1. layers
    stats = once or calibrate(parent, frozenset({"layers"}))
    scores = stats.layer_scores()
    kept = select_layers(scores, target.num_layers, options.layer_method, options.seed)
    state = keep_layers(parent, kept)
    report["layers"] = {"scores": scores.tolist(), "kept": kept, "calibration_tokens": stats.tokens,
                        "calibration_seconds": stats.seconds}

    # 2. hidden size: fold norms, one basis for the whole network, compensate RMSNorm over fewer channels
    stats = once or calibrate(state, frozenset({"hidden"}))
    layer_index = kept if once else list(range(state.config.num_layers))
    basis, scales = _hidden_decision(stats, layer_index, kept if once else None, state.config, target, options)
    state = rotate_hidden(fold_norms(state), basis.vectors[:, : target.hidden_size], scales)
    explained = basis.explained()
    report["hidden"] = {"importance": basis.importance.tolist(), "explained": explained.tolist(),
                        "explained_at_target": explained[target.hidden_size - 1].item(),
                        "norm_scales": scales, "calibration_tokens": stats.tokens}

    # 3. FFN channels
    stats = once or calibrate(state, frozenset({"ffn"}))
    ffn_scores = stats.ffn_scores()[layer_index]
    channels = select_channels(ffn_scores, target.ffn_hidden_size, options.ffn_method, options.seed)
    state = keep_channels(state, channels)
    kept_mass = torch.gather(ffn_scores, 1, channels).sum(1) / ffn_scores.sum(1)
    quantiles = torch.quantile(ffn_scores.float(), torch.tensor([0.1, 0.5, 0.9]), dim=1).T.tolist()
    report["ffn"] = {"score_quantiles": quantiles, "kept_score_fraction": kept_mass.tolist(),
                     "calibration_tokens": stats.tokens}

    # 4. embeddings
    state = set_tied(state, target.tie_embeddings, options.tie_method)
    report["parameters"]["child"] = state.config.num_parameters()
    report["child_config"] = state.config.to_dict()
    return state, report


def _renumber(name: str, kept: list[int]) -> str | None:
    if not name.startswith("model.layers."):
        return name
    _, _, index, rest = name.split(".", 3)
    if int(index) not in kept:
        return None
    return f"model.layers.{kept.index(int(index))}.{rest}"
