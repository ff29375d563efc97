"""YaRN + position-based attention temperature against transformers' Ministral3 text model."""

import torch

from nemo_plugins.model.attention_temperature import query_scale
from nemo_plugins.model.config import YarnScaling
from tests.conftest import tiny_config
from tests.hf_reference import hf_model
from tests.test_hf_equivalence import megatron_from_hf

ORIGINAL_MAX = 16


def long_config():
    return tiny_config(
        architecture="Ministral3ForCausalLM",
        rope_theta=1_000_000.0,
        rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=ORIGINAL_MAX,
                                 beta_fast=32.0, beta_slow=1.0),
        attention_temperature_beta=0.5,
        max_position_embeddings=4 * ORIGINAL_MAX,
    )


def test_yarn_and_temperature_match_ministral3_beyond_original_context():
    config = long_config()
    reference = hf_model(config)
    megatron = megatron_from_hf(config, reference)
    length = 3 * ORIGINAL_MAX + 5  # three temperature steps
    tokens = torch.randint(0, config.vocab_size, (2, length))
    positions = torch.arange(length).expand(2, -1)
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = megatron(tokens, positions)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_temperature_changes_logits_past_original_context():
    """Guards the test above: without the temperature the logits beyond ORIGINAL_MAX must differ."""
    config = long_config()
    reference = hf_model(config)
    plain = megatron_from_hf(config.replace(attention_temperature_beta=None), reference)
    tokens = torch.randint(0, config.vocab_size, (1, 2 * ORIGINAL_MAX))
    positions = torch.arange(2 * ORIGINAL_MAX)[None]
    with torch.no_grad():
        expected = reference(tokens).logits
        actual = plain(tokens, positions)
    assert (actual[:, :ORIGINAL_MAX] - expected[:, :ORIGINAL_MAX]).abs().max() <= 1e-4
    assert (actual[:, ORIGINAL_MAX:] - expected[:, ORIGINAL_MAX:]).abs().max() > 1e-3


def test_packed_documents_get_per_document_temperature():
    """Two documents packed into one row behave exactly as each document alone (positions, mask, temperature)."""
    config = long_config()
    reference = hf_model(config)
    megatron = megatron_from_hf(config, reference)
    first_len, second_len = 2 * ORIGINAL_MAX + 3, ORIGINAL_MAX + 7
    first = torch.randint(0, config.vocab_size, (1, first_len))
    second = torch.randint(0, config.vocab_size, (1, second_len))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(first_len), torch.arange(second_len)])[None]
    with torch.no_grad():
        packed_logits = megatron(packed, positions)
        alone_first = reference(first).logits
        alone_second = reference(second).logits
    assert (packed_logits[:, :first_len] - alone_first).abs().max() <= 1e-4
    assert (packed_logits[:, first_len:] - alone_second).abs().max() <= 1e-4


def test_query_scale_formula():
    positions = torch.tensor([[0, 15, 16, 47, 48, 0, 16]])
    scale = query_scale(positions, beta=0.1, period=16)[:, 0, 0, 0]
    floors = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 0.0, 1.0])
    torch.testing.assert_close(scale, 1 + 0.1 * torch.log(1 + floors))
