"""Pruning below full size keeps what it should: planted structure on synthetic data and tiny models, and on the
real SmolLM2 parent the chosen directions / channels beat the opposite choice right after pruning.

At full size any orthogonal basis, any norm scale and any channel order reproduce the parent, so every test here
keeps fewer dimensions than the parent has and knows, by construction or by a naive reference, which ones.
"""

import math

import pytest
import torch

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.prune.calibration import calibrate
from nemo_plugins.prune.ffn import keep_channels, select_channels
from nemo_plugins.prune.hidden import NORM_SITES, fold_norms, hidden_basis, norm_scale, rotate_hidden
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
from nemo_plugins.prune.state import ModelState, layer_key
from tests.test_prune import calibration_batch, logits, parent_state


def _random_subspace(d: int, k: int, generator: torch.Generator, avoid: int | None = None) -> torch.Tensor:
    """Orthonormal ``[d, k]`` columns (orthogonal to channel ``avoid`` when given)."""
    a = torch.randn(d, k, generator=generator, dtype=torch.float64)
    if avoid is not None:
        a[avoid] = 0.0
    return torch.linalg.qr(a)[0]


def _projector(u: torch.Tensor) -> torch.Tensor:
    return u @ u.T


def _lost_energy(moment: torch.Tensor, u: torch.Tensor) -> float:
    """Mean squared reconstruction error of x by its projection onto span(u), from E[x x^T]."""
    return (torch.trace(moment) - torch.trace(u.T @ moment @ u)).item()


# ------------------------------------------------------------------------------------------ hidden size: PCA
D, K, MASSIVE = 32, 6, 5


def planted_activations(n: int = 4000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, D]`` with variance in a planted K-dim subspace (orthogonal to channel MASSIVE), small isotropic
    noise, and a massive activation: channel MASSIVE is 200 on 1% of the tokens (what LLM residual streams show)."""
    g = torch.Generator().manual_seed(seed)
    planted = _random_subspace(D, K, g, avoid=MASSIVE)
    x = (torch.randn(n, K, generator=g, dtype=torch.float64) * torch.linspace(8.0, 4.0, K)) @ planted.T
    x = x + 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    x[::100, MASSIVE] += 200.0
    return x, planted


def test_pca_recovers_the_planted_subspace_and_the_massive_channel():
    x, planted = planted_activations()
    basis = hidden_basis(x.T @ x / len(x))
    assert abs(basis.vectors[MASSIVE, 0].item()) > 0.999, "the massive-activation channel carries the most energy"
    kept = basis.vectors[:, 1 : K + 1]
    assert (_projector(kept) - _projector(planted)).norm().item() < 0.05
    assert torch.all(basis.importance[:-1] >= basis.importance[1:]), "importance is in decreasing order"


def test_kept_subspace_has_the_least_reconstruction_error():
    x, _ = planted_activations(seed=1)
    moment = x.T @ x / len(x)
    basis = hidden_basis(moment)
    g = torch.Generator().manual_seed(2)
    for k in (1, K, K + 1, D // 2):
        ours = _lost_energy(moment, basis.vectors[:, :k])
        # naive reference (Eckart-Young): the best rank-k reconstruction of the data matrix loses the tail of its
        # squared singular values
        tail = torch.linalg.svdvals(x)[k:].pow(2).sum().item() / len(x)
        assert ours == pytest.approx(tail, rel=1e-6)
        random_best = min(_lost_energy(moment, _random_subspace(D, k, g)) for _ in range(200))
        assert ours < random_best
        assert ours < _lost_energy(moment, basis.vectors[:, -k:])


# ------------------------------------------------------------------------------------------ hidden size: RMSNorm
def _rms_normalised(x: torch.Tensor) -> torch.Tensor:
    return x / x.pow(2).mean(dim=1, keepdim=True).sqrt()


@pytest.mark.parametrize("k", [4, 12, 24])
def test_energy_compensation_is_the_formula_and_matches_the_parents_activation_size(k):
    x, _ = planted_activations(seed=3)
    x = _rms_normalised(x)  # what a norm site's statistics see (token-normalised calibration)
    moment = x.T @ x / len(x)
    u = hidden_basis(moment).vectors[:, :k]
    kept_fraction = (x @ u).pow(2).sum().item() / x.pow(2).sum().item()
    scale = norm_scale(moment, u, "energy")
    assert scale == pytest.approx(math.sqrt(D / k * kept_fraction), rel=1e-9)
    # what it is for: the child's RMSNorm over k channels, times the scale, gives outputs as large on average as
    # the parent's normalised activations projected onto the kept subspace
    y = x @ u
    child = scale * y / y.pow(2).mean(dim=1, keepdim=True).sqrt()
    assert child.pow(2).sum(1).mean().item() == pytest.approx(y.pow(2).sum(1).mean().item(), rel=1e-9)
    assert norm_scale(moment, u, "dim_ratio") == pytest.approx(math.sqrt(D / k))
    assert norm_scale(moment, u, "none") == 1.0


def low_rank_parent(rank: int) -> tuple[ModelState, torch.Tensor]:
    """An untied tiny parent whose residual stream lies in a planted ``rank``-dim subspace: the embedding and every
    block's writers (o_proj, down_proj) only write into it. Norm weights stay non-trivial."""
    parent = parent_state(num_layers=3)
    d = parent.config.hidden_size
    q = _random_subspace(d, rank, torch.Generator().manual_seed(4)).float()
    t = parent.tensors
    # x20: activations far above RMSNorm's eps, which a norm over k channels weighs k/d as much
    t["model.embed_tokens.weight"] = 20 * t["model.embed_tokens.weight"] @ q @ q.T
    for layer in range(parent.config.num_layers):
        for writer in ("self_attn.o_proj", "mlp.down_proj"):
            t[layer_key(layer, writer)] = q @ q.T @ t[layer_key(layer, writer)]
    return parent, q


