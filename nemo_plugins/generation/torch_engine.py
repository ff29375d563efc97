"""Batched generation on our megatron model with megatron-core's own static KV cache (CPU and GPU).

KV cache: megatron-core's ``StaticInferenceContext`` (same constructor in 0.16 and 0.19), passed to
``GPTModel.forward(inference_context=...)``: every attention layer writes the new tokens' keys and values at
``sequence_len_offset`` and attends to all cached slots. It runs on the CPU with the local spec as it is,
except that megatron allocates the cache lazily with ``device=torch.cuda.current_device()``; the engine
allocates those buffers itself on ``device()`` in the model's dtype before the first forward, and megatron
then uses them. The last position's final-norm hidden state (``return_hidden=True``) gives the logits.
megatron indexes the buffers as ``[slot, batch, kv heads, head_dim]``; for the local spec's SDPA, which reads
them as ``[batch, kv heads, slot, head_dim]``, the engine stores them in that order and hands megatron the
permuted view: each head's keys are then one contiguous block, and a 128-row bf16 decode step's attention took
7 ms a layer instead of 27 ms on strided slots (2-core CPU). Transformer Engine keeps megatron's own layout.
Keys are cached rotated (``model.rotated_key_cache``), so a decode step rotates its new keys only.

Batching: prompts are left-padded to the longest of the batch and an explicit mask hides each row's pad
slots in the prefill and in every decode step. In the static context rotary embeddings follow the cache
slot, not ``position_ids``: left padding shifts a whole row, which relative RoPE (and YaRN) cannot see, and
every row feeds exactly one token per decode step, so its tokens stay contiguous. ``position_ids`` carry
each row's absolute positions, from which ``MistralGPTModel`` derives the attention-temperature query scale;
with the explicit mask it never derives a packed-document mask from them. Transformer Engine's causal
kernels ignore explicit masks, so with a TE model a batch only holds prompts of one length.

Tool output returned by the hook is fed one token per decode step (the row's sampled logits are ignored
until it is consumed), so rows never get holes. Finished rows leave the batch: their cache rows are dropped.
The cache is allocated up front per batch: 2 x layers x batch x (longest prompt + largest max_new_tokens) x
kv heads per TP rank x head_dim values in the model's dtype; ``max_batch_size`` bounds it.

Tensor parallelism: each rank computes its vocabulary slice of the last position's logits and the slices
are all-gathered ([batch, vocab] fp32 per step), so every rank samples the same token from the same
distribution (see ``sampling``). The tool hook runs on TP rank 0 and its ids are broadcast to the group.
Pipeline / context / sequence parallelism are refused: one decode step is one token per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from nemo_plugins.distributed import ParallelConfig, device
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.engine import Request, Response, ToolHook
from nemo_plugins.generation.loops import NgramCounter, no_stop
from nemo_plugins.generation.sampling import RequestDraws, choose_tokens


def generation_layout(parallel: ParallelConfig) -> ParallelConfig:
    """The layout to load a model in for generation: the training layout's tensor parallelism, one pipeline
    stage, no context or sequence parallelism (what ``check_layout`` accepts)."""
    return ParallelConfig(tp=parallel.tp)


def check_layout(config) -> None:
    """The parallel layouts a one-token decode step can run under."""
    if config.pipeline_model_parallel_size > 1:
        raise ConfigError(f"the generation engine runs the model on one pipeline stage: parallel.pp="
                          f"{config.pipeline_model_parallel_size} is not supported; load the model with parallel.pp=1")
    if config.context_parallel_size > 1:
        raise ConfigError(f"generation cannot split one decode token over context-parallel ranks: parallel.cp="
                          f"{config.context_parallel_size}; load the model with parallel.cp=1")
    if config.sequence_parallel:
        raise ConfigError("generation cannot split one decode token over sequence-parallel ranks: load the model "
                          "with parallel.sequence_parallel=false")


def plan_batches(lengths: Sequence[int], max_batch_size: int, equal_lengths: bool) -> list[list[int]]:
    """Request indices per batch: sorted by prompt length (less padding), one length per batch if asked."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < max_batch_size and (not equal_lengths or lengths[groups[-1][0]] == lengths[i]):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class _Row:
    """One request in flight; ``fed`` counts the response tokens already run through the model."""

    index: int
    request: Request
    draws: RequestDraws
    counter: NgramCounter
    response: Response = field(init=False)
    fed: int = 0

    def __post_init__(self) -> None:
        self.response = Response(prompt_ids=list(self.request.prompt_ids))

    @property
    def done(self) -> bool:
        return bool(self.response.finish_reason)

    @property
    def room(self) -> int:
        return self.request.params.max_new_tokens - len(self.response.token_ids)

    def finish(self, reason: str) -> None:
        self.response.finish_reason = reason
        if reason == "length" and self.response.loop is None:
            self.response.loop = no_stop(sum(self.response.policy_mask))


