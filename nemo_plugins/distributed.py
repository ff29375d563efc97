"""Process-group set-up: torch.distributed (gloo on CPU, NCCL on GPU) + megatron's model-parallel groups."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from nemo_plugins import cpu_compat
from nemo_plugins.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is whatever remains of the world size."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1")

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not a multiple of tp*pp*cp={model_parallel} "
                f"(tp={self.tp}, pp={self.pp}, cp={self.cp})"
            )
        return world_size // model_parallel


def device() -> torch.device:
    """The device of this rank: its local GPU under torchrun, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Initialise torch.distributed (from torchrun's env, or a 1-process group) and megatron's groups.

    Safe to call again with the same layout (tests, notebooks): existing groups are reused. Without CUDA the entry
    point must have installed the CPU compat first (``cpu_compat.install()``): megatron would take CUDA paths.
    """
    if not torch.cuda.is_available() and not cpu_compat.installed():
        raise RuntimeError("no CUDA and megatron-core's CPU compat is not installed: call "
                           "nemo_plugins.cpu_compat.install() at the entry point, before initialize()")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(
                backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
        logger.info("torch.distributed: backend=%s world_size=%d", backend, dist.get_world_size())
    parallel.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        same = (
            parallel_state.get_tensor_model_parallel_world_size() == parallel.tp
            and parallel_state.get_pipeline_model_parallel_world_size() == parallel.pp
            and parallel_state.get_context_parallel_world_size() == parallel.cp
        )
        if same:
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
