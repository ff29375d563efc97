"""Sequence log-probs of responses: the naive full-logits sum over policy tokens at TP=1, the same numbers at
TP=2 and PP=2 on two gloo processes (sequence parallelism needs Transformer Engine's norms: GPU only); the
target-positions-only output layer gives the full forward's values and gradients."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.model.builder import build_model
from nemo_plugins.rl.logprobs import (
    ROW_MULTIPLE,
    frozen_sequence_logprobs,
    micro_batches,
    sample_rows,
    sequence_logprobs,
    target_token_losses,
)
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

SEQ_LEN = 24


def _samples(vocab: int) -> list:
    """Prompts and responses of several lengths; two responses carry injected (tool) tokens, one row is padding."""
    g = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    return [(ids(5), ids(9), [1] * 9),
            (ids(3), ids(12), [1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1]),
            None,
            (ids(8), ids(4), [1, 0, 0, 1])]


def _naive(model, samples) -> list[float]:
    """Each sample alone through the model: full logits, log_softmax, the policy tokens' log-probs summed."""
    out = []
    with torch.no_grad():
        for sample in samples:
            if sample is None:
                out.append(0.0)
                continue
            prompt, response, policy = sample
            ids = torch.tensor([prompt + response])
            logp = torch.log_softmax(model(ids, torch.arange(ids.shape[1])[None]).float()[0], -1)
            out.append(sum(float(logp[len(prompt) - 1 + i, token])
                           for i, (token, keep) in enumerate(zip(response, policy)) if keep))
    return out


def test_sequence_logprobs_are_the_policy_tokens_log_probs_under_full_logits():
    config = tiny_config()
    model = build_model(config, ParallelConfig()).eval()
    samples = _samples(config.vocab_size)
    rows = sample_rows(samples, SEQ_LEN, pad_id=0)
    expected = torch.tensor(_naive(model, samples))
    frozen = frozen_sequence_logprobs(model, micro_batches(rows, 2))
    assert torch.allclose(frozen, expected, atol=1e-4), (frozen, expected)
    batch = micro_batches(rows, 4)[0]
    live = sequence_logprobs(model(batch["tokens"], batch["positions"], labels=batch["labels"]), batch["mask"])
    assert torch.allclose(live, expected, atol=1e-4)
    every_token = [None if s is None else (s[0], s[1], [1] * len(s[1])) for s in samples]
    with_tools = frozen_sequence_logprobs(model, micro_batches(sample_rows(every_token, SEQ_LEN, 0), 2))
    assert not torch.allclose(with_tools[1], frozen[1]), "tool-output tokens must not be scored"


def test_target_position_losses_equal_the_full_forwards_values_and_gradients():
    """The output layer and loss on the scored positions only: the full forward's per-token loss there (and its
    gradient to every parameter, the tied output weight included), zero elsewhere, the padding row included."""
    config = tiny_config()
    model = build_model(config, ParallelConfig())
    batch = micro_batches(sample_rows(_samples(config.vocab_size), SEQ_LEN, pad_id=0), 4)[0]
    weights = torch.rand(batch["mask"].shape, generator=torch.Generator().manual_seed(0))

    def gradients(losses):
        model.zero_grad()
        (losses * weights).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    full = model(batch["tokens"], batch["positions"], labels=batch["labels"]) * batch["mask"]
    want = gradients(full)
    hidden = model(batch["tokens"], batch["positions"], return_hidden=True)
    scored = target_token_losses(model, hidden, batch["labels"], batch["mask"])
    assert scored.shape == batch["mask"].shape and not scored[batch["mask"] == 0].any()
    torch.testing.assert_close(scored, full, atol=1e-6, rtol=1e-6)
    got = gradients(scored)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_rows_stop_at_the_longest_sample_rounded_up_not_at_seq_len():
    """Pad columns cost forward and backward work: a call's rows are as wide as its longest sample rounded up to
    ROW_MULTIPLE (16: FP8 GEMMs, sequence parallelism), never wider than seq_len."""
    assert ROW_MULTIPLE == 16
    tokens, positions, mask = sample_rows([([1] * 5, [2] * 12, [1] * 12), None], 100, 0)
    assert tokens.shape == positions.shape == mask.shape == (2, 32), "17 tokens round up to 32"
    assert tokens[0, 17:].eq(0).all() and mask[0].sum() == 12 and positions[1].tolist() == list(range(32))
    assert sample_rows([([1] * 5, [2] * 11, [1] * 11)], 100, 0)[0].shape == (1, 16)
    assert sample_rows([([1] * 5, [2] * 12, [1] * 12)], 20, 0)[0].shape == (1, 20), "capped at seq_len"
    assert sample_rows([None], 100, 0)[0].shape == (1, 16)


def test_a_sample_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        sample_rows([([1] * 10, [2] * 20, [1] * 20)], SEQ_LEN, 0)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parallel_logprobs(config, parallel: ParallelConfig, state_path: str, out_path: str) -> None:
    """Worker: the frozen path (one schedule, 2 micro-batches) and, without PP, the differentiable path."""
    initialize(parallel)
    model = build_model(config, parallel).eval()
    load_hf_state(model, torch.load(state_path), config)
    rows = sample_rows(_samples(config.vocab_size), SEQ_LEN, 0)
    result = {"frozen": frozen_sequence_logprobs(model, micro_batches(rows, 2)).cpu()}
    if parallel.pp == 1:
        batch = micro_batches(rows, 4)[0]
        with torch.no_grad():
            result["live"] = sequence_logprobs(model(batch["tokens"], batch["positions"], labels=batch["labels"]),
                                               batch["mask"]).cpu()
            hidden = model(batch["tokens"], batch["positions"], return_hidden=True)
            result["targets"] = sequence_logprobs(target_token_losses(model, hidden, batch["labels"], batch["mask"]),
                                                  batch["mask"]).cpu()
    if dist.get_rank() == 0:
        torch.save(result, out_path)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", [ParallelConfig(tp=2), ParallelConfig(pp=2)], ids=["tp2", "pp2"])
def test_two_ranks_give_the_single_rank_numbers(tmp_path, parallel):
    config = tiny_config()
    state = hf_state(hf_model(config))
    torch.save(state, tmp_path / "state.pt")
    single = build_model(config, ParallelConfig()).eval()
    load_hf_state(single, state, config)
    expected = frozen_sequence_logprobs(single, micro_batches(sample_rows(_samples(config.vocab_size), SEQ_LEN, 0), 2))
    out = tmp_path / "out.pt"
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, _port(), parallel_logprobs, (config, parallel, str(tmp_path / "state.pt"), str(out))))
    result = torch.load(out)
    assert (result["frozen"] - expected).abs().max().item() <= 1e-4
    if "live" in result:
        assert (result["live"] - expected).abs().max().item() <= 1e-4
        assert (result["targets"] - expected).abs().max().item() <= 1e-4
