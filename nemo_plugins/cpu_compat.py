"""Run megatron-core on machines without CUDA (tests, the CPU demo), unchanged on GPUs.

megatron-core assumes CUDA in a handful of places (checked on 0.16.1 and 0.19.x):

* ``device="cuda"`` / ``device=torch.cuda.current_device()`` in factory calls: rotary embeddings, YaRN,
  ``transformer.utils.get_default_causal_mask``, the pipeline schedules (``total_num_tokens``), p2p
  communication (shape exchange), the optimizer (loss-scale and found-inf tensors), ``clip_grads``;
* ``torch.cuda.synchronize`` / ``empty_cache`` in p2p communication and DDP;
* the CUDA RNG state tracker behind ``model_parallel_cuda_manual_seed`` and dropout;
* ``LanguageModule.setup_embeddings_and_output_layer`` calling ``weight.data.cuda()`` before the
  first/last-stage all-reduce of tied embeddings under pipeline parallelism;
* ``clip_grad_by_total_norm_fp32`` asserting ``grad.type() == 'torch.cuda.FloatTensor'``;
* the mixed-precision optimizer (``Float16OptimizerWithFloat16Params``, a bf16 run without the distributed
  optimizer) sorting parameters by ``param.type()`` in ``'torch.cuda.BFloat16Tensor'`` / ``'torch.cuda.FloatTensor'``
  and refusing anything else: during its construction a CPU tensor's type is named as its CUDA twin.

On a machine where CUDA is unavailable every one of those calls would raise, so nothing is lost by
redirecting them to the CPU. The mechanism is deliberately narrow: each listed megatron module gets a
proxy as its module-global ``torch`` that maps CUDA device arguments to the CPU and ``torch.cuda``'s
stream/sync/RNG calls to their CPU equivalents; everything else is the real ``torch``. Nothing is
patched when CUDA is available, and nothing on import: entry points call ``install()``. Each patched
behaviour has a test in ``tests/test_cpu_compat.py`` so an upgrade that moves a call fails loudly
instead of silently taking the CUDA path.

The distributed optimizer is CUDA-only in megatron-core; callers must use the plain megatron optimizer
on CPU (see ``use_distributed_optimizer_allowed``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import types
from typing import Any

import torch

from nemo_plugins import megatron_compat  # noqa: F401 - the version guard covers these patches too

logger = logging.getLogger(__name__)

# Modules whose module-global ``torch`` is replaced by the CPU proxy, with why.
PATCHED_MODULES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq on torch.cuda.current_device()",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "inv_freq moved to cuda in get_emb",
    "megatron.core.transformer.utils": 'get_default_causal_mask uses device="cuda"',
    "megatron.core.pipeline_parallel.schedules": 'total_num_tokens on device="cuda"',
    "megatron.core.pipeline_parallel.p2p_communication": "shape tensors on current_device, cuda.synchronize",
    "megatron.core.tensor_parallel.random": "CUDA RNG tracker (manual_seed / get_rng_state)",
    "megatron.core.optimizer.optimizer": "found_inf / loss-scale tensors on cuda",
    "megatron.core.optimizer.clip_grads": "grad-norm reduction tensors on cuda",
    "megatron.core.distributed.distributed_data_parallel": "cuda.synchronize / empty_cache",
    "megatron.core.distributed.param_and_grad_buffer": "buffers on current_device",
    "megatron.core.utils": "GlobalMemoryBuffer (attention matmul buffer) on current_device",
    "megatron.core.tensor_parallel.mappings": "TP gather/reduce-scatter buffers on current_device",
    "megatron.core.tensor_parallel.layers": "sequence-parallel all-gather buffers on current_device",
    "megatron.core.tensor_parallel.data": "broadcast_data size/data tensors on cuda",
    "megatron.core.tensor_parallel.utils": "split/gather helper buffers on current_device",
    "megatron.core.transformer.module": "Float16Module / embedding-sync tensors on current_device",
    "megatron.core.dist_checkpointing.exchange_utils": "fully-parallel exchange buffers on cuda",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save-plan agreement tensors on cuda",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize before writing",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "cuda.synchronize in parallel load/save",
    "megatron.core.dist_checkpointing.strategies.async_utils": "cuda.synchronize / liveness tensors",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "cuda.synchronize",
}

_FACTORY_FUNCTIONS = ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand",
                      "zeros_like", "ones_like", "empty_like")

_installed = False


def _to_cpu_device(device: Any) -> Any:
    """Map any CUDA device spelling (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, an int) to CPU."""
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _NullStream:
    """Stands in for a CUDA stream: work on the CPU is already ordered."""

    def wait_stream(self, _other: Any) -> None:
        return None

    def wait_event(self, _event: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


class _CpuCuda(types.SimpleNamespace):
    """``torch.cuda`` as seen by patched modules: device queries say CPU, sync is a no-op, RNG is the CPU RNG."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(*_args: Any, **_kwargs: Any) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def current_stream(*_args: Any, **_kwargs: Any) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def Stream(*_args: Any, **_kwargs: Any) -> _NullStream:  # noqa: N802 - mirrors torch.cuda.Stream
        return _NullStream()

    @staticmethod
    def stream(_stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _CpuTorch(types.ModuleType):
    """The ``torch`` module with CUDA device arguments of factory functions mapped to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORY_FUNCTIONS:
            setattr(self, name, self._cpu_factory(getattr(torch, name)))

    @staticmethod
    def _cpu_factory(fn: Any) -> Any:
        def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
            if "device" in kwargs:
                kwargs["device"] = _to_cpu_device(kwargs["device"])
            return fn(*args, **kwargs)

        factory.__name__ = fn.__name__
        return factory

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_clip_grad_by_total_norm_fp32(parameters: Any, max_norm: float, total_norm: float,
                                      use_decoupled_grad: bool = False) -> None:
    """CPU twin of megatron's ``clip_grad_by_total_norm_fp32`` without its ``torch.cuda.FloatTensor`` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 gradients, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _tensor_method(name: str, replacement: Any):
    """Inside this block ``torch.Tensor.<name>`` is ``replacement`` (it may call the original, passed to it)."""
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, replacement(original))
    try:
        yield
    finally:
        setattr(torch.Tensor, name, original)


