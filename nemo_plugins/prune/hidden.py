"""Hidden-size pruning with ONE rotation of the residual stream for the whole network (SliceGPT-style).

1. ``fold_norms``: every RMSNorm weight is folded into the linears it feeds (q/k/v, gate/up, output layer)
   so that all norms become weightless; a weightless RMSNorm commutes with any rotation of its input,
   hence a full-rank rotation changes no logit.
2. ``hidden_basis``: PCA of the second moment of the attention-norm and FFN-norm inputs of every block,
   concatenated (summed moments), each token scaled to RMS 1 by default (see ``calibration``): raw moments
   are dominated by the few tokens with massive activations, so a raw PCA "explains" nearly all of the energy
   with directions that serve those tokens and prunes the rest badly.
   The PCA is **uncentred** by default: the network has no biases and RMSNorm
   does not subtract a mean, so the subspace that keeps the most of E[x x^T] (the energy the blocks actually
   see, mean included) is the one to keep; a centred PCA can discard a large mean direction. ``centred=True``
   is available for ablation. ``magnitude`` is the Minitron-style baseline: keep the k channels with the
   largest energy, no rotation.
3. ``rotate_hidden``: apply the k leading basis vectors to the embedding, every block's input and output
   projections and the output layer.
4. RMSNorm over k < d channels divides by the RMS of the kept channels only, which is larger than the parent's
   RMS by about sqrt(d/k) when the kept subspace holds most of the energy. ``norm_scale`` compensates per norm
   site: c = sqrt(d/k * retained energy fraction), so that the child's normalised activations match the
   parent's projected ones on average ("energy"); "dim_ratio" uses sqrt(d/k), "none" leaves 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from nemo_plugins.distributed import device
from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.state import READS_RESIDUAL, WRITES_RESIDUAL, ModelState, layer_key


class HiddenMethod(StrEnum):
    """How the hidden size is cut: one PCA rotation (the paper), or Minitron-style channel slicing."""

    pca = "pca"
    magnitude = "magnitude"
class NormCompensation(StrEnum):
    """How the RMSNorm weights are rescaled after the hidden size is cut."""

    energy = "energy"
    dim_ratio = "dim_ratio"
    none = "none"
NORM_SITES = ("input_layernorm", "post_attention_layernorm")


def fold_norms(state: ModelState) -> ModelState:
    """Equivalent model whose RMSNorms are all ones; untied, since the output layer absorbs the final norm."""
    t = dict(state.tensors)
    config = state.config
    for layer in range(config.num_layers):
        sites = (("input_layernorm", READS_RESIDUAL[:3]), ("post_attention_layernorm", READS_RESIDUAL[3:]))
        for norm, readers in sites:
            gamma = t[layer_key(layer, norm)]
            for reader in readers:
                t[layer_key(layer, reader)] = t[layer_key(layer, reader)] * gamma[None, :]
            t[layer_key(layer, norm)] = torch.ones_like(gamma)
    gamma = t["model.norm.weight"]
    t["lm_head.weight"] = state.output_weight() * gamma[None, :]
    t["model.norm.weight"] = torch.ones_like(gamma)
    return state.derive(config.replace(tie_embeddings=False), t)


@dataclass(frozen=True)
class HiddenBasis:
    """Orthonormal columns ``[d, d]`` ordered by importance, with the importance of each."""

    vectors: torch.Tensor
    importance: torch.Tensor

    def explained(self) -> torch.Tensor:
        """Cumulative fraction of the total importance kept by the first k columns, k = 1..d."""
        return torch.cumsum(self.importance, 0) / self.importance.sum()


def hidden_basis(moment: torch.Tensor, mean: torch.Tensor | None = None, method: HiddenMethod = HiddenMethod.pca,
                 centred: bool = False) -> HiddenBasis:
    """Basis of the residual stream from its (fp64) second moment E[x x^T] (and mean, for centred PCA)."""
    moment = moment.to(torch.float64)
    if method == "magnitude":
        energy = torch.diagonal(moment).clone()
        order = torch.argsort(energy, descending=True)
        return HiddenBasis(torch.eye(moment.shape[0], dtype=torch.float64)[:, order], energy[order])
    if method != "pca":
        raise ConfigError(f"prune.hidden.method={method!r} is not one of pca, magnitude")
    if centred:
        if mean is None:
            raise ValueError("centred PCA needs the activation mean")
        mean = mean.to(torch.float64)
        moment = moment - torch.outer(mean, mean)
    values, vectors = torch.linalg.eigh((moment + moment.T) / 2)
    order = torch.argsort(values, descending=True)
    vectors = vectors[:, order]
    # eigenvectors are defined up to sign: make each one's largest component positive so that the same
    # statistics give the same child on every rank and machine
    largest = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[largest, torch.arange(vectors.shape[1])])
    return HiddenBasis(vectors * torch.where(signs == 0, 1.0, signs), values[order].clamp_min(0))


def norm_scale(site_moment: torch.Tensor, basis_k: torch.Tensor, mode: NormCompensation) -> float:
    """Weight for a child RMSNorm over k of d channels (see the module docstring)."""
    d, k = basis_k.shape
    if mode == "none":
        return 1.0
    if mode == "dim_ratio":
        return math.sqrt(d / k)
    if mode != "energy":
        raise ConfigError(f"prune.hidden.norm_compensation={mode!r} is not one of energy, dim_ratio, none")
    total = torch.trace(site_moment).item()
    kept = torch.trace(basis_k.T @ site_moment.to(torch.float64) @ basis_k).item()
    return math.sqrt(d / k * kept / total) if total > 0 else 1.0


def rotate_hidden(folded: ModelState, basis_k: torch.Tensor, scales: dict[str, float] | None = None) -> ModelState:
    """Project the residual stream of a norm-folded model onto ``basis_k`` ``[d, k]`` (orthonormal columns).

    ``scales`` maps norm names (``model.layers.i.input_layernorm`` ..., ``model.norm``) to their weight in the
    child; missing ones stay 1.
    """
    config = folded.config
    if config.tie_embeddings:
        raise ValueError("rotate_hidden needs a norm-folded (untied) model: call fold_norms first")
    d, k = basis_k.shape
    if d != config.hidden_size:
        raise ValueError(f"basis has {d} rows but the model's hidden_size is {config.hidden_size}")
    if not 1 <= k <= d:
        raise ConfigError(f"target hidden_size={k} must be between 1 and the parent's {d}")
    scales = scales or {}
    basis_k = basis_k.to(device(), torch.float64)  # every slice's rotation runs in fp64 on the rank's device
    t = dict(folded.tensors)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        t[name] = _matmul(folded.tensors[name], basis_k)
    for layer in range(config.num_layers):
        for reader in READS_RESIDUAL:
            t[layer_key(layer, reader)] = _matmul(folded.tensors[layer_key(layer, reader)], basis_k)
        for writer in WRITES_RESIDUAL:
            t[layer_key(layer, writer)] = _matmul(basis_k.T, folded.tensors[layer_key(layer, writer)])
        for site in NORM_SITES:
            prefix = f"model.layers.{layer}.{site}"
            dtype = folded.tensors[f"{prefix}.weight"].dtype
            t[f"{prefix}.weight"] = torch.full((k,), scales.get(prefix, 1.0), dtype=dtype)
    dtype = folded.tensors["model.norm.weight"].dtype
    t["model.norm.weight"] = torch.full((k,), scales.get("model.norm", 1.0), dtype=dtype)
    return folded.derive(config.replace(hidden_size=k), t)


def _matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Product in fp64 on the rank's device (a GPU does 24B parameters x 5120 in seconds), returned to the host
    in the weights' dtype (keeps a full-rank rotation exact to fp32 rounding)."""
    weights = a if a.dtype != torch.float64 else b
    product = a.to(device(), torch.float64) @ b.to(device(), torch.float64)
    return product.to(weights.dtype).to(weights.device).contiguous()
