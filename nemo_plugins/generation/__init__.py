"""Generation: batched sampling with a KV cache, loop detection, tool-call injection, behind one interface.

``engine`` defines what every backend takes and returns; ``torch_engine`` is the backend everywhere (CPU and
GPU, megatron-core's static KV cache); ``megatron_engine`` wraps megatron-core's dynamic inference engine on
GPUs, opt-in. Tools themselves (registry, sandbox) and chat formats live elsewhere and reach the engine only
through a ``ToolHook``.
"""

from __future__ import annotations

import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import GenerationBackend, Request, Response, SamplingParams, ToolHook
from nemo_plugins.generation.loops import LoopConfig, LoopVerdict

BACKENDS = ("torch", "megatron")


def build_backend(backend: str, model: torch.nn.Module, tokenizer=None, max_batch_size: int = 32,
                  max_sequence_length: int = 4096) -> GenerationBackend:
    """``generation.backend``: "torch" (everywhere) or "megatron" (GPUs with megatron-core 0.19, no tools)."""
    if backend == "torch":
        from nemo_plugins.generation.torch_engine import TorchEngine

        return TorchEngine(model, max_batch_size=max_batch_size)
    if backend == "megatron":
        from nemo_plugins.generation.megatron_engine import MegatronDynamicEngine

        return MegatronDynamicEngine(model, tokenizer, max_sequence_length)
    raise ConfigError(f"generation.backend={backend!r} is not one of {list(BACKENDS)}")


__all__ = ["BACKENDS", "GenerationBackend", "LoopConfig", "LoopVerdict", "Request", "Response", "SamplingParams",
           "ToolHook", "build_backend"]