@pytest.mark.parametrize("rank", [16, 24])
def test_hidden_pruning_onto_a_planted_residual_subspace_is_exact(rank):
    """Keeping the subspace the residual stream lives in, with norms compensated by the energy they keep
    (all of it: sqrt(d / k)), gives back the parent's logits at k < d; keeping it and leaving the norms alone
    does not."""
    parent, _ = low_rank_parent(rank)
    c = parent.config
    tokens, positions = calibration_batch(c)
    calibrator = megatron_calibrator(ParallelConfig(), tokens, positions, progress=False)
    target = PruneTarget(c.num_layers, rank, c.ffn_hidden_size, tie_embeddings=False)
    test_tokens, test_positions = calibration_batch(c, rows=2, seed=5)
    reference = logits(parent, test_tokens, test_positions)
    scale = reference.abs().max().item()
    child, report = prune(parent, target, PruneOptions(), calibrator)
    assert child.config.hidden_size == rank < c.hidden_size
    assert report["hidden"]["explained_at_target"] == pytest.approx(1.0, abs=1e-6)
    assert (logits(child, test_tokens, test_positions) - reference).abs().max().item() <= 1e-3 * scale
    uncompensated, _ = prune(parent, target, PruneOptions(norm_compensation="none"), calibrator)
    assert (logits(uncompensated, test_tokens, test_positions) - reference).abs().max().item() > 0.05 * scale


# ------------------------------------------------------------------------------------------ FFN channels
BIG = torch.tensor([[3, 17, 40, 41, 60, 77, 88, 95], [0, 9, 10, 33, 52, 70, 71, 90], [5, 6, 25, 47, 58, 63, 80, 94]])
SMALL = torch.tensor([[1, 2, 20, 30, 50, 66, 80, 91], [4, 15, 16, 44, 55, 61, 85, 93], [7, 11, 36, 37, 59, 72, 83, 92]])


def planted_ffn_parent() -> ModelState:
    """Per layer, channels BIG get |silu(W1 x) * W3 x| ~25x the others (gate and up rows x5), SMALL ~1e-4x."""
    parent = parent_state(num_layers=3)
    for layer in range(3):
        for name in ("mlp.gate_proj", "mlp.up_proj"):
            w = parent.tensors[layer_key(layer, name)]
            w[BIG[layer]] *= 5.0
            w[SMALL[layer]] *= 0.01
    return parent


def only_channels(parent: ModelState, kept: torch.Tensor) -> ModelState:
    """The parent with every other FFN channel switched off (its down_proj column zeroed): the naive reference."""
    t = dict(parent.tensors)
    for layer in range(parent.config.num_layers):
        down = t[layer_key(layer, "mlp.down_proj")].clone()
        off = torch.ones(down.shape[1], dtype=torch.bool)
        off[kept[layer]] = False
        down[:, off] = 0.0
        t[layer_key(layer, "mlp.down_proj")] = down
    return parent.derive(parent.config, t)


@pytest.mark.parametrize("case", ["keep the planted large", "drop the planted small"])
def test_ffn_keeps_planted_large_channels_and_drops_planted_small_ones(case):
    parent = planted_ffn_parent()
    c = parent.config
    everything = torch.arange(c.ffn_hidden_size)
    if case == "keep the planted large":
        expected = torch.sort(BIG, dim=1).values
    else:
        expected = torch.stack([everything[~torch.isin(everything, SMALL[layer])] for layer in range(3)])
    tokens, positions = calibration_batch(c)
    stats = calibrate(model_from_state(parent, ParallelConfig()), c, tokens, positions, {"ffn"}, progress=False)
    assert torch.equal(select_channels(stats.ffn_scores(), expected.shape[1]), expected)
    child = keep_channels(parent, expected)
    for layer in range(3):
        up = layer_key(layer, "mlp.up_proj")
        assert torch.equal(child.tensors[up], parent.tensors[up][expected[layer]])
    # end to end through the pipeline (full depth and width: only the FFN shrinks): the child computes what the
    # parent does with only those channels on
    target = PruneTarget(c.num_layers, c.hidden_size, expected.shape[1], tie_embeddings=False)
    calibrator = megatron_calibrator(ParallelConfig(), tokens, positions, progress=False)
    pruned, _ = prune(parent, target, PruneOptions(), calibrator)
    test_tokens, test_positions = calibration_batch(c, rows=2, seed=6)
    reference = logits(only_channels(parent, expected), test_tokens, test_positions)
    error = (logits(pruned, test_tokens, test_positions) - reference).abs().max().item()
    assert error <= 1e-4 * reference.abs().max().item()


