"""The GPU fast path as a pure decision: fused kernels, recompute, FP8 and DDP overlap from (what is importable,
device, config), with the machine stated by each test."""

import pytest
import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_concentration_factor

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.builder import build_model, transformer_config
from nemo_plugins.model.fast_path import Available, SpeedOptions, fast_path, yarn_concentration
from nemo_plugins.train.config import TrainSettings
from nemo_plugins.train.optimizer import communication_overlap
from tests.conftest import tiny_config

CPU = Available()
H100 = Available(cuda=True, compute_capability=(9, 0), transformer_engine=(2, 4), apex_fused_wgrad=True,
                 fused_softmax=True)
FUSIONS = ("bias_activation_fusion", "apply_rope_fusion", "gradient_accumulation_fusion", "masked_softmax_fusion",
           "persist_layer_norm")


def flags(path):
    return {name for name in FUSIONS if path.config[name]}


def test_cpu_keeps_every_fusion_off_and_says_why():
    path = fast_path(CPU, use_te=False, options=SpeedOptions())
    assert flags(path) == set()
    assert set(FUSIONS) <= set(path.why)
    assert "recompute_granularity" not in path.config


def test_gpu_with_te_and_apex_turns_on_the_fusions_te_needs_no_softmax_kernel():
    assert flags(fast_path(H100, use_te=True, options=SpeedOptions())) == {
        "bias_activation_fusion", "apply_rope_fusion", "gradient_accumulation_fusion"}


@pytest.mark.parametrize("machine,use_te,expected", [
    (Available(cuda=True, transformer_engine=(2, 4)), True, {"bias_activation_fusion", "apply_rope_fusion"}),
    (Available(cuda=True, fused_softmax=True, apex_fused_wgrad=True), False,
     {"bias_activation_fusion", "masked_softmax_fusion", "gradient_accumulation_fusion"}),
    (H100, False, {"bias_activation_fusion", "masked_softmax_fusion", "gradient_accumulation_fusion"}),
])
def test_each_fusion_follows_what_is_importable(machine, use_te, expected):
    assert flags(fast_path(machine, use_te, SpeedOptions())) == expected


def test_rope_fusion_only_without_a_yarn_concentration():
    ministral3 = yarn_concentration(16.0, 1.0, 1.0)
    assert ministral3 == 1.0
    assert fast_path(H100, True, SpeedOptions(), ministral3).config["apply_rope_fusion"]
    assert not fast_path(H100, True, SpeedOptions(), yarn_concentration(16.0, 0.707, 1.0)).config["apply_rope_fusion"]


@pytest.mark.parametrize("factor,mscale,mscale_all_dim", [(16.0, 1.0, 1.0), (16.0, 0.707, 1.0), (4.0, 1.0, 0.0),
                                                          (1.0, 0.5, 1.0)])
def test_yarn_concentration_is_megatrons(factor, mscale, mscale_all_dim):
    assert yarn_concentration(factor, mscale, mscale_all_dim) == pytest.approx(
        _yarn_get_concentration_factor(factor, mscale, mscale_all_dim))


def test_recompute_choices():
    assert fast_path(CPU, False, SpeedOptions(recompute="selective")).config["recompute_modules"] == ["core_attn"]
    assert fast_path(H100, True, SpeedOptions(recompute="selective")).config["recompute_modules"] == ["mlp"]
    full = fast_path(CPU, False, SpeedOptions(recompute="full")).config
    recompute = (full["recompute_granularity"], full["recompute_method"], full["recompute_num_layers"])
    assert recompute == ("full", "uniform", 1)


