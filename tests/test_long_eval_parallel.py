"""Long-context evaluation gives the same numbers at TP=2 and at DP=2 as at TP=1, on 2 gloo processes; at TP=1 it
equals a naive reference (full logits, position by position), with or without the right-padding a layout with
sequence or context parallelism gets (megatron's local spec refuses sequence parallelism, so on CPU the padding is
forced by hand: rows of odd lengths padded to multiples of 16).

The passkey scorer is checked on answers that are the model's own greedy continuation (all tokens right) and on
the same answers with the last token changed (all but one right): a random tiny model gets no real key right.
"""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nemo_plugins.convert.model_io import load_hf_state
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.eval import long_context
from nemo_plugins.eval.long_context import answer_tokens_right, bucket_edges, perplexity_by_position
from nemo_plugins.model.builder import build_model
from tests import distributed_worker
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state

CONFIG = tiny_config()
BUCKETS = 3
LAYOUTS = {"tp2": ParallelConfig(tp=2), "dp2": ParallelConfig()}


def _evaluate(model, inputs: dict) -> dict:
    return {"right": answer_tokens_right(model, inputs["examples"]),
            "perplexity": [b["perplexity"] for b in perplexity_by_position(model, inputs["windows"], BUCKETS, 2)]}


def layouts_worker(state_path: str, inputs_path: str, out_path: str) -> None:
    state, inputs = torch.load(state_path), torch.load(inputs_path)
    results = {}
    for name, parallel in LAYOUTS.items():
        initialize(parallel)
        model = build_model(CONFIG, parallel)
        load_hf_state(model, state, CONFIG)
        results[name] = _evaluate(model, inputs)
    if dist.get_rank() == 0:
        torch.save(results, out_path)


def _greedy_examples(model) -> tuple[list, list[int]]:
    """Prompts of odd and even lengths with answers the model's own greedy continuation (full forward each token),
    and with the last answer token changed; the counts of right answer tokens either should get."""
    generator = torch.Generator().manual_seed(0)
    examples, expected = [], []
    for length in (13, 20, 31):
        prompt = torch.randint(0, CONFIG.vocab_size, (length,), generator=generator).tolist()
        answer: list[int] = []
        for _ in range(3):
            ids = torch.tensor([prompt + answer])
            answer.append(int(model(ids, torch.arange(ids.shape[1])[None])[0, -1].argmax()))
        examples += [(prompt, answer), (prompt, answer[:-1] + [(answer[-1] + 1) % CONFIG.vocab_size])]
        expected += [3, 2]
    return examples, expected


def _reference_perplexity(model, windows: torch.Tensor) -> list[float]:
    length = windows.shape[1] - 1
    logits = model(windows[:, :-1], torch.arange(length).expand(len(windows), -1))
    nll = F.cross_entropy(logits.transpose(1, 2).double(), windows[:, 1:], reduction="none")
    edges = bucket_edges(length, BUCKETS)
    return [math.exp(nll[:, a:b].mean().item()) for a, b in zip(edges, edges[1:])]


@pytest.mark.distributed
def test_tp2_and_dp2_equal_tp1_which_equals_the_naive_reference_padded_or_not(tmp_path, monkeypatch):
    state = hf_state(hf_model(CONFIG))
    single = build_model(CONFIG, ParallelConfig()).eval()
    load_hf_state(single, state, CONFIG)
    with torch.no_grad():
        examples, expected = _greedy_examples(single)
        windows = torch.randint(0, CONFIG.vocab_size, (3, 30))  # 29 inputs
        reference = _reference_perplexity(single, windows)
    inputs = {"examples": examples, "windows": windows}
    one = _evaluate(single, inputs)
    assert one["right"] == expected
    assert one["perplexity"] == pytest.approx(reference, rel=1e-6)
    with monkeypatch.context() as patch:
        patch.setattr(long_context, "model_multiple", lambda model: 16)
        padded = _evaluate(single, inputs)
    assert padded["right"] == expected
    assert padded["perplexity"] == pytest.approx(reference, rel=1e-6)

    torch.save(state, tmp_path / "state.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(distributed_worker.run, nprocs=2, join=True,
             args=(2, port, layouts_worker, (str(tmp_path / "state.pt"), str(tmp_path / "inputs.pt"),
                                             str(tmp_path / "out.pt"))))
    results = torch.load(tmp_path / "out.pt")
    for name in LAYOUTS:
        assert results[name]["right"] == expected, name
        assert results[name]["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5), name
