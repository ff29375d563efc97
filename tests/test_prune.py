"""Algorithm 2 on tiny models: exact identity, the right block dropped, streaming == stored statistics."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.prune.calibration import calibrate
from nemo_plugins.prune.megatron_calibrator import megatron_calibrator, model_from_state
from nemo_plugins.prune.pipeline import PruneOptions, PruneTarget, prune
from nemo_plugins.prune.state import ModelState
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


def parent_state(**changes) -> ModelState:
    config = tiny_config(**changes)
    return ModelState(config, hf_state(hf_model(config)))


def calibration_batch(config, rows=8, length=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (rows, length), generator=generator)
    return tokens, torch.arange(length).expand(rows, -1).clone()


def logits(state: ModelState, tokens, positions):
    with torch.no_grad():
        return model_from_state(state, ParallelConfig())(tokens, positions)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("recalibrate", [True, False])
def test_keeping_everything_reproduces_the_parent(tied, recalibrate):
    parent = parent_state(tie_embeddings=tied, num_layers=3)
    c = parent.config
    tokens, positions = calibration_batch(c)
    target = PruneTarget(c.num_layers, c.hidden_size, c.ffn_hidden_size, tie_embeddings=False)
    calibrator = megatron_calibrator(ParallelConfig(), tokens, positions, progress=False)
    child, report = prune(parent, target, PruneOptions(recalibrate=recalibrate), calibrator)
    rotation = torch.tensor(report["hidden"]["importance"])
    assert rotation.numel() == c.hidden_size
    embedding = "model.embed_tokens.weight"
    assert not torch.equal(child.tensors[embedding], parent.tensors[embedding]), "a real rotation was applied"
    test_tokens, test_positions = calibration_batch(c, rows=2, seed=2)
    diff = (logits(child, test_tokens, test_positions) - logits(parent, test_tokens, test_positions)).abs().max().item()
    assert diff <= 1e-4, diff


def without_blocks(state: ModelState, kept: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """Naive reference: transformers' model of ``state`` with only the ``kept`` blocks left in its layer list."""
    model = hf_model(state.config)
    model.load_state_dict(state.tensors)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in kept)
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


def test_near_identity_blocks_are_dropped_first_and_the_rest_keep_their_order():
    parent = parent_state(num_layers=5)
    for block, factor in ((1, 1e-4), (3, 1e-2)):  # blocks 1 and 3 barely touch the residual stream, 1 the least
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            parent.tensors[f"model.layers.{block}.{name}.weight"] *= factor
    c = parent.config
    tokens, positions = calibration_batch(c)
    calibrator = megatron_calibrator(ParallelConfig(), tokens, positions, progress=False)
    _, report = prune(parent, PruneTarget(4, c.hidden_size, c.ffn_hidden_size, False), PruneOptions(), calibrator)
    scores = report["layers"]["scores"]
    assert report["layers"]["kept"] == [0, 2, 3, 4]
    assert abs(scores[1] - 1.0) < 1e-3 and scores[1] < scores[3] < min(scores[0], scores[2], scores[4])
    child, report = prune(parent, PruneTarget(3, c.hidden_size, c.ffn_hidden_size, False), PruneOptions(), calibrator)
    assert report["layers"]["kept"] == [0, 2, 4]
    test_tokens, test_positions = calibration_batch(c, rows=2, seed=2)
    reference = without_blocks(parent, [0, 2, 4], test_tokens)
    error = (logits(child, test_tokens, test_positions) - reference).abs().max().item()
    assert error <= 1e-4 * reference.abs().max().item()
    assert (without_blocks(parent, [4, 2, 0], test_tokens) - reference).abs().max().item() > 1e-2, "order matters here"


def stored_statistics(state: ModelState, tokens: torch.Tensor, token_normalized: bool):
    """The same statistics from every activation stored by hooks on the transformers model."""
    model = hf_model(state.config)
    tied = {"lm_head.weight": state.tensors["model.embed_tokens.weight"]} if state.config.tie_embeddings else {}
    model.load_state_dict({**state.tensors, **tied})
    store: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        return lambda module, args, *out: store.setdefault(name, []).append((args[0] if not out else out[0]).detach())

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(keep(f"in{i}"))
        layer.register_forward_hook(lambda m, a, out, i=i: store.setdefault(f"out{i}", []).append(
            (out[0] if isinstance(out, tuple) else out).detach()))
        layer.input_layernorm.register_forward_pre_hook(keep(f"attn_norm{i}"))
        layer.post_attention_layernorm.register_forward_pre_hook(keep(f"ffn_norm{i}"))
        layer.mlp.down_proj.register_forward_pre_hook(keep(f"ffn{i}"))
    with torch.no_grad():
        model(tokens)
    flat = {k: torch.cat(v).reshape(-1, v[0].shape[-1]).double() for k, v in store.items()}
    if token_normalized:
        for key in [k for k in flat if "norm" in k]:
            flat[key] = flat[key] / flat[key].pow(2).mean(dim=1, keepdim=True).sqrt()
    L = state.config.num_layers
    ratios = torch.stack([(flat[f"out{i}"].norm(dim=1) / flat[f"in{i}"].norm(dim=1)).sum() for i in range(L)])
    moments = torch.stack([torch.stack([flat[f"{s}{i}"].T @ flat[f"{s}{i}"] for s in ("attn_norm", "ffn_norm")])
                           for i in range(L)])
    ffn = torch.stack([flat[f"ffn{i}"].abs().sum(0) for i in range(L)])
    return ratios, moments, ffn


