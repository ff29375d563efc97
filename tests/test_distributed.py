"""TP=2 and PP=2 on 2 gloo processes give the numbers of TP=PP=1 for the same weights."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.model.builder import build_model
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

pytestmark = pytest.mark.distributed


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(body, *args, world_size=2):
    mp.spawn(distributed_worker.run, args=(world_size, _port(), body, args), nprocs=world_size, join=True)


def _inputs(config, path, batch=4, length=24):
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    positions = torch.arange(length).expand(batch, -1).clone()
    torch.save((tokens, positions), str(path) + ".inputs")
    return tokens, positions


def _reference(config, tmp_path):
    reference = hf_model(config)
    state = hf_state(reference)
    torch.save(state, tmp_path / "state.pt")
    single = build_model(config, ParallelConfig())
    load_hf_state(single, state, config)
    return single, state


@pytest.mark.parametrize("tied", [False, True])
def test_tensor_parallel_2_equals_1(tmp_path, tied):
    config = tiny_config(tie_embeddings=tied, num_kv_heads=2, num_attention_heads=4)
    single, state = _reference(config, tmp_path)
    out = tmp_path / "tp2.pt"
    tokens, positions = _inputs(config, out)
    with torch.no_grad():
        logits = single.eval()(tokens, positions)
        loss = single(tokens, positions, labels=tokens.roll(-1, dims=1))
    _spawn(distributed_worker.tp_logits_and_loss, config, str(tmp_path / "state.pt"), str(out), 2)
    result = torch.load(out)
    assert (result["logits"] - logits).abs().max().item() <= 1e-5
    assert (result["loss"] - loss).abs().max().item() <= 1e-5
    for name, tensor in state.items():
        assert torch.equal(result["roundtrip"][name], tensor), name


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_parallel_2_equals_1(tmp_path, tied):
    config = tiny_config(tie_embeddings=tied, num_layers=4)
    _reference(config, tmp_path)
    out1, out2 = tmp_path / "pp1.pt", tmp_path / "pp2.pt"
    tokens, positions = _inputs(config, out1)
    torch.save((tokens, positions), str(out2) + ".inputs")
    _spawn(distributed_worker.pp_loss, config, str(tmp_path / "state.pt"), str(out1), 1, world_size=1)
    _spawn(distributed_worker.pp_loss, config, str(tmp_path / "state.pt"), str(out2), 2)
    one, two = torch.load(out1), torch.load(out2)
    assert abs(one["loss"].item() - two["loss"].item()) <= 1e-5
    torch.testing.assert_close(two["grad_sq"], one["grad_sq"], rtol=1e-5, atol=1e-8)


def test_tensor_parallel_calibration_prunes_the_same_model(tmp_path):
    config = tiny_config(num_layers=4)
    torch.save(hf_state(hf_model(config)), tmp_path / "state.pt")
    outputs = {}
    for tp in (1, 2):
        out = tmp_path / f"prune_tp{tp}.pt"
        _inputs(config, tmp_path / "prune_tp1.pt", batch=6, length=24) if tp == 1 else torch.save(
            torch.load(str(tmp_path / "prune_tp1.pt") + ".inputs"), str(out) + ".inputs")
        _spawn(distributed_worker.prune_tiny, config, str(tmp_path / "state.pt"), str(out), tp, world_size=tp)
        outputs[tp] = torch.load(out, weights_only=False)
    one, two = outputs[1], outputs[2]
    assert one["config"] == two["config"]
    assert one["report"]["layers"]["kept"] == two["report"]["layers"]["kept"]
    for name, tensor in one["tensors"].items():
        torch.testing.assert_close(two["tensors"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def test_vocab_parallel_kl_loss_equals_single_rank(tmp_path):
    from tests.test_kl_loss import problem

    torch.save(problem(tokens=21, vocab=64), tmp_path / "problem.pt")
    results = {}
    for tp in (1, 2):
        _spawn(distributed_worker.kl_loss_tp, str(tmp_path / "problem.pt"), str(tmp_path / f"kl{tp}.pt"), tp,
               world_size=tp)
        results[tp] = torch.load(tmp_path / f"kl{tp}.pt")
    for name in ("kl", "ce"):
        for one, two in zip(results[1][name], results[2][name]):
            torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
