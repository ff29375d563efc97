"""Megatron logits == transformers logits for the same weights (fp32)."""

import pytest
import torch

from nemo_plugins.convert.model_io import gather_hf_state, load_hf_state
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


def megatron_from_hf(config, model):
    megatron = build_model(config, ParallelConfig()).eval()
    load_hf_state(megatron, hf_state(model), config)
    return megatron


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("architecture", ["MistralForCausalLM", "LlamaForCausalLM"])
def test_logits_match_transformers(tied, architecture):
    config = tiny_config(tie_embeddings=tied, architecture=architecture)
    reference = hf_model(config)
    megatron = megatron_from_hf(config, reference)
    tokens = torch.randint(0, config.vocab_size, (2, 33))
    positions = torch.arange(33).expand(2, -1)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = megatron(tokens, positions)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max().item() <= 1e-4


def test_roundtrip_is_bitwise():
    config = tiny_config()
    reference = hf_model(config)
    megatron = megatron_from_hf(config, reference)
    back = gather_hf_state(megatron, config)
    original = hf_state(reference)
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