@pytest.mark.parametrize("token_normalized", [True, False])
def test_streaming_statistics_equal_stored_activations(token_normalized):
    state = parent_state(num_layers=2)
    tokens, positions = calibration_batch(state.config, rows=6, length=16)
    model = model_from_state(state, ParallelConfig())
    stats = calibrate(model, state.config, tokens, positions, micro_batch_size=4, progress=False,
                      token_normalized=token_normalized)
    ratios, moments, ffn = stored_statistics(state, tokens, token_normalized)
    assert stats.tokens == tokens.numel()
    torch.testing.assert_close(stats.layer_ratio_sum, ratios, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.norm_moments, moments, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.ffn_sums, ffn, rtol=1e-5, atol=1e-5)


def test_masked_tokens_do_not_count():
    state = parent_state()
    tokens, positions = calibration_batch(state.config, rows=4, length=16)
    model = model_from_state(state, ParallelConfig())
    mask = torch.ones_like(tokens)
    mask[:, 8:] = 0
    masked = calibrate(model, state.config, tokens, positions, mask=mask, progress=False)
    # causal attention: the first 8 tokens of each row are unaffected by what follows
    prefix = calibrate(model, state.config, tokens[:, :8], positions[:, :8], progress=False)
    assert masked.tokens == prefix.tokens == 32
    torch.testing.assert_close(masked.norm_moments, prefix.norm_moments, rtol=1e-5, atol=1e-5)


MEMORY_SCRIPT = r"""
import json, resource, sys, torch
from nemo_plugins import cpu_compat
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.prune.calibration import calibrate
from nemo_plugins.prune.megatron_calibrator import model_from_state
from tests.test_prune import parent_state
cpu_compat.install()
initialize(ParallelConfig())
state = parent_state(hidden_size=128, head_dim=32, ffn_hidden_size=256, num_layers=4)
rows = int(sys.argv[1])
tokens = torch.randint(0, 128, (rows, 256)); positions = torch.arange(256).expand(rows, -1)
model = model_from_state(state, ParallelConfig())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
calibrate(model, state.config, tokens, positions, micro_batch_size=8, progress=False)
print(json.dumps({"growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_calibration_memory_is_flat_in_tokens():
    """16x more tokens (65k) must not raise peak memory; storing the activations would add ~0.5 GiB."""
    def growth(rows):
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(rows)], capture_output=True, text=True,
                             check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        return json.loads(out.stdout.strip().splitlines()[-1])["growth_kib"]

    small, large = growth(16), growth(256)
    print(f"peak RSS growth during calibration: {small} KiB (4k tokens), {large} KiB (65k tokens)")
    assert large - small < 64 * 1024


def test_target_larger_than_parent_is_refused():
    parent = parent_state()
    with pytest.raises(ConfigError, match="prune.target.hidden_size=64 must be between 1 and the parent's 48"):
        prune(parent, PruneTarget(2, 64, 96, False), PruneOptions(), lambda *_: None)


def test_target_tp_cannot_split_is_refused():
    with pytest.raises(ConfigError, match="ffn_hidden_size=95 is not divisible by parallel.tp=2"):
        PruneTarget(2, 48, 95, False).check_against(tiny_config(), tensor_parallel=2)


def test_empty_calibration_data_is_refused():
    state = parent_state()
    model = model_from_state(state, ParallelConfig())
    empty = torch.zeros(0, 16, dtype=torch.long)
    with pytest.raises(ConfigError, match="calibration data is empty"):
        calibrate(model, state.config, empty, empty, progress=False)


def test_checkpoint_not_matching_its_config_is_refused():
    state = parent_state()
    state.tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(64, 48)
    with pytest.raises(ConfigError, match="gate_proj.weight.*\\(64, 48\\).*\\(96, 48\\)"):
        model_from_state(state, ParallelConfig())


def test_tying_with_a_fitted_norm_scale_beats_plain_tying():
    """Tied parent, full-rank child that must be tied: the fitted final-norm scale makes norm(h) diag(s) E^T the
    least-squares fit of the folded output layer, so the logits move closer to the parent's."""
    from nemo_plugins.prune.embeddings import set_tied
    from nemo_plugins.prune.hidden import fold_norms

    parent = parent_state(tie_embeddings=True)
    with torch.no_grad():
        parent.tensors["model.norm.weight"].copy_(torch.linspace(0.2, 3.0, parent.config.hidden_size))
    folded = fold_norms(parent)
    output = folded.tensors["lm_head.weight"]
    fit = set_tied(folded, True, "embedding_fit")
    plain = set_tied(folded, True, "embedding")
    fitted_output = fit.tensors["model.embed_tokens.weight"] * fit.tensors["model.norm.weight"]
    assert (fitted_output - output).norm() < (plain.tensors["model.embed_tokens.weight"] - output).norm()
    tokens, positions = calibration_batch(parent.config)
    reference = logits(parent, tokens, positions)
    error = {name: (logits(s, tokens, positions) - reference).abs().mean().item()
             for name, s in (("fit", fit), ("plain", plain))}
    assert error["fit"] < 1e-4 < error["plain"], error  # no rotation here: the scale is exactly gamma
