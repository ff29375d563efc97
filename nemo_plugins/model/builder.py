"""Build a megatron-core GPTModel for a MistralConfig, with Transformer Engine when it can run."""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedObject
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.megatron_compat import HiddenOutputGPTModel, MistralTransformerConfig, carry_attention_bias
from nemo_plugins.model.attention_temperature import query_scale, with_query_scale
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.fast_path import Available, SpeedOptions, fast_path, yarn_concentration
from nemo_plugins.model.masks import is_single_document, packed_causal_mask
from nemo_plugins.model.packed_sequences import cu_seqlens_from_positions, thd_params
from nemo_plugins.model.rotated_key_cache import RotatedKeyCacheSelfAttention
from nemo_plugins.model.sdpa_attention import SDPAttention

logger = logging.getLogger(__name__)


def transformer_engine_usable() -> bool:
    """TE needs both its package and a GPU; anything else uses megatron's local (pure PyTorch) spec."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def transformer_config(model: MistralConfig, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                       fast: dict | None = None, use_te: bool = False) -> MistralTransformerConfig:
    """``fast``: fused kernels, recompute and FP8 fields (``fast_path``) over the plain defaults set here."""
    model.check_parallel(parallel.tp, parallel.pp)
    yarn = model.rope_scaling
    plain = dict(bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
                 apply_rope_fusion=False, gradient_accumulation_fusion=False)
    return MistralTransformerConfig(
        **{**plain, **(fast or {})},
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_kv_heads,
        kv_channels=model.head_dim,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        bias_dropout_fusion=False,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        # THD batches (TE, packed documents) run as [t, 1, h] of varying t: pipeline stages exchange shapes
        variable_seq_lengths=parallel.pp > 1 and use_te,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        init_method_std=0.02,
        yarn_rotary_scaling_factor=yarn.factor if yarn else 1.0,
        yarn_original_max_position_embeddings=yarn.original_max_position_embeddings if yarn else None,
        yarn_beta_fast=yarn.beta_fast if yarn else None,
        yarn_beta_slow=yarn.beta_slow if yarn else None,
        yarn_mscale=yarn.mscale if yarn else None,
        yarn_mscale_all_dim=yarn.mscale_all_dim if yarn else None,
        yarn_correction_range_round_to_int=yarn.truncate if yarn else True,
        attention_temperature_beta=model.attention_temperature_beta,
        attention_temperature_period=model.temperature_period,
    )


def layer_spec(config: MistralTransformerConfig, use_te: bool) -> ModuleSpec:
    """The layer spec: Transformer Engine or megatron's local one, with query scaling when needed. The local spec's
    core attention is ``SDPAttention`` (megatron's maths in one fused PyTorch kernel); under both, the
    self-attention caches rotated keys in static-batching inference (``RotatedKeyCacheSelfAttention``)."""
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    logger.info("layer spec: %s", "Transformer Engine" if use_te else "megatron-core local (pure PyTorch, SDPA)")
    core = spec.submodules.self_attention.submodules.core_attention if use_te else SDPAttention
    if config.attention_temperature_period is not None:
        core = with_query_scale(core)
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules))
    attention = spec.submodules.self_attention
    attention = dataclasses.replace(attention, module=RotatedKeyCacheSelfAttention,
                                    submodules=dataclasses.replace(attention.submodules))
    attention.submodules.core_attention = core
    spec.submodules.self_attention = attention
    return spec


# Linear layers carry an ``_extra_state`` under both specs (TE's FP8 scaling state; megatron's local linears
# save None in its place), so theirs is checkpointed and FP8 state survives a TE resume.
SHARED_EXTRA_STATE = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def spec_neutral(sharded: dict) -> dict:
    """A sharded state dict whose checkpoint keys do not depend on the layer spec, so a checkpoint written with the
    local spec (CPU) loads with Transformer Engine (GPU) and the reverse.

    Parameters already agree: megatron's local spec maps its norms to TE's fused names in the sharded state dict
    (``input_layernorm.weight`` -> ``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight``
    -> ``mlp.linear_fc1.layer_norm_weight``, via ``sharded_state_dict_keys_map``). What is left is the
    ``_extra_state`` only TE modules have (its attention, its norms): it stays with the process
    (``LocalNonpersistentObject``) instead of becoming a checkpoint item the other spec lacks.
    """
    neutral = {}
    for name, item in sharded.items():
        module = name.rsplit(".", 2)[-2] if name.endswith("._extra_state") else None
        if module is not None and module not in SHARED_EXTRA_STATE and isinstance(item, ShardedObject):
            item = LocalNonpersistentObject(item.data)
        neutral[name] = item
    return neutral


class MistralGPTModel(HiddenOutputGPTModel):
    """GPTModel whose forward takes per-document ``position_ids`` and derives masks and temperature from them.

    megatron-core 0.19 logs "GPTModel IS DEPRECATED" in favour of HybridModel; GPTModel still works
    unchanged there (checked against 0.19.2), so we stay on it until it stops doing so.

    ``position_ids`` [b, s] restart at 0 at each packed document. Plain (unpacked) batches take megatron's
    implicit causal mask. Packed ones get, with the local spec, a block-diagonal causal mask (RoPE is relative,
    so megatron's in-pack rotary positions give the same scores as per-document ones under that mask); with
    Transformer Engine, whose kernels ignore masks, THD ``packed_seq_params`` read from the positions
    (``packed_sequences``): the rows run as one ``[1, b*s]`` row, logits and losses come back as ``[b, s, ...]``
    and ``return_hidden`` gives ``[b*s, 1, h]`` (the same token order for ``flatten_tokens``).
    """

    uses_transformer_engine: bool = False
    parameter_sync: Callable[[], None] | None = None  # set by train.optimizer under overlap_param_gather

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, return_hidden: bool = False, **kwargs):  # type: ignore[override]
        """Logits (or per-token loss with ``labels``); with ``return_hidden`` the final-norm hidden states
        ``[s, b, h]`` instead (sequence-sharded under sequence parallelism), for losses fused with the output
        layer that must never see full logits."""
        rows = position_ids.shape
        if attention_mask is None and self.uses_transformer_engine:
            packed = self._thd_params(position_ids)
            if packed is not None:
                kwargs["packed_seq_params"] = packed
                input_ids, position_ids, labels = (None if t is None else t.reshape(1, -1)
                                                   for t in (input_ids, position_ids, labels))
        elif attention_mask is None and not is_single_document(position_ids):
            attention_mask = packed_causal_mask(position_ids)
        period = self.config.attention_temperature_period
        if period is not None:
            scale = query_scale(position_ids, self.config.attention_temperature_beta, period)
            kwargs = carry_attention_bias(kwargs, scale)
        batch_first_logits = self._batch_first_logits(labels, return_hidden, kwargs)
        with self.returning_hidden(return_hidden or batch_first_logits):
            output = super().forward(input_ids, position_ids, attention_mask, labels=labels, **kwargs)
        if batch_first_logits:
            output, _ = self.output_layer(output.transpose(0, 1), weight=self.output_weight(),
                                          runtime_gather_output=kwargs.get("runtime_gather_output"))
        if "packed_seq_params" in kwargs and not return_hidden and self.post_process:
            output = output.reshape(*rows, *output.shape[2:])
        return output

    def _batch_first_logits(self, labels, return_hidden: bool, kwargs: dict) -> bool:
        """Whether this forward makes its logits from ``[b, s, h]`` hidden states. megatron's output stage makes
        ``[s, b, vocab]`` logits and returns ``.transpose(0, 1).contiguous()``: a second copy of the largest tensor
        of a forward (1 GiB at 4,096 x 131,072 in bf16; 2% of the CPU forward at SmolLM2's shapes); transposing the
        ``[s, b, h]`` hidden states first gives ``[b, s, vocab]`` from the GEMM itself. Plain logits only: losses
        (``labels``), sequence parallelism (the output layer gathers the sequence dimension) and megatron's own
        inference context, multi-token prediction and 0.19's MuP logit scaling keep megatron's output stage."""
        return (labels is None and not return_hidden and self.post_process and not self.config.sequence_parallel
                and self.config.mtp_num_layers is None and not getattr(self.config, "use_mup", False)
                and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None)

    def _thd_params(self, position_ids: torch.Tensor) -> PackedSeqParams | None:
        """THD parameters for these rows (this CP rank's part), or None when every row is one whole document
        (plain causal attention, megatron's zigzag CP)."""
        cp = parallel_state.get_context_parallel_world_size()
        cu_seqlens = cu_seqlens_from_positions(position_ids, cp, parallel_state.get_context_parallel_rank())
        b, s = position_ids.shape
        whole_rows = torch.arange(b + 1, dtype=torch.int32) * (s * cp)
        if torch.equal(cu_seqlens.cpu(), whole_rows):
            return None
        return thd_params(cu_seqlens, position_ids.device)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """The checkpoint's items, the same under the local and the Transformer Engine spec (``spec_neutral``),
        after any in-flight parameter all-gather of the distributed optimizer has landed."""
        if self.parameter_sync is not None:
            self.parameter_sync()
        return spec_neutral(super().sharded_state_dict(prefix, sharded_offsets, metadata))

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight on the last pipeline stage ([vocab shard, hidden]), tied or not."""
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight


def build_model(
    model: MistralConfig,
    parallel: ParallelConfig,
    dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    speed: SpeedOptions | None = None,
    model_class: Callable[..., MistralGPTModel] = MistralGPTModel,
) -> MistralGPTModel:
    """The model chunk of this pipeline rank; megatron's parallel state must be initialised.

    ``model_class`` builds it from GPTModel's arguments (the vision-language subclass adds its encoder/projector).

    ``speed`` (recompute, FP8 and its recipe: ``TrainSettings.speed``) is what the run asks for; the fused kernels
    follow from the machine (``fast_path``) and are logged."""
    use_te = transformer_engine_usable() if use_te is None else use_te
    if parallel.cp > 1 and not use_te:
        raise ConfigError(f"parallel.cp={parallel.cp} needs Transformer Engine attention on GPUs (megatron's local "
                          "attention has no context parallelism): set parallel.cp=1 or install TE")
    yarn = model.rope_scaling
    fast = fast_path(Available.probe(), use_te, speed or SpeedOptions(),
                     yarn_concentration(yarn.factor, yarn.mscale, yarn.mscale_all_dim) if yarn else 1.0)
    fast.log()
    config = transformer_config(model, parallel, dtype, fast.config, use_te)
    gpt = model_class(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te),
        vocab_size=model.vocab_size,
        max_sequence_length=model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="yarn" if model.rope_scaling else "rope",
        rotary_base=model.rope_theta,
    )
    gpt.uses_transformer_engine = use_te
    for param in gpt.parameters():
        # the local spec's norms (torch.nn.RMSNorm) ignore params_dtype (megatron's own loop casts the whole model
        # in Float16Module): an fp32 norm weight in a bf16 model is a parameter that megatron's mixed-precision
        # optimizer keeps outside its bf16 groups, and then cannot map when it saves a checkpoint
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt
