"""Which of megatron-core's fused kernels, recompute and FP8 settings a run gets: one pure decision from what is
importable, the device and what the run asks for, logged, so a CPU test can pin every branch.

On the CPU (tests, the demo) every fusion stays off: the kernels are CUDA-only, and the local spec's numerics are
pinned bit for bit (tests/test_loop_reference.py). On a GPU:

* ``bias_activation_fusion``: megatron's fused SwiGLU (a jit-fused elementwise kernel, no extra package);
* ``apply_rope_fusion``: Transformer Engine's fused RoPE (also THD and CP-aware); TE's kernel has no YaRN
  concentration factor, so only when that factor is 1 (Ministral 3: mscale == mscale_all_dim);
* ``gradient_accumulation_fusion``: wgrad GEMMs accumulate into megatron DDP's fp32 ``main_grad``; megatron's own
  output layer demands apex's ``fused_weight_gradient_mlp_cuda`` for it even under TE, so only with apex;
* ``masked_softmax_fusion``: the local spec's fused softmax, only with its CUDA kernels (TE has its own attention);
* ``persist_layer_norm`` stays off: it selects apex's persistent LayerNorm kernel, and these models use RMSNorm.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field

import torch

from nemo_plugins.errors import ConfigError

logger = logging.getLogger(__name__)

RECOMPUTE = ("none", "selective", "full")
FP8_FORMATS = (None, "hybrid", "e4m3")
# recipe -> (minimum TE version, minimum GPU compute capability) for megatron's fp8_utils.get_fp8_recipe
FP8_RECIPES = {"delayed": ((1, 0), (8, 9)), "tensorwise": ((2, 2), (8, 9)), "blockwise": ((2, 3), (9, 0)),
               "mxfp8": ((2, 1), (10, 0))}


@dataclass(frozen=True)
class Available:
    """What this process can use; ``probe()`` looks, tests state it."""

    cuda: bool = False
    compute_capability: tuple[int, int] | None = None
    transformer_engine: tuple[int, int] | None = None  # (major, minor) when importable
    apex_fused_wgrad: bool = False
    fused_softmax: bool = False

    @classmethod
    def probe(cls) -> Available:
        cuda = torch.cuda.is_available()
        te = None
        if importlib.util.find_spec("transformer_engine") is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                te = tuple(int(part) for part in version("transformer_engine").split(".")[:2])
            except (PackageNotFoundError, ValueError):
                te = (0, 0)
        found = lambda name: importlib.util.find_spec(name) is not None  # noqa: E731
        return cls(cuda=cuda, compute_capability=torch.cuda.get_device_capability() if cuda else None,
                   transformer_engine=te, apex_fused_wgrad=found("fused_weight_gradient_mlp_cuda"),
                   fused_softmax=(found("scaled_masked_softmax_cuda")
                                  and found("scaled_upper_triang_masked_softmax_cuda")))


@dataclass(frozen=True)
class SpeedOptions:
    """What the run asks for (``train.*``); ``fast_path`` says what it gets on this machine."""

    recompute: str = "none"
    fp8: str | None = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_bf16_first_last: bool = False

    def __post_init__(self) -> None:
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"train.recompute={self.recompute!r}; allowed: {', '.join(RECOMPUTE)}")
        if self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"train.fp8={self.fp8!r}; allowed: null, hybrid, e4m3")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(f"train.fp8_recipe={self.fp8_recipe!r}; allowed: {', '.join(FP8_RECIPES)}")
        if self.fp8_amax_history_len < 1:
            raise ConfigError(f"train.fp8_amax_history_len must be >= 1, got {self.fp8_amax_history_len}")
        if self.fp8_bf16_first_last and self.fp8_recipe == "delayed":
            raise ConfigError("train.fp8_bf16_first_last needs a current-scaling recipe "
                              "(TE's delayed scaling cannot skip layers): "
                              "set train.fp8_recipe=tensorwise or blockwise, or fp8_bf16_first_last=false")


@dataclass(frozen=True)
class FastPath:
    """TransformerConfig fields to set, and why each fusion is on or off (logged once per model)."""

    config: dict[str, object]
    why: dict[str, str] = field(default_factory=dict)

    def log(self) -> None:
        for name, reason in self.why.items():
            logger.info("%s=%s (%s)", name, self.config.get(name), reason)


def yarn_concentration(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """YaRN's attention concentration (megatron's ``_yarn_get_concentration_factor``): 1.0 when the two mscales
    agree or the factor is <= 1."""
    def get(m: float) -> float:
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
    return get(mscale) / get(mscale_all_dim)


def fast_path(available: Available, use_te: bool, options: SpeedOptions, concentration: float = 1.0) -> FastPath:
    """The fused kernels, recompute and FP8 settings for a model on this machine (see the module docstring)."""
    gpu, te = available.cuda, use_te and available.transformer_engine is not None
    config: dict[str, object] = {}
    why: dict[str, str] = {}

    def decide(name: str, on: bool, reason: str) -> None:
        config[name] = on
        why[name] = reason

    decide("bias_activation_fusion", gpu, "fused SwiGLU" if gpu else "CUDA kernel; no GPU")
    decide("apply_rope_fusion", gpu and te and concentration == 1.0,
           "TE fused RoPE" if gpu and te and concentration == 1.0 else
           "needs TE on a GPU" if not (gpu and te) else f"YaRN concentration {concentration:.4f} != 1 (TE has none)")
    decide("gradient_accumulation_fusion", gpu and available.apex_fused_wgrad,
           "fused wgrad into main_grad" if gpu and available.apex_fused_wgrad else
           "megatron's output layer needs apex's fused_weight_gradient_mlp_cuda")
    decide("masked_softmax_fusion", gpu and not te and available.fused_softmax,
           "TE attention has its own kernels" if te else
           "fused softmax kernels" if gpu and available.fused_softmax else "no fused softmax kernels")
    decide("persist_layer_norm", False, "apex persistent LayerNorm only; these models use RMSNorm")

    if options.recompute == "selective":
        # TE's fused attention keeps no [s, s] scores, so the MLP (2 x ffn per token) is what is worth recomputing
        config.update(recompute_granularity="selective", recompute_modules=["mlp"] if te else ["core_attn"])
    elif options.recompute == "full":
        config.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    why["recompute_granularity"] = f"train.recompute={options.recompute}"

    if options.fp8:
        config.update(_fp8(available, use_te, options))
        why["fp8_recipe"] = f"train.fp8={options.fp8}"
    return FastPath(config, why)


def _fp8(available: Available, use_te: bool, options: SpeedOptions) -> dict[str, object]:
    """TransformerConfig FP8 fields, or a ConfigError saying what this machine lacks."""
    if not (use_te and available.cuda and available.transformer_engine):
        raise ConfigError(f"train.fp8={options.fp8!r} needs Transformer Engine on a GPU (none usable here): "
                          "set train.fp8=null")
    min_te, min_cc = FP8_RECIPES[options.fp8_recipe]
    if available.transformer_engine < min_te:
        raise ConfigError(f"train.fp8_recipe={options.fp8_recipe} needs Transformer Engine >= "
                          f"{min_te[0]}.{min_te[1]} (found {available.transformer_engine[0]}."
                          f"{available.transformer_engine[1]}): upgrade TE or set train.fp8_recipe=delayed")
    if available.compute_capability is None or available.compute_capability < min_cc:
        raise ConfigError(f"train.fp8_recipe={options.fp8_recipe} needs a GPU of compute capability >= "
                          f"{min_cc[0]}.{min_cc[1]} (this one: {available.compute_capability}): choose another recipe")
    fields: dict[str, object] = {"fp8": options.fp8, "fp8_recipe": options.fp8_recipe}
    if options.fp8_recipe == "delayed":
        fields.update(fp8_amax_history_len=options.fp8_amax_history_len, fp8_amax_compute_algo="max")
    if options.fp8_bf16_first_last:
        fields.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    return fields
