"""Tying and untying input/output embeddings when the child's choice differs from the parent's.

Untying is exact (``fold_norms`` already gives the output layer its own matrix). Tying an untied model
must pick one matrix for both roles; the options are compared by perplexity right after pruning
(``bench/prune_ablation.py``; SmolLM2 -> the tied demo child: output 24k, mean 110k, embedding_fit 197k,
embedding 21.7M), so ``output`` is the default: it keeps the output layer W for both roles (the logits
stay exact, and the first block's RMSNorm absorbs most of what it changes on the input side).
``embedding_fit`` keeps the input embedding E (the input side stays exact) and moves onto the final RMSNorm
weight the per-channel scale s_i = <E_i, W_i> / ||E_i||^2 that best fits the output layer W column by column
(least squares), so that logits = norm(h) diag(s) E^T approximate norm(h) W^T; this recovers what folding
the parent's final-norm weight into W put there (exactly, when no rotation mixed the channels).
``embedding`` keeps E alone, ``mean`` averages E and W.
"""

from __future__ import annotations

from enum import StrEnum

from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.shards import sum_over_slices
from nemo_plugins.prune.state import ModelState


class TieMethod(StrEnum):
    """Which matrix a child that ties an untied parent's embeddings keeps (or how it fits them)."""

    output = "output"
    embedding_fit = "embedding_fit"
    embedding = "embedding"
    mean = "mean"


def set_tied(state: ModelState, tied: bool, method: TieMethod = TieMethod.output) -> ModelState:
    if tied == state.config.tie_embeddings:
        return state
    t = dict(state.tensors)
    if not tied:
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        return state.derive(state.config.replace(tie_embeddings=False), t)
    embedding, output = t["model.embed_tokens.weight"], t.pop("lm_head.weight")
    if method == "embedding_fit":
        e, w = embedding.double(), output.double()
        # sums over the vocabulary: a TP slice holds some of its rows
        scale = (sum_over_slices((e * w).sum(0), state.slice)
                 / sum_over_slices((e * e).sum(0), state.slice).clamp_min(1e-30))
        t["model.norm.weight"] = (t["model.norm.weight"].double() * scale).to(t["model.norm.weight"].dtype)
        shared = embedding
    elif method == "embedding":
        shared = embedding
    elif method == "output":
        shared = output
    elif method == "mean":
        shared = (embedding + output) / 2
    else:
        raise ConfigError(f"prune.options.tie_method={method!r} is not one of output, embedding_fit, embedding, mean")
    t["model.embed_tokens.weight"] = shared.contiguous()
    return state.derive(state.config.replace(tie_embeddings=True), t)