# ------------------------------------------------------------------------------------------ the real parent
@pytest.fixture(scope="module")
def real_parent():
    """SmolLM2-135M, its hidden and FFN statistics on 1k calibration tokens, and 2 held-out windows of 128 tokens
    (the prune stage's default paths): small, the gaps measured are orders of magnitude."""
    from nemo_plugins.convert.sources import ModelSource, read_model_state, tokenizer_dir
    from nemo_plugins.data.packing import pack_text
    from nemo_plugins.data.text_files import iter_documents
    from nemo_plugins.data.tokenizer import load_tokenizer
    from nemo_plugins.eval.perplexity import token_windows
    from nemo_plugins.prune.stage import CalibrationData, PruneEval

    source = ModelSource.parse("embedded:smollm2")
    config, tensors = read_model_state(source, ParallelConfig())
    tokenizer = load_tokenizer(tokenizer_dir(source))
    tokens, positions = pack_text(tokenizer, CalibrationData().paths, 128, 8)
    windows = token_windows(tokenizer, iter_documents(PruneEval().paths), 128, 2)
    parent = ModelState(config, tensors)
    model = model_from_state(parent, ParallelConfig())
    stats = calibrate(model, config, tokens, positions, {"hidden", "ffn"}, progress=False)
    return parent, stats, windows


def _perplexity(state: ModelState, windows) -> float:
    from nemo_plugins.eval.perplexity import evaluate_perplexity

    return evaluate_perplexity(model_from_state(state, ParallelConfig()), windows, progress=False).perplexity


def _hidden_child(folded: ModelState, moments, u: torch.Tensor, mode: str) -> ModelState:
    scales = {name: norm_scale(m, u, mode) for name, m in moments.items()}
    return rotate_hidden(folded, u, scales)


@pytest.mark.slow
def test_real_parent_top_directions_and_energy_compensation_beat_their_opposites(real_parent):
    """SmolLM2 -> hidden 384 (everything else kept), perplexity right after pruning: the top-k PCA directions
    against the bottom-k, and energy-compensated norms against none (bench: 180 vs 570 on the first demo child)."""
    parent, stats, windows = real_parent
    c = parent.config
    basis = hidden_basis(stats.hidden_moment()[0])
    folded, moments, k = fold_norms(parent), stats.site_moments(), 384
    assert set(moments) == {f"model.layers.{i}.{s}" for i in range(c.num_layers) for s in NORM_SITES} | {"model.norm"}
    child = _hidden_child(folded, moments, basis.vectors[:, :k], "energy")
    top = _perplexity(child, windows)
    bottom = _perplexity(_hidden_child(folded, moments, basis.vectors[:, -k:], "energy"), windows)
    # the same child with every norm weight 1 (what "none" gives), without rotating again
    ones = {name: torch.ones_like(t) if "norm" in name else t for name, t in child.tensors.items()}
    assert all(norm_scale(m, basis.vectors[:, :k], "none") == 1.0 for m in moments.values())
    none = _perplexity(child.derive(child.config, ones), windows)
    print(f"SmolLM2 -> hidden {k}: perplexity top-k {top:.1f}, bottom-k {bottom:.1f}, "
          f"top-k without compensation {none:.1f}")
    assert 3 * top < bottom
    assert 1.5 * top < none


@pytest.mark.slow
def test_real_parent_ffn_top_channels_beat_the_bottom_ones(real_parent):
    """SmolLM2 -> FFN 768 (the demo's first step), perplexity right after pruning: top-k scores against bottom-k."""
    parent, stats, windows = real_parent
    scores, k = stats.ffn_scores(), 768
    top = _perplexity(keep_channels(parent, select_channels(scores, k)), windows)
    bottom_k = torch.sort(torch.topk(-scores, k, dim=1).indices, dim=1).values
    bottom = _perplexity(keep_channels(parent, bottom_k), windows)
    print(f"SmolLM2 -> FFN {k}: perplexity top-k {top:.1f}, bottom-k {bottom:.1f}")
    assert 3 * top < bottom
