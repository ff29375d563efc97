"""Checkpoints move between the local spec (CPU) and the Transformer Engine spec (GPU).

TE is not importable here, so its layer is rebuilt from what matters to a checkpoint: the norms fused into the
following linears (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``, identity norms before them,
as in megatron's TE spec) and an ``_extra_state`` on the attention that the local spec lacks (TE's FP8 state).
"""

import io

import pytest
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from nemo_plugins.convert import megatron_checkpoint
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model import builder
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config
from tests.test_packed_sequences import ThdReferenceAttention, packed_positions


class NormedColumnLinear(ColumnParallelLinear):
    """TE's LayerNormColumnParallelLinear written plainly: RMSNorm (weight ``layer_norm_weight``), then the linear."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        self.eps = config.layernorm_epsilon

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.layer_norm_weight
        return super().forward(normed)


class StatefulAttention(ThdReferenceAttention):
    """Attention with an ``_extra_state`` (TE's FP8 metadata stands here as bytes)."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.state = b"fp8-meta"

    def get_extra_state(self):
        return io.BytesIO(self.state)

    def set_extra_state(self, state):
        if state is not None:
            self.state = state.getvalue()


def te_shaped_spec(config, use_te):
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=IdentityOp,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(linear_qkv=NormedColumnLinear, core_attention=StatefulAttention,
                                                   linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                                   k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=IdentityOp,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=NormedColumnLinear,
                                                                linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add,
        ),
    )


CONFIG = tiny_config()


@pytest.fixture
def te_model(monkeypatch):
    """Builds models the way build_model builds the TE one, on the TE-shaped spec."""
    def build(seed):
        torch.manual_seed(seed)
        with monkeypatch.context() as patch:
            patch.setattr(builder, "layer_spec", te_shaped_spec)
            return build_model(CONFIG, ParallelConfig(), use_te=True).eval()
    return build


def checkpoint_keys(model) -> set[str]:
    return {item.key for item in model.sharded_state_dict().values()
            if isinstance(item, (ShardedTensor, ShardedObject, ShardedTensorFactory))}


def rows():
    positions = packed_positions([[5, 1, 9, 3], [7, 11]])
    return torch.randint(0, CONFIG.vocab_size, positions.shape), positions


def test_both_specs_write_the_same_checkpoint_keys(te_model):
    local, te = build_model(CONFIG, ParallelConfig()), te_model(0)
    assert "decoder.layers.0.input_layernorm.weight" in local.state_dict()
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te.state_dict()
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in te.state_dict()
    assert checkpoint_keys(local) == checkpoint_keys(te)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in checkpoint_keys(local)


def test_spec_neutral_keeps_te_only_extra_state_out_of_the_checkpoint(te_model):
    plain = GPTModel.sharded_state_dict(te_model(0))
    te_only = {item.key for item in plain.values() if isinstance(item, ShardedObject)} - checkpoint_keys(te_model(0))
    assert te_only == {"decoder.layers.self_attention.core_attention._extra_state"}


def test_local_checkpoint_loads_into_the_te_spec_and_back(tmp_path, te_model):
    local = build_model(CONFIG, ParallelConfig()).eval()
    megatron_checkpoint.save_model(local, CONFIG, tmp_path / "local")
    te = te_model(1)
    megatron_checkpoint.load_weights(te, tmp_path / "local")
    tokens, positions = rows()
    with torch.no_grad():
        expected = local(tokens, positions)
        torch.testing.assert_close(te(tokens, positions), expected, atol=1e-5, rtol=1e-5)
    assert te.decoder.layers[0].self_attention.core_attention.state == b"fp8-meta"

    megatron_checkpoint.save_model(te, CONFIG, tmp_path / "te")
    torch.manual_seed(2)
    back = build_model(CONFIG, ParallelConfig()).eval()
    megatron_checkpoint.load_weights(back, tmp_path / "te")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, positions), expected, atol=1e-5, rtol=1e-5)


def test_a_fresh_te_model_differs():
    """Guards the test above: without the checkpoint the TE-shaped model's logits are another model's."""
    tokens, positions = rows()
    local = build_model(CONFIG, ParallelConfig()).eval()
    torch.manual_seed(1)
    other = build_model(CONFIG, ParallelConfig()).eval()
    with torch.no_grad():
        assert (local(tokens, positions) - other(tokens, positions)).abs().max() > 1e-3


@pytest.mark.skipif(not builder.transformer_engine_usable(), reason="the GPU half: needs Transformer Engine on a GPU")
def test_gpu_local_checkpoint_loads_into_transformer_engine_and_back(tmp_path):
    """The real TE spec (fused-norm linears, TE attention, THD on packed rows) in bf16 against the local spec."""
    dtype = torch.bfloat16
    local = build_model(CONFIG, ParallelConfig(), dtype, use_te=False).eval()
    megatron_checkpoint.save_model(local, CONFIG, tmp_path / "local")
    torch.manual_seed(1)
    te = build_model(CONFIG, ParallelConfig(), dtype, use_te=True).eval()
    megatron_checkpoint.load_weights(te, tmp_path / "local")
    tokens, positions = (t.cuda() for t in rows())
    with torch.no_grad():
        expected = local(tokens, positions).float()
        torch.testing.assert_close(te(tokens, positions).float(), expected, atol=3e-2, rtol=3e-2)
    megatron_checkpoint.save_model(te, CONFIG, tmp_path / "te")
    back = build_model(CONFIG, ParallelConfig(), dtype, use_te=False).eval()
    megatron_checkpoint.load_weights(back, tmp_path / "te")
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, positions).float(), expected, atol=0, rtol=0)
