import logging
import os

# The suite is the CPU suite (gloo, the CPU compat, tensors built on the host), also on a GPU machine, where its
# multi-rank tests would otherwise ask one GPU for several NCCL ranks. GPU checks live in bench/gpu_validate.py.
# Set before anything initialises CUDA; spawned workers and recipe subprocesses inherit it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from pathlib import Path

import pytest
import torch

from nemo_plugins import cpu_compat
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.config import MistralConfig


@pytest.fixture(scope="session", autouse=True)
def _megatron_single_process():
    """One gloo process with TP=PP=1 for in-process tests; multi-rank tests spawn their own workers."""
    logging.getLogger("nemo_plugins").setLevel(logging.INFO)
    cpu_compat.install()
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


def save_tiny_teacher_and_student(root: Path) -> Path:
    """Tiny teacher and student megatron checkpoints under ``root`` on SmolLM2's real tokenizer (vocabulary 49,152,
    chat template): what the recipe tests run as a user would."""
    from nemo_plugins.convert import megatron_checkpoint
    from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
    from nemo_plugins.model.builder import build_model

    tok = tokenizer_dir(ModelSource.parse("embedded:smollm2"))
    for name, config, seed in (("teacher", tiny_config(vocab_size=49152), 0),
                               ("student", tiny_config(vocab_size=49152, hidden_size=32, ffn_hidden_size=64), 1)):
        torch.manual_seed(seed)
        megatron_checkpoint.save_model(build_model(config, ParallelConfig()), config, root / name, tokenizer_dir=tok)
    return root


def random_token_mix(directory: Path, metadata: dict | None = None):
    """One source of 120 random documents (10-89 tokens, vocabulary 128), 10% held out: data for loop tests."""
    import numpy as np

    from nemo_plugins.data.mix import DataMix, MixSource
    from nemo_plugins.data.token_store import write_token_file

    rng = np.random.default_rng(0)
    file = write_token_file([list(rng.integers(3, 128, size=int(rng.integers(10, 90)))) for _ in range(120)],
                            directory / "data", 128, 2, metadata or {})
    return DataMix([MixSource("a", file, 1.0)], heldout_fraction=0.1)


@pytest.fixture
def mix(tmp_path):
    return random_token_mix(tmp_path)
