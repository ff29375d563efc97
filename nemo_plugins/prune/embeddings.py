"""Tying and untying input/output embeddings when the child's choice differs from the parent's.

Untying is exact (``fold_norms`` already gives the output layer its own matrix). Tying an untied model
must pick one matrix for both roles; the options are compared by perplexity right after pruning:
``embedding`` keeps the input embedding (the input side stays exact), ``output`` keeps the output layer (the
logits stay exact), ``mean`` averages the two.
"""

from __future__ import annotations

from typing import Literal

from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.state import ModelState

TieMethod = Literal["embedding", "output", "mean"]


def set_tied(state: ModelState, tied: bool, method: TieMethod = "embedding") -> ModelState:
    if tied == state.config.tie_embeddings:
        return state
    t = dict(state.tensors)
    if not tied:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        return ModelState(state.config.replace(tie_embeddings=False), t)
    embedding, output = t["model.embed_tokens.weight"], t.pop("lm_head.weight")
    if method == "embedding":
        shared = embedding
    elif method == "output":
        shared = output
    elif method == "mean":
        shared = (embedding + output) / 2
    else:
        raise ConfigError(f"prune.tie_method={method!r} is not one of embedding, output, mean")
    t["model.embed_tokens.weight"] = shared.contiguous()
    return ModelState(state.config.replace(tie_embeddings=True), t)