def _cuda_is_identity(_original: Any) -> Any:
    """``Tensor.cuda()`` returning the tensor itself (CPU-only machines)."""
    return lambda self, *args, **kwargs: self


def _cuda_type_names(original: Any) -> Any:
    """``Tensor.type()`` naming a CPU tensor's type as its CUDA twin ('torch.BFloat16Tensor' ->
    'torch.cuda.BFloat16Tensor'): what megatron's mixed-precision optimizer checks to sort parameters into bf16
    ones (given fp32 main copies) and fp32 ones."""

    def cuda_named(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        return name if args or kwargs or name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)

    return cuda_named


def _run_with_tensor_method(owner: type, method: str, name: str, replacement: Any) -> None:
    """Patch ``owner.method`` to run with ``torch.Tensor.<name>`` swapped for ``replacement``."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def patched(self, *args, **kwargs):
        with _tensor_method(name, replacement):
            return original(self, *args, **kwargs)

    setattr(owner, method, patched)


def _patch_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    _run_with_tensor_method(LanguageModule, "setup_embeddings_and_output_layer", "cuda", _cuda_is_identity)


def _patch_mixed_precision_optimizer() -> None:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    _run_with_tensor_method(Float16OptimizerWithFloat16Params, "__init__", "type", _cuda_type_names)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def use_distributed_optimizer_allowed() -> bool:
    """megatron's DistributedOptimizer allocates CUDA buffers and streams: allowed only on GPUs."""
    return cuda_available()


def resolve_distributed_optimizer(requested: bool) -> bool:
    """The ``use_distributed_optimizer`` to pass megatron: as requested on GPUs, plain optimizer (logged) on CPU."""
    if requested and not use_distributed_optimizer_allowed():
        logger.warning("DistributedOptimizer is CUDA-only in megatron-core: using the plain megatron optimizer on CPU")
        return False
    return requested


def installed() -> bool:
    """Whether ``install()`` has patched megatron-core in this process."""
    return _installed


def install() -> bool:
    """Patch megatron-core for CPU execution if (and only if) CUDA is unavailable. Idempotent.

    Called explicitly by every entry point (the recipes, the test session, spawned test workers, bench scripts)
    before megatron is initialised; importing this module patches nothing. Returns True when the patches are active.
    """
    global _installed
    if cuda_available():
        return False
    if _installed:
        return True
    proxy = _CpuTorch()
    for module_name in PATCHED_MODULES:
        module = importlib.import_module(module_name)
        module.torch = proxy
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    if hasattr(optimizer, "clip_grad_by_total_norm_fp32"):
        optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    _patch_tied_embedding_setup()
    _patch_mixed_precision_optimizer()
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _installed = True
    logger.info("megatron-core CPU compatibility active (no CUDA): %d modules patched", len(PATCHED_MODULES))
    return True
