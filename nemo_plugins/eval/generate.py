"""Greedy text continuation for run reports: a thin wrapper over the generation engine."""

from __future__ import annotations

import torch

from nemo_plugins.generation.engine import Request, SamplingParams
from nemo_plugins.generation.loops import LoopConfig
from nemo_plugins.generation.torch_engine import TorchEngine


def greedy_generate(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt's greedy continuation up to EOS (included) or ``max_new_tokens``; a looping sample runs to
    the end, as a report should show it."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    stop = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=stop,
                            loop=LoopConfig(stop_on_loop=False))
    [response] = TorchEngine(model).generate([Request(tuple(ids), params)])
    return tokenizer.decode(response.token_ids)