def _grads(speed: SpeedOptions) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(tiny_config(), ParallelConfig(), speed=speed).train()
    tokens = torch.randint(0, 128, (2, 16))
    positions = torch.cat([torch.arange(6), torch.arange(10)]).expand(2, -1)
    model(tokens, positions, labels=torch.roll(tokens, -1, 1)).sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_leaves_gradients_unchanged(recompute):
    plain, recomputed = _grads(SpeedOptions()), _grads(SpeedOptions(recompute=recompute))
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fp8_needs_te_on_a_gpu():
    with pytest.raises(ConfigError, match="train.fp8='hybrid' needs Transformer Engine"):
        fast_path(CPU, False, SpeedOptions(fp8="hybrid"))
    with pytest.raises(ConfigError, match="train.fp8='hybrid' needs Transformer Engine"):
        build_model(tiny_config(), ParallelConfig(), speed=SpeedOptions(fp8="hybrid"))


def test_fp8_recipes():
    delayed = fast_path(H100, True, SpeedOptions(fp8="hybrid")).config
    assert (delayed["fp8"], delayed["fp8_recipe"], delayed["fp8_amax_history_len"], delayed["fp8_amax_compute_algo"]) \
        == ("hybrid", "delayed", 1024, "max")
    blockwise = fast_path(H100, True, SpeedOptions(fp8="e4m3", fp8_recipe="blockwise", fp8_bf16_first_last=True)).config
    assert blockwise["first_last_layers_bf16"] and "fp8_amax_history_len" not in blockwise
    with pytest.raises(ConfigError, match="fp8_recipe=tensorwise needs Transformer Engine >= 2.2"):
        fast_path(Available(cuda=True, compute_capability=(9, 0), transformer_engine=(2, 1)), True,
                  SpeedOptions(fp8="hybrid", fp8_recipe="tensorwise"))
    with pytest.raises(ConfigError, match="compute capability >= 9.0"):
        fast_path(Available(cuda=True, compute_capability=(8, 9), transformer_engine=(2, 4)), True,
                  SpeedOptions(fp8="hybrid", fp8_recipe="blockwise"))
    with pytest.raises(ConfigError, match="fp8_bf16_first_last needs a current-scaling recipe"):
        SpeedOptions(fp8="hybrid", fp8_bf16_first_last=True)


def test_decided_fields_are_megatrons():
    """Every field a GPU decision sets is one megatron-core's TransformerConfig accepts (the TE-importing RoPE
    check aside, which only a machine with TE can pass)."""
    decided = fast_path(H100, True, SpeedOptions(recompute="full", fp8="hybrid")).config
    decided["apply_rope_fusion"] = False
    config = transformer_config(tiny_config(), ParallelConfig(), fast=decided)
    for name, value in decided.items():
        assert getattr(config, name) == value


def test_train_settings_carry_the_speed_options():
    train = TrainSettings(recompute="selective", fp8="hybrid", fp8_recipe="tensorwise", fp8_bf16_first_last=True)
    assert train.speed == SpeedOptions("selective", "hybrid", "tensorwise", 1024, True)
    with pytest.raises(ConfigError, match="train.recompute='some'"):
        TrainSettings(recompute="some")
    with pytest.raises(ConfigError, match="train.fp8_recipe='fast'"):
        TrainSettings(fp8_recipe="fast")


def test_communication_overlap():
    assert communication_overlap(False, False) == {"overlap_grad_reduce": False, "overlap_param_gather": False}
    assert communication_overlap(True, False) == {"overlap_grad_reduce": True, "overlap_param_gather": False}
    assert communication_overlap(True, True) == {"overlap_grad_reduce": True, "overlap_param_gather": True}


def test_a_stages_speed_settings_reach_the_model_it_loads(tmp_path):
    from nemo_plugins.convert import megatron_checkpoint
    from nemo_plugins.convert.sources import ModelSource, load_model

    config = tiny_config()
    megatron_checkpoint.save_model(build_model(config, ParallelConfig()), config, tmp_path / "ckpt")
    train = TrainSettings(recompute="full")
    _, model = load_model(ModelSource("megatron", str(tmp_path / "ckpt")), ParallelConfig(), speed=train.speed)
    assert (model.config.recompute_granularity, model.config.recompute_method) == ("full", "uniform")
    _, plain = load_model(ModelSource("megatron", str(tmp_path / "ckpt")), ParallelConfig())
    assert plain.config.recompute_granularity is None
