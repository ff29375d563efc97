"""Streaming calibration statistics for pruning, gathered with forward hooks on a megatron model.

Nothing but running sums is kept (fp64 accumulators, each batch's contribution computed in the activation
dtype), so memory does not grow with the number of calibration tokens:
* ``layer_ratio_sum[l]``: sum over tokens of ||x_out|| / ||x_in|| of block l's residual stream;
* ``norm_moments[l, s]`` / ``norm_sums[l, s]``: sum of x x^T and of x for the inputs of block l's attention
  norm (s=0) and FFN norm (s=1); ``final_moment``: the same for the final norm (for norm compensation).
  With ``token_normalized`` (the default) each x is first scaled to RMS 1, i.e. the statistics are those of
  what the (weightless, folded) RMSNorm hands the next linear: every token weighs the same, and the few
  tokens with massive residual activations no longer decide the principal directions;
* ``ffn_sums[l, c]``: sum of |silu(W1 x) * W3 x| for intermediate channel c.
Masked tokens (padding) do not count. Under TP each rank sees replicated hidden states (or its sequence
shard with sequence parallelism, then summed) and its own FFN channels (then gathered); under PP each stage
fills its own layers; data-parallel ranks are summed.
The moments (``MOMENTS``: [L, 2, h, h] fp64, 16.8 GB for a 24B parent) are needed by the one rank that computes
the PCA: they are accumulated only where they differ (TP rank 0, or every TP rank with sequence parallelism) and
reduced to global rank 0; the other ranks' statistics carry None there. The small ones reach every rank.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.identity_op import IdentityOp
from tqdm import tqdm

from nemo_plugins.convert.model_io import local_layers
from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.forward import forward_only

STATISTICS = ("layers", "hidden", "ffn")
MOMENTS = ("norm_moments", "norm_sums", "final_moment")


@dataclass
class CalibrationStats:
    tokens: int
    layer_ratio_sum: torch.Tensor | None = None
    norm_moments: torch.Tensor | None = None
    norm_sums: torch.Tensor | None = None
    final_moment: torch.Tensor | None = None
    ffn_sums: torch.Tensor | None = None
    seconds: float = 0.0

    def layer_scores(self) -> torch.Tensor:
        return self.layer_ratio_sum / self.tokens

    def ffn_scores(self) -> torch.Tensor:
        return self.ffn_sums / self.tokens

    def hidden_moment(self, layers: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean second moment and mean of all attention- and FFN-norm inputs of ``layers`` (all by default)."""
        layers = list(range(self.norm_moments.shape[0])) if layers is None else layers
        n = self.tokens * 2 * len(layers)
        return self.norm_moments[layers].sum(dim=(0, 1)) / n, self.norm_sums[layers].sum(dim=(0, 1)) / n

    def site_moments(self) -> dict[str, torch.Tensor]:
        """Mean second moment of each norm's input, keyed by the HF name of the norm."""
        sites = {}
        for layer in range(self.norm_moments.shape[0]):
            sites[f"model.layers.{layer}.input_layernorm"] = self.norm_moments[layer, 0] / self.tokens
            sites[f"model.layers.{layer}.post_attention_layernorm"] = self.norm_moments[layer, 1] / self.tokens
        sites["model.norm"] = self.final_moment / self.tokens
        return sites


@dataclass
class _Accumulator:
    config: MistralConfig
    want: frozenset[str]
    sequence_parallel: bool
    token_normalized: bool = True
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # [s, b] for the batch in flight
    pending_in_norm: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c, f64, dev = self.config, torch.float64, device()
        if "layers" in self.want:
            self.stats["layer_ratio_sum"] = torch.zeros(c.num_layers, dtype=f64, device=dev)
        if "hidden" in self.want and self.holds_moments:
            self.stats["norm_moments"] = torch.zeros(c.num_layers, 2, c.hidden_size, c.hidden_size,
                                                     dtype=f64, device=dev)
            self.stats["norm_sums"] = torch.zeros(c.num_layers, 2, c.hidden_size, dtype=f64, device=dev)
            self.stats["final_moment"] = torch.zeros(c.hidden_size, c.hidden_size, dtype=f64, device=dev)
        if "ffn" in self.want:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            self.stats["ffn_sums"] = torch.zeros(c.num_layers, c.ffn_hidden_size // tp, dtype=f64, device=dev)

    @property
    def holds_moments(self) -> bool:
        """Without sequence parallelism every TP rank sees the same hidden states: one of them counts."""
        return self.sequence_parallel or parallel_state.get_tensor_model_parallel_rank() == 0

    def _residual_mask(self, hidden: torch.Tensor) -> torch.Tensor:
        """The [s_local, b] mask matching a residual-stream tensor (a sequence shard under SP)."""
        mask = self.mask
        if self.sequence_parallel and hidden.shape[0] != mask.shape[0]:
            rank = parallel_state.get_tensor_model_parallel_rank()
            mask = mask.chunk(parallel_state.get_tensor_model_parallel_world_size())[rank]
        return mask

    def layer_input(self, layer: int, hidden: torch.Tensor) -> None:
        self.pending_in_norm[layer] = hidden.float().norm(dim=-1)

    def layer_output(self, layer: int, hidden: torch.Tensor) -> None:
        ratio = hidden.float().norm(dim=-1) / self.pending_in_norm.pop(layer).clamp_min(1e-12)
        mask = self._residual_mask(hidden)
        self.stats["layer_ratio_sum"][layer] += (ratio * mask).sum().double()

    def norm_input(self, key: str, index: tuple[int, ...], hidden: torch.Tensor) -> None:
        mask = self._residual_mask(hidden)
        x = hidden.reshape(-1, hidden.shape[-1])[mask.reshape(-1).bool()]
        x = x.float()
        if self.token_normalized:
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True).clamp_min(1e-12))
        self.stats["norm_moments" if key == "norm" else "final_moment"][index] += (x.T @ x).double()
        if key == "norm":
            self.stats["norm_sums"][index] += x.sum(dim=0).double()

    def ffn_activation(self, layer: int, fc1_out: torch.Tensor) -> None:
        gate, up = fc1_out.float().chunk(2, dim=-1)
        importance = (F.silu(gate) * up).abs()
        self.stats["ffn_sums"][layer] += (importance * self.mask[..., None]).sum(dim=(0, 1)).double()


