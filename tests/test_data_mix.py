"""The single-pass data cursor: disjoint contiguous reads, exact resume, weights, exhaustion, held-out split."""

import pytest
import torch

from nemo_plugins.data.mix import Cursor, DataMix, MixSource
from nemo_plugins.data.token_store import write_token_file
from nemo_plugins.errors import DataError


@pytest.fixture
def mix(tmp_path):
    a = write_token_file([list(range(10, 10 + n)) for n in (50, 70, 30)] * 4, tmp_path / "a", 1000, 2, {})
    b = write_token_file([list(range(500, 500 + n)) for n in (40, 90)] * 2, tmp_path / "b", 1000, 2, {})
    return DataMix([MixSource("a", a, 3.0), MixSource("b", b, 1.0)], heldout_fraction=0.1)


def test_consecutive_reads_are_disjoint_and_contiguous(mix):
    cursor = Cursor()
    seen = {"a": [], "b": []}
    for _ in range(3):
        before = cursor.to_dict()
        _, _, cursor = mix.next_rows(cursor, rows=4, seq_len=16)
        for name in seen:
            seen[name].append((before["offsets"].get(name, 0), cursor.offsets.get(name, 0)))
    for ranges in seen.values():
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start, "each read starts where the previous one ended"
    assert cursor.tokens() == 3 * 4 * 16


def test_resume_from_saved_cursor_reads_the_same_rows(mix):
    straight, _, _ = mix.next_rows(Cursor(), rows=8, seq_len=16)
    first, _, saved = mix.next_rows(Cursor(), rows=5, seq_len=16)
    second, _, _ = mix.next_rows(Cursor.from_dict(saved.to_dict()), rows=3, seq_len=16)
    assert torch.equal(torch.cat([first, second]), straight)


def test_weights_set_the_share_of_rows(mix):
    _, _, cursor = mix.next_rows(Cursor(), rows=16, seq_len=8)
    assert cursor.rows == {"a": 12, "b": 4}


def test_positions_restart_per_document(mix):
    tokens, positions, _ = mix.next_rows(Cursor(), rows=1, seq_len=60)
    eos = (tokens[0] == 2).nonzero()[0].item()
    assert positions[0, 0] == 0 and positions[0, eos + 1] == 0
    assert torch.equal(positions[0, : eos + 1], torch.arange(eos + 1))


def test_exhaustion_is_an_error_not_a_repeat(mix):
    with pytest.raises(DataError, match="exhausted after .* training tokens"):
        mix.next_rows(Cursor(), rows=10_000, seq_len=16)


def test_heldout_rows_never_overlap_training(mix):
    tokens, _ = mix.heldout_rows(seq_len=16, max_rows_per_source=2)
    tails = {s.name: len(s.file) - mix.train_end[s.name] for s in mix.sources}
    assert tails == {"a": 62, "b": 27}  # the last 10% of 612 and of 264 tokens
    assert tokens.shape == (2 + 1, 16)  # b's tail holds one whole row
    _, _, cursor = mix.next_rows(Cursor(), rows=36, seq_len=16)  # as much training as the mix allows
    assert all(cursor.offsets[name] <= mix.train_end[name] for name in tails)
