import logging

import pytest
import torch

from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.config import MistralConfig


@pytest.fixture(scope="session", autouse=True)
def _megatron_single_process():
    """One gloo process with TP=PP=1 for in-process tests; multi-rank tests spawn their own workers."""
    logging.getLogger("nemo_plugins").setLevel(logging.INFO)
    initialize(ParallelConfig())
    yield


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def tiny_config(**changes) -> MistralConfig:
    """Mistral shapes at toy width: GQA (4 q / 2 kv heads), head_dim != hidden / heads."""
    base = MistralConfig(
        num_layers=2,
        hidden_size=48,
        num_attention_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_hidden_size=96,
        vocab_size=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
    )
    return base.replace(**changes)
