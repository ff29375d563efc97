"""Worker body for the TP=2 generation test (spawned through tests/distributed_worker.run; importable top level)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.generation.torch_engine import TorchEngine
from nemo_plugins.model.builder import build_model


def tp_generate(config, state_path: str, requests_path: str, out_path: str, tp: int) -> None:
    """Generate the saved requests under TP=tp with a tool hook that only TP rank 0 may call; every rank saves."""
    initialize(ParallelConfig(tp=tp))
    model = build_model(config, ParallelConfig(tp=tp))
    load_hf_state(model, torch.load(state_path), config)
    requests, inject_after, injected = torch.load(requests_path, weights_only=False)

    def hook(index: int, ids: list[int]) -> list[int] | None:
        assert dist.get_rank() == 0, "the tool hook ran on a TP rank other than 0"
        return injected if index == 0 and len(ids) == inject_after else None

    responses = TorchEngine(model).generate(requests, tool_hook=hook)
    torch.save(responses, f"{out_path}.rank{dist.get_rank()}")
