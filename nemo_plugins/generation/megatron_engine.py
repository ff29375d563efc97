"""Optional GPU backend: megatron-core's dynamic inference engine (in-flight batching, paged KV cache).

UNRUN: written from megatron-core 0.19's source (the NGC image's version: ``InferenceConfig``,
``DynamicInferenceContext(model_config, inference_config)``, ``GPTInferenceWrapper(model, context)``); no
session that wrote it had a GPU. 0.16 spells every one of those constructors differently, so ``available()``
is False there and ``TorchEngine`` is the backend. Opt-in only (``generation.backend=megatron``).

What it cannot do the way ``TorchEngine`` does is refused, not approximated:
- tool hooks (megatron's engine has no per-token callback) and more than one stop token per request
  (megatron has one ``termination_id``);
- models with attention temperature: the dynamic path's flash-attention kernels bypass the core-attention
  module that applies the query scale;
- local-spec models: dynamic batching needs Transformer Engine / flash attention.
Sampling randomness comes from one generator per engine (``seed``), not per request: a sampled response
depends on its batch. Log-probs are megatron's log-softmax of the raw logits, the torch engine's definition.
Loops are detected on the finished responses (no early stop).
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.models.gpt import GPTModel

from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import Request, Response, ToolHook
from nemo_plugins.generation.loops import find_loop, no_stop


def available() -> bool:
    """CUDA and the 0.19 inference API."""
    if not torch.cuda.is_available():
        return False
    try:
        from megatron.core.inference.config import InferenceConfig  # noqa: F401
    except ImportError:
        return False
    return True


class _GPTForward(torch.nn.Module):
    """The model through plain ``GPTModel.forward``: with a dynamic context ``position_ids`` hold every packed
    token's absolute position and the context knows where requests start, so ``MistralGPTModel`` must not
    derive a packed-document mask from them."""

    def __init__(self, model: GPTModel) -> None:
        super().__init__()
        self.module = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        return GPTModel.forward(self.module, *args, **kwargs)


class _Detokenizer:
    """What megatron's engine calls on a tokenizer (it detokenizes every finished request)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eod = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


class MegatronDynamicEngine:
    """``GenerationBackend`` over megatron-core's ``DynamicInferenceEngine`` (GPUs, TE models, no tools)."""

    def __init__(self, model: GPTModel, tokenizer, max_sequence_length: int, buffer_size_gb: float = 20.0,
                 seed: int = 0) -> None:
        if not available():
            raise ConfigError("generation.backend=megatron needs CUDA and megatron-core's 0.19 inference API; "
                              "set generation.backend=torch")
        if model.config.attention_temperature_period is not None:
            raise ConfigError("generation.backend=megatron cannot apply attention temperature (its kernels bypass "
                              "the query scale): set generation.backend=torch for this model")
        if not model.uses_transformer_engine:
            raise ConfigError("generation.backend=megatron needs a Transformer Engine model (flash attention); "
                              "set generation.backend=torch")
        from megatron.core.inference.config import InferenceConfig
        from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
        from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.text_generation_controllers.text_generation_controller import (
            TextGenerationController,
        )

        model.config.inference_sampling_seed = seed
        context = DynamicInferenceContext(model.config, InferenceConfig(
            max_sequence_length=max_sequence_length, buffer_size_gb=buffer_size_gb,
            materialize_only_last_token_logits=False))
        controller = TextGenerationController(GPTInferenceWrapper(_GPTForward(model), context), _Detokenizer(tokenizer))
        self.engine = DynamicInferenceEngine(controller, context)
        self._next_id = 0

    def generate(self, requests: Sequence[Request], tool_hook: ToolHook | None = None) -> list[Response]:
        from megatron.core.inference.sampling_params import SamplingParams as MegatronSampling

        if tool_hook is not None:
            raise ConfigError("generation.backend=megatron cannot run tools during generation: "
                              "set generation.backend=torch")
        ids = {}
        for request in requests:
            p = request.params
            if len(p.stop_token_ids) > 1:
                raise ConfigError(f"generation.backend=megatron takes one stop token per request, got "
                                  f"{list(p.stop_token_ids)}: set generation.backend=torch")
            ids[self._next_id] = request
            self.engine.add_request(self._next_id, list(request.prompt_ids), MegatronSampling(
                temperature=1.0 if p.greedy else p.temperature, top_k=1 if p.greedy else p.top_k,
                top_p=0.0 if p.greedy or p.top_p == 1 else p.top_p, return_log_probs=True,
                skip_prompt_log_probs=True, num_tokens_to_generate=p.max_new_tokens,
                termination_id=p.stop_token_ids[0] if p.stop_token_ids else -1))
            self._next_id += 1
        finished = []
        while self.engine.has_unfinished_requests():
            finished.extend(record.merge() for record in self.engine.step_modern()["finished_request_records"])
        by_id = {r.request_id: r for r in finished}
        return [self._response(request, by_id[i]) for i, request in ids.items()]

    @staticmethod
    def _response(request: Request, result) -> Response:
        tokens = [int(t) for t in result.generated_tokens]
        stopped = bool(tokens) and tokens[-1] in request.params.stop_token_ids
        response = Response(prompt_ids=list(request.prompt_ids), token_ids=tokens,
                            logprobs=[float(x) for x in result.generated_log_probs], policy_mask=[1] * len(tokens),
                            finish_reason="stop" if stopped else "length", loop=find_loop(tokens, request.params.loop))
        if response.loop is None and not stopped:
            response.loop = no_stop(len(tokens))
        return response