def _register_hooks(model: torch.nn.Module, acc: _Accumulator) -> list:
    handles = []
    layers = local_layers(model)
    for local, layer in zip(model.decoder.layers, layers):
        if "layers" in acc.want:
            handles.append(local.register_forward_pre_hook(
                lambda m, args, kwargs, g=layer: acc.layer_input(
                    g, kwargs.get("hidden_states", args[0] if args else None)),
                with_kwargs=True))
            handles.append(local.register_forward_hook(lambda m, args, out, g=layer: acc.layer_output(g, out[0])))
        if "norm_moments" in acc.stats:
            attention_norm = local.input_layernorm
            if isinstance(attention_norm, IdentityOp):  # Transformer Engine fuses the norm into linear_qkv
                attention_norm = local.self_attention.linear_qkv
            ffn_norm = local.pre_mlp_layernorm
            if isinstance(ffn_norm, IdentityOp):
                ffn_norm = local.mlp.linear_fc1
            handles.append(attention_norm.register_forward_pre_hook(
                lambda m, args, g=layer: acc.norm_input("norm", (g, 0), args[0])))
            handles.append(ffn_norm.register_forward_pre_hook(
                lambda m, args, g=layer: acc.norm_input("norm", (g, 1), args[0])))
        if "ffn" in acc.want:
            handles.append(local.mlp.linear_fc1.register_forward_hook(
                lambda m, args, out, g=layer: acc.ffn_activation(g, out[0])))
    if "norm_moments" in acc.stats and model.post_process:
        handles.append(model.decoder.final_layernorm.register_forward_pre_hook(
            lambda m, args: acc.norm_input("final", (), args[0])))
    return handles


def _reduce(acc: _Accumulator, tokens: int) -> CalibrationStats:
    stats = acc.stats
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if "layer_ratio_sum" in stats and acc.sequence_parallel:
        dist.all_reduce(stats["layer_ratio_sum"], group=tp_group)
    if "ffn_sums" in stats and parallel_state.get_tensor_model_parallel_world_size() > 1:
        shards = [torch.zeros_like(stats["ffn_sums"])
                  for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        dist.all_gather(shards, stats["ffn_sums"], group=tp_group)
        stats["ffn_sums"] = torch.cat(shards, dim=1)
    pp_group, dp_group = parallel_state.get_pipeline_model_parallel_group(), parallel_state.get_data_parallel_group()
    for name in [n for n in stats if n not in MOMENTS]:  # layers live on one stage each; the final norm on the last
        dist.all_reduce(stats[name], group=pp_group)
        dist.all_reduce(stats[name], group=dp_group)
    if "norm_moments" in stats:
        groups = [tp_group] if acc.sequence_parallel else []
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            groups += [pp_group, dp_group]
        for name, group in itertools.product(MOMENTS, groups):
            dist.reduce(stats[name], dst=dist.get_process_group_ranks(group)[0], group=group)
        if dist.get_rank() != 0:
            for name in MOMENTS:
                del stats[name]
    count = torch.tensor([float(tokens)], dtype=torch.float64, device=device())
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return CalibrationStats(tokens=int(count.item()), **{name: value.cpu() for name, value in stats.items()})


def calibrate(
    model: torch.nn.Module,
    config: MistralConfig,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    want: Iterable[str] = STATISTICS,
    micro_batch_size: int = 4,
    mask: torch.Tensor | None = None,
    progress: bool = True,
    token_normalized: bool = True,
) -> CalibrationStats:
    """Statistics of ``want`` over all rows of ``tokens`` / ``positions`` ``[n, s]``; this DP rank takes every
    dp-th row.

    Accumulators live on the model's device (reduced with the job's backend) and come back on the CPU.
    """
    want = frozenset(want)
    unknown = want - set(STATISTICS)
    if unknown:
        raise ConfigError(f"unknown calibration statistics {sorted(unknown)}; allowed: {STATISTICS}")
    if tokens.numel() == 0:
        raise ConfigError("calibration data is empty: give prune.calibration.tokens > 0 and a non-empty data mix")
    mask = torch.ones_like(tokens, dtype=torch.float32) if mask is None else mask.float()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    chosen = list(range(dp_rank, tokens.shape[0], dp_size))
    acc = _Accumulator(config, want, model.config.sequence_parallel, token_normalized)
    handles = _register_hooks(model, acc)
    counted = 0
    start = time.perf_counter()
    bar = tqdm(total=int(mask[chosen].sum().item()), unit="tok", unit_scale=True, desc="calibration",
               disable=not progress or dist.get_rank() != 0)
    try:
        for i in range(0, len(chosen), micro_batch_size):
            index = chosen[i : i + micro_batch_size]
            acc.mask = mask[index].T.contiguous().to(device())
            forward_only(model, [(tokens[index], positions[index], None)])
            batch_tokens = int(mask[index].sum().item())
            counted += batch_tokens
            bar.update(batch_tokens)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()
    result = _reduce(acc, counted)
    result.seconds = time.perf_counter() - start
    return result
