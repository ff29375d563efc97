"""One test per private megatron-core override (nemo_plugins.megatron_compat) and its version guard: an upgrade that
changes what an override relies on fails here, not as silently different numbers."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)

from nemo_plugins import megatron_compat
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model, transformer_config
from nemo_plugins.model.config import YarnScaling
from nemo_plugins.model.fast_path import yarn_concentration
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]
YARN = YarnScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=24.0, beta_slow=2.0, mscale=1.0,
                   mscale_all_dim=0.5, truncate=False)


def test_supported_range_is_the_one_pyproject_installs():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"megatron-core{megatron_compat.SUPPORTED_MEGATRON_CORE}" in dependencies


def test_the_guard_reads_the_installed_version_from_package_metadata():
    assert megatron_compat.installed_version() == importlib.metadata.version("megatron-core")


@pytest.mark.parametrize("version", ["0.16.1", "0.17.0", "0.19.0rc1", "0.19.2"])
def test_supported_versions_pass(version):
    megatron_compat.check_version(version)


@pytest.mark.parametrize("version", ["0.16.0", "0.20.0", "1.0.0"])
def test_unsupported_versions_are_refused_naming_both(version):
    with pytest.raises(megatron_compat.UnsupportedMegatronError) as refused:
        megatron_compat.check_version(version)
    assert f"megatron-core {version} is installed" in str(refused.value)
    assert megatron_compat.SUPPORTED_MEGATRON_CORE in str(refused.value)


IMPORT_UNDER_OLD_MEGATRON = r"""
import importlib.metadata
real = importlib.metadata.version
importlib.metadata.version = lambda name: "0.15.3" if name == "megatron-core" else real(name)
try:
    import nemo_plugins.megatron_compat
except ImportError as err:
    print(type(err).__name__, err)
"""


def test_importing_under_an_unsupported_megatron_raises():
    out = subprocess.run([sys.executable, "-c", IMPORT_UNDER_OLD_MEGATRON], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.startswith("UnsupportedMegatronError megatron-core 0.15.3 is installed"), out
    assert megatron_compat.SUPPORTED_MEGATRON_CORE in out


def test_gpt_model_reads_the_yarn_fields():
    """``GPTModel`` builds its YaRN embedding from the config's extra fields, and the attention's concentration
    factor reads the scaling factor and both mscales from them."""
    model = build_model(tiny_config(rope_scaling=YARN), ParallelConfig())
    rotary = model.rotary_pos_emb
    assert (rotary.scaling_factor, rotary.original_max_position_embeddings) == (4.0, 16)
    assert (rotary.beta_fast, rotary.beta_slow, rotary.mscale, rotary.mscale_all_dim) == (24.0, 2.0, 1.0, 0.5)
    assert rotary.correction_range_round_to_int is False
    expected = yarn_concentration(YARN.factor, YARN.mscale, YARN.mscale_all_dim)
    assert expected != 1.0
    assert _yarn_get_concentration_factor_from_config(model.config) == pytest.approx(expected)


def test_postprocess_is_the_output_stage_after_the_final_norm():
    """``GPTModel.forward`` ends in ``_postprocess(hidden_states=...)``: returning its input gives exactly what the
    output layer turns into the logits."""
    config = tiny_config()
    model = build_model(config, ParallelConfig()).eval()
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    positions = torch.arange(12).expand(2, -1)
    with torch.no_grad():
        logits = model(tokens, positions)
        hidden = model(tokens, positions, return_hidden=True)  # MistralGPTModel's use of returning_hidden
        again = model(tokens, positions)
    assert hidden.shape == (12, 2, config.hidden_size)
    torch.testing.assert_close(model.output_layer(hidden)[0].transpose(0, 1), logits, rtol=0, atol=0)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_attention_bias_reaches_every_core_attention(recompute):
    """``extra_block_kwargs={"attention_bias": x}`` arrives unchanged at each layer's core attention, also when the
    layers are recomputed in the backward pass."""
    from nemo_plugins.model.fast_path import SpeedOptions

    config = tiny_config(num_layers=3)
    model = build_model(config, ParallelConfig(), speed=SpeedOptions(recompute=recompute))
    bias = torch.rand(12, 2, 1, 1)
    seen = []
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention
        plain = core.forward

        def forward(*args, attention_bias=None, _plain=plain, **kwargs):
            seen.append(attention_bias)
            return _plain(*args, attention_bias=None, **kwargs)

        core.forward = forward
    tokens = torch.randint(0, config.vocab_size, (2, 12))
    model(tokens, torch.arange(12).expand(2, -1), **megatron_compat.carry_attention_bias({}, bias)).sum().backward()
    assert len(seen) >= config.num_layers and all(b is bias for b in seen)
    assert transformer_config(config, ParallelConfig()).attention_temperature_period is None
