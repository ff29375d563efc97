"""Generation: batched sampling with a KV cache, loop detection, tool-call injection, behind one interface.

``engine`` defines what every backend takes and returns; ``torch_engine`` is the backend everywhere (CPU and
GPU, megatron-core's static KV cache); ``megatron_engine`` wraps megatron-core's dynamic inference engine on
GPUs, opt-in. Tools themselves (registry, sandbox) and chat formats live elsewhere and reach the engine only
through a ``ToolHook``.
"""

from nemo_plugins.generation.engine import GenerationBackend, Request, Response, SamplingParams, ToolHook
from nemo_plugins.generation.loops import LoopConfig, LoopVerdict

__all__ = ["GenerationBackend", "LoopConfig", "LoopVerdict", "Request", "Response", "SamplingParams", "ToolHook"]
