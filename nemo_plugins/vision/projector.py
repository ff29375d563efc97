"""The trainable projector from encoder features to a child's hidden size: transformers' Mistral3 projector (RMSNorm,
a learned merge of each ``spatial_merge_size``^2 block of patches, linear-GELU-linear), replicated on every TP rank.

Replicated, not sharded: it is small (5 x 1024^2 + 2 x 1024 x hidden for the real encoder) and its input, the frozen
encoder's output, is the same on every TP rank. Its gradients are identical across TP ranks by construction: the
features it produces enter the decoder through megatron's TP-aware layers, whose backward all-reduces the input
gradient over TP (``copy_to_tensor_model_parallel_region``; under sequence parallelism the scatter's backward is an
all-gather), so every TP rank back-propagates the same full gradient into the same weights. Megatron treats
parameters without ``tensor_model_parallel`` as TP duplicates (counted once in the gradient norm), as it does norms.

Each child gets a fresh projector (the parent's is discarded, as in the paper): initialised from a fixed seed, so
every rank builds the same weights without a broadcast.
"""

from __future__ import annotations

import torch

from nemo_plugins.bridges import MISTRAL3
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.vision.config import VisionConfig

PROJECTOR_SEED = 20260101


def build_projector(vision: VisionConfig, text: MistralConfig, dtype: torch.dtype = torch.float32,
                    seed: int = PROJECTOR_SEED) -> torch.nn.Module:
    """A freshly initialised projector: input dim = the encoder's hidden size, output dim = ``text``'s hidden size."""
    from transformers import Mistral3Config
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    hf_config = Mistral3Config(**{k: v for k, v in MISTRAL3.config_to_hf(text, vision).items() if k != "architectures"})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Mistral3MultiModalProjector(hf_config)
    return projector.to(dtype)


def project(projector: torch.nn.Module, features: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """``[image tokens, text hidden]`` for encoder ``features`` of images of pixel ``sizes`` (one row per [IMG])."""
    return projector(features.to(projector.linear_1.weight.dtype), torch.tensor(sizes))