class TorchEngine:
    """``GenerationBackend`` over a ``MistralGPTModel``; a collective over its tensor-parallel group."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int = 32, pad_id: int = 0) -> None:
        check_layout(model.config)
        if max_batch_size < 1:
            raise ConfigError(f"generation.max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.pad_id = pad_id

    def generate(self, requests: Sequence[Request], tool_hook: ToolHook | None = None) -> list[Response]:
        responses: list[Response | None] = [None] * len(requests)
        lengths = [len(r.prompt_ids) for r in requests]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for batch in plan_batches(lengths, self.max_batch_size, self.model.uses_transformer_engine):
                    rows = [_Row(i, requests[i], RequestDraws(requests[i].params.seed),
                                 NgramCounter(requests[i].params.loop)) for i in batch]
                    self._run(rows, tool_hook)
                    for row in rows:
                        responses[row.index] = row.response
        finally:
            self.model.train(was_training)
        return responses

    # ----------------------------------------------------------------- one batch
    def _run(self, rows: list[_Row], tool_hook: ToolHook | None) -> None:
        width = max(len(r.request.prompt_ids) for r in rows)
        context = self._context(len(rows), width + max(r.request.params.max_new_tokens for r in rows))
        pad = torch.tensor([width - len(r.request.prompt_ids) for r in rows], device=device())
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device())
        positions = torch.zeros_like(tokens)
        for i, row in enumerate(rows):
            n = len(row.request.prompt_ids)
            tokens[i, width - n:] = torch.tensor(row.request.prompt_ids, device=device())
            positions[i, width - n:] = torch.arange(n, device=device())
        slots = torch.arange(width, device=device())
        future = slots[None, :] > slots[:, None]
        mask = (future[None] | (slots[None, :] < pad[:, None])[:, None, :])[:, None]
        hidden = self._forward(tokens, positions, mask, context)
        context.enable_decode_mode()
        while True:
            self._advance(rows, self._vocab_logits(hidden), tool_hook)
            keep = [i for i, r in enumerate(rows) if not r.done]
            if not keep:
                return
            if len(keep) < len(rows):
                rows, pad = [rows[i] for i in keep], pad[keep]
                self._compact(context, keep)
            tokens = torch.tensor([[r.response.token_ids[r.fed]] for r in rows], device=device())
            positions = torch.tensor([[len(r.request.prompt_ids) + r.fed] for r in rows], device=device())
            for row in rows:
                row.fed += 1
            filled = context.sequence_len_offset + 1
            mask = (torch.arange(filled, device=device())[None, :] < pad[:, None])[:, None, None, :]
            hidden = self._forward(tokens, positions, mask, context)

    def _advance(self, rows: list[_Row], logits: torch.Tensor, tool_hook: ToolHook | None) -> None:
        """Sample for the rows whose tokens have all been fed, record them, run the hook, decide who stops."""
        sampling = [i for i, r in enumerate(rows) if r.fed == len(r.response.token_ids)]
        if not sampling:
            return
        ready = logits if len(sampling) == len(rows) else logits[sampling]
        tokens, logprobs = choose_tokens(ready, [rows[i].request.params for i in sampling],
                                         [rows[i].draws for i in sampling])
        asking: list[_Row] = []
        for i, token, logprob in zip(sampling, tokens.tolist(), logprobs.tolist()):
            row = rows[i]
            row.response.token_ids.append(token)
            row.response.logprobs.append(logprob)
            row.response.policy_mask.append(1)
            verdict = row.counter.push(token)
            if verdict is not None and row.response.loop is None:
                row.response.loop = verdict
                if row.request.params.loop.stop_on_loop:
                    row.finish("loop")
                    continue
            asking.append(row)
        injected = self._hook_results(asking, tool_hook)
        for row in asking:
            ids = injected.get(row.index) or []
            ids = ids[: row.room]
            row.response.token_ids.extend(ids)
            row.response.logprobs.extend([0.0] * len(ids))
            row.response.policy_mask.extend([0] * len(ids))
            if not ids and row.response.token_ids[-1] in row.request.params.stop_token_ids:
                row.finish("stop")
            elif row.room == 0:
                row.finish("length")

    def _hook_results(self, rows: list[_Row], tool_hook: ToolHook | None) -> dict[int, list[int]]:
        """The hook's ids per request index, computed on TP rank 0 and the same on every TP rank."""
        if tool_hook is None or not rows:
            return {}
        results = [None]
        if parallel_state.get_tensor_model_parallel_rank() == 0:
            results[0] = {row.index: [int(t) for t in tool_hook(row.index, list(row.response.token_ids)) or []]
                          for row in rows}
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast_object_list(results, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                       group=parallel_state.get_tensor_model_parallel_group())
        return results[0]

    # ----------------------------------------------------------------- model calls
    def _context(self, batch: int, capacity: int) -> StaticInferenceContext:
        """megatron's static KV cache with its per-layer buffers already allocated on this rank's device."""
        context = StaticInferenceContext(batch, capacity)
        dtype = self.model.config.params_dtype

        def buffer(groups: int, dim: int) -> torch.Tensor:
            """``[slot, batch, groups, dim]`` as megatron indexes it, stored in SDPA's order for the local spec."""
            if self.model.uses_transformer_engine:
                return torch.empty(capacity, batch, groups, dim, dtype=dtype, device=device())
            return torch.empty(batch, groups, capacity, dim, dtype=dtype, device=device()).permute(2, 0, 1, 3)

        for layer in self.model.decoder.layers:
            attention = layer.self_attention
            shape = (attention.num_query_groups_per_partition, attention.hidden_size_per_attention_head)
            context.key_value_memory_dict[attention.layer_number] = (buffer(*shape), buffer(*shape))
        return context

    @staticmethod
    def _compact(context: StaticInferenceContext, keep: list[int]) -> None:
        """Move the cache rows of the requests still running to the front of each layer's buffers, in place: only
        the filled slots are copied (gathering whole buffers copied every unfilled slot too, in a new allocation,
        each time a row finished: 4 of 116 s of a 32-row decode) and the buffers become views of their first rows."""
        filled, index = context.sequence_len_offset, torch.tensor(keep, device=device())
        for layer, (key, value) in context.key_value_memory_dict.items():
            for buffer in (key, value):
                buffer[:filled, : len(keep)] = buffer[:filled, index]
            context.key_value_memory_dict[layer] = (key[:, : len(keep)], value[:, : len(keep)])

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 context: StaticInferenceContext) -> torch.Tensor:
        """Run new tokens through the model on top of the cache; the last position's hidden states [b, h]."""
        hidden = self.model(tokens, positions, attention_mask=mask, inference_context=context, return_hidden=True)
        context.increment_sequence_len_offset(tokens.shape[1])
        return hidden[-1]

    def _vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[b, h] -> [b, vocab] fp32: this rank's vocabulary slice, all-gathered over TP."""
        local = (hidden @ self.model.output_weight().T).float()
        return gather_from_tensor_model_parallel_region(local)
