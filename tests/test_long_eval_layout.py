"""Long-context evaluation in the training layout, on CPU: padded lengths every rank can take, CP partial sums that
add up to the whole rows' (against a position-by-position reference), and windows bounded by the held-out text.

Context parallelism needs Transformer Engine, so the CP path is checked piece by piece: padding + the training
batches' zigzag slice + the per-rank bucket sums, summed over simulated CP ranks.
"""

import math

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.stage import DistillStage, LongContextEval, long_context_eval
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import DataError
from nemo_plugins.eval.long_context import (
    IGNORE,
    bucket_edges,
    bucket_sums,
    heldout_windows,
    pad_rows,
    sequence_multiple,
)
from nemo_plugins.eval.perplexity import token_stream
from nemo_plugins.model.builder import build_model
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from tests.conftest import tiny_config

LAYOUTS = [(tp, cp, sp) for tp in (1, 2, 4, 8) for cp in (1, 2, 4, 8) for sp in (False, True) if tp > 1 or not sp]


def _takes(length: int, tp: int, cp: int, sp: bool) -> bool:
    """Whether every rank of the layout gets whole pieces: 2 x CP chunks, each CP part a multiple of TP under SP."""
    return ((cp == 1 or length % (2 * cp) == 0) and length % cp == 0
            and (not sp or (length // cp) % tp == 0))


@pytest.mark.parametrize("tp,cp,sp", LAYOUTS)
def test_sequence_multiple_is_the_smallest_length_every_rank_can_take(tp, cp, sp):
    multiple = sequence_multiple(tp, cp, sp)
    assert [n for n in range(1, 300) if _takes(n, tp, cp, sp)] == list(range(multiple, 300, multiple))


def _reference_sums(nll: torch.Tensor, targets: torch.Tensor, edges: list[int]) -> list[list[float]]:
    sums = [[0.0, 0.0] for _ in edges[1:]]
    for row in range(nll.shape[0]):
        for position in range(nll.shape[1]):
            if targets[row, position] != IGNORE:
                bucket = max(k for k, start in enumerate(edges[:-1]) if position >= start)
                sums[bucket][0] += float(nll[row, position])
                sums[bucket][1] += 1
    return sums


@pytest.mark.parametrize("tp,cp,sp", [(1, 1, False), (2, 1, True), (1, 2, False), (2, 4, True), (8, 8, True)])
def test_cp_parts_of_padded_rows_add_up_to_the_whole_rows_bucket_sums(tp, cp, sp):
    length = 37  # odd: every layout but the first needs padding
    nll = torch.rand(2, length, dtype=torch.float64)
    targets = torch.randint(0, 50, (2, length))
    targets[0, 5:9] = IGNORE  # prompt positions are not scored
    edges = bucket_edges(length, 4)
    tokens, positions, padded_targets = pad_rows(targets.clamp(min=0), targets, sequence_multiple(tp, cp, sp))
    assert _takes(tokens.shape[1], tp, cp, sp) and torch.equal(tokens[:, :length], targets.clamp(min=0))
    padded_nll = torch.cat([nll, torch.full((2, tokens.shape[1] - length), 1e6, dtype=torch.float64)], dim=1)
    parts = [bucket_sums(*(context_parallel_slice(t, cp, rank) for t in (padded_nll, positions, padded_targets)), edges)
             for rank in range(cp)]
    torch.testing.assert_close(sum(parts), torch.tensor(_reference_sums(nll, targets, edges), dtype=torch.float64))


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(tokenizer_dir(ModelSource.parse("embedded:smollm2")))


def _text(tmp_path, words: int):
    path = tmp_path / f"heldout_{words}.txt"
    path.write_text(" ".join(f"word{i % 97}" for i in range(words)))
    return [str(path)]


def test_windows_are_those_asked_for_when_the_text_holds_them(tokenizer, tmp_path):
    paths = _text(tmp_path, 2000)
    windows, record = heldout_windows(tokenizer, iter_documents(paths), 63, 3, 8, "long_eval.paths")
    assert windows.shape == (3, 64)
    assert record == {"window_tokens": 63, "windows": 3, "asked": {"window_tokens": 63, "windows": 3},
                      "text_tokens": record["text_tokens"]}
    assert windows.flatten().tolist() == token_stream(tokenizer, iter_documents(paths), 10**9)[:3 * 64]


def test_text_shorter_than_one_window_gives_the_longest_window_it_holds_in_the_layouts_multiple(tokenizer, tmp_path):
    paths = _text(tmp_path, 200)
    stream = token_stream(tokenizer, iter_documents(paths), 10**9)
    windows, record = heldout_windows(tokenizer, iter_documents(paths), 262144, 4, 16, "long_eval.paths")
    length = (len(stream) - 1) // 16 * 16
    assert record == {"window_tokens": length, "windows": 1, "asked": {"window_tokens": 262144, "windows": 4},
                      "text_tokens": len(stream)}
    assert length > len(stream) - 1 - 16 and windows.tolist() == [stream[: length + 1]]


def test_text_shorter_than_the_layouts_multiple_is_a_data_error_naming_the_key(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"long_eval\.paths of stage x holds \d+ tokens"):
        heldout_windows(tokenizer, iter_documents(_text(tmp_path, 3)), 4096, 2, 64, "the long_eval.paths of stage x")


def test_a_long_stage_evaluated_on_less_text_than_its_window_records_the_window_it_used(tokenizer, tmp_path):
    """The long stage's evaluation end to end on a tiny model: 2,048-token windows asked, a few hundred tokens held."""
    config = tiny_config(vocab_size=len(tokenizer))
    model = build_model(config, ParallelConfig())
    stage = DistillStage("distill_long", TrainSettings(seq_len=2048, micro_batch_size=1, global_batch_size=1,
                                                       train_tokens=2048), OptimizerSettings(), KLOptions(),
                         long_eval=LongContextEval(paths=_text(tmp_path, 150), windows=2, buckets=3,
                                                   passkey_lengths=[64, 4096], passkey_samples=2))
    result = long_context_eval(model, tokenizer, stage)
    held = result["windows"]["window_tokens"]
    assert result["windows"]["asked"] == {"window_tokens": 2048, "windows": 2} and 100 < held < 2048
    assert [(b["start"], b["end"]) for b in result["position_perplexity"]] == list(
        zip(bucket_edges(held, 3), bucket_edges(held, 3)[1:]))
    assert all(math.isfinite(b["perplexity"]) for b in result["position_perplexity"])
    assert [p["length"] for p in result["passkey"]] == [64], "passkey lengths beyond the stage's context are dropped"
