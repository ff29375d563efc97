"""Training settings, validated when the recipe starts (before any model is built)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_plugins.errors import ConfigError
from nemo_plugins.model.fast_path import SpeedOptions

DECAY_STYLES = ("cosine", "linear", "constant", "WSD")
PRECISIONS = ("float32", "bfloat16")
FP8_FORMATS = (None, "hybrid", "e4m3")


@dataclass
class OptimizerSettings:
    """Adam with decoupled weight decay, global-norm clipping, warmup then cosine / linear / WSD decay."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = 0.05
    decay_style: str = "cosine"
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps anneals

    def __post_init__(self) -> None:
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer: need 0 <= min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.decay_style not in DECAY_STYLES:
            raise ConfigError(f"optimizer.decay_style={self.decay_style!r}; allowed: {', '.join(DECAY_STYLES)}")
        for name in ("warmup_fraction", "wsd_decay_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optimizer.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_grad < 0:
            raise ConfigError("optimizer.clip_grad must be >= 0 (0 disables clipping)")


@dataclass
class TrainSettings:
    """How many tokens, in which batches, and how often to log / evaluate / checkpoint."""

    seq_len: int = 512
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_tokens: int = 65536
    precision: str = "float32"
    fp8: str | None = None
    log_interval: int = 1
    eval_interval: int = 0  # 0: evaluate at the start and the end only
    eval_rows_per_source: int = 4
    save_interval: int = 0  # 0: only the final checkpoint
    save_interval_minutes: float = 0.0  # also save when this much wall time passed since the last save (0: off)
    keep_last: int = 2
    max_nonfinite_steps: int = 3
    seed: int = 1234
    # globs over parameter names (e.g. "vision.*"): no gradient, no optimizer state
    frozen_parameters: tuple[str, ...] = ()
    recompute: str = "none"  # activation recompute: none | selective | full
    fp8_recipe: str = "delayed"  # with train.fp8 on TE: delayed | tensorwise | blockwise | mxfp8
    fp8_amax_history_len: int = 1024  # delayed scaling: amax history length
    fp8_bf16_first_last: bool = False  # first and last layers in bf16 (current-scaling recipes only)

    def __post_init__(self) -> None:
        frozen = self.frozen_parameters
        if not isinstance(frozen, (list, tuple)) or not all(isinstance(p, str) for p in frozen):
            raise ConfigError(f"train.frozen_parameters must be a list of globs over parameter names (e.g. "
                              f"['vision.*']), got {self.frozen_parameters!r}")
        object.__setattr__(self, "frozen_parameters", tuple(self.frozen_parameters))
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "train_tokens", "log_interval",
                     "eval_rows_per_source", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if not self.save_interval_minutes >= 0:
            raise ConfigError(f"train.save_interval_minutes must be >= 0 (0 turns time-based saves off), "
                              f"got {self.save_interval_minutes}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision={self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        if self.fp8 not in FP8_FORMATS:
            raise ConfigError(f"train.fp8={self.fp8!r}; allowed: null, hybrid, e4m3")
        self.speed  # building it checks recompute and the FP8 options
        if self.train_tokens < self.tokens_per_step:
            raise ConfigError(f"train.train_tokens={self.train_tokens} is less than one step "
                              f"(global_batch_size x seq_len = {self.tokens_per_step})")

    @property
    def speed(self) -> SpeedOptions:
        """What this run asks of the GPU fast path (``model.fast_path``)."""
        return SpeedOptions(self.recompute, self.fp8, self.fp8_recipe, self.fp8_amax_history_len,
                            self.fp8_bf16_first_last)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def steps(self) -> int:
        return self.train_tokens // self.tokens_per_step

    def microbatches(self, data_parallel_size: int) -> int:
        per_rank = self.global_batch_size // self.micro_batch_size
        if per_rank % data_parallel_size:
            raise ConfigError(f"train.global_batch_size / micro_batch_size = {per_rank} micro-batches cannot be "
                              f"split over {data_parallel_size} data-parallel ranks")
        return per_rank // data_parallel_size
