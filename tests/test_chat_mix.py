"""Chat mix: whole conversations packed with restarting positions, padding never a target, the target mask one
token ahead, dropped-and-counted long conversations, a cursor that continues exactly, a disjoint held-out split,
file:line errors — checked against a naive reference built from the format's own per-conversation encodings."""

import json

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.mix import Cursor, SourceSpec
from nemo_plugins.errors import DataError

SEQ_LEN = 160
LONG = {4, 13}  # conversations written longer than SEQ_LEN


@pytest.fixture(scope="module")
def chatml():
    return load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))


def conversation(i: int, long: bool = False) -> dict:
    """Lengths vary with i; a second turn every third conversation; a long answer where asked."""
    messages = [{"role": "user", "content": f"Question {i}: " + "how many? " * (i % 4)},
                {"role": "assistant", "content": f"Answer {i}. " + ("It is so. " * (60 if long else i % 5))}]
    if i % 3 == 0:
        messages += [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    return {"messages": messages, "meta": {"i": i}}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def source_file(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", [conversation(i, i in LONG) for i in range(20)])


def reference(chatml, records):
    """Each conversation's (tokens, assistant mask) as the format encodes it on its own."""
    return [chatml.encode(r["messages"]) for r in records]


def row_conversations(tokens, positions, targets, pad_id):
    """Split one row at position 0 into (tokens, targets) runs; the padding run is returned separately."""
    starts = (positions == 0).nonzero().flatten().tolist() + [len(tokens)]
    runs = [(tokens[a:b].tolist(), targets[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    if runs and all(t == pad_id for t in runs[-1][0]):
        return runs[:-1], runs[-1]
    return runs, None


def test_rows_hold_whole_conversations_greedily_with_padding_masked(chatml, source_file, tmp_path):
    mix = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", heldout_fraction=0.25)
    records = [conversation(i, i in LONG) for i in range(20)]
    train = [e for i, e in enumerate(reference(chatml, records)[:15]) if i not in LONG]  # 20 * 0.75 = 15 train
    assert all(len(e.tokens) > SEQ_LEN for i, e in enumerate(reference(chatml, records)) if i in LONG)
    tokens, positions, targets, cursor = mix.next_rows(Cursor(), rows=4, seq_len=SEQ_LEN)
    assert tokens.shape == positions.shape == targets.shape == (4, SEQ_LEN)
    assert tokens.dtype == positions.dtype == torch.int64 and targets.dtype == torch.float32
    expected = iter(train)
    pending = next(expected)
    for r in range(4):
        runs, padding = row_conversations(tokens[r], positions[r], targets[r], chatml.pad_id)
        assert runs, "every row holds at least one conversation"
        for run_tokens, run_targets in runs:
            assert run_tokens == pending.tokens, "a whole conversation, in file order, never cut"
            shifted = pending.assistant_mask[1:] + [0]
            assert run_targets == shifted, "target at t = assistant token at t+1, same conversation"
            pending = next(expected)
        if padding is not None:
            assert set(padding[1]) == {0.0}
            assert len(pending.tokens) > len(padding[0]), "a row is padded only when the next conversation does not fit"
    assert targets[:, -1].eq(0).all()
    assert positions[0, : len(train[0].tokens)].tolist() == list(range(len(train[0].tokens)))


def test_two_calls_read_what_one_call_of_twice_the_rows_reads(chatml, source_file, tmp_path):
    mix = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", heldout_fraction=0.1)
    *whole, end = mix.next_rows(Cursor(), rows=6, seq_len=SEQ_LEN)
    *first, middle = mix.next_rows(Cursor(), rows=3, seq_len=SEQ_LEN)
    resumed = Cursor.from_dict(json.loads(json.dumps(middle.to_dict())))
    *second, end_again = mix.next_rows(resumed, rows=3, seq_len=SEQ_LEN)
    for one, a, b in zip(whole, first, second):
        assert torch.equal(one, torch.cat([a, b]))
    assert end.to_dict() == end_again.to_dict()
    starts = mix.sources[0].data.starts.tolist()
    assert middle.offsets["a"] in starts and end.offsets["a"] in starts, "the cursor stops at conversation boundaries"


def test_heldout_is_disjoint_from_everything_training_reads_and_long_ones_are_counted(chatml, source_file, tmp_path):
    mix = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", heldout_fraction=0.25)
    stats = mix.stats(SEQ_LEN)["a"]
    assert stats["dropped"] == len(LONG) and stats["dropped_train"] == len(LONG)  # both long ones are in the first 15
    assert (stats["conversations"], stats["train_conversations"], stats["heldout_conversations"]) == (20, 15, 5)
    trained, cursor = [], Cursor()
    with pytest.raises(DataError, match="chat mix is exhausted after .* training tokens"):
        while True:
            tokens, positions, targets, cursor = mix.next_rows(cursor, rows=1, seq_len=SEQ_LEN)
            trained += [tuple(t) for t, _ in row_conversations(tokens[0], positions[0], targets[0], chatml.pad_id)[0]]
    tokens, positions, targets = mix.heldout_rows(SEQ_LEN, max_rows_per_source=10)
    heldout = [tuple(t) for r in range(len(tokens))
               for t, _ in row_conversations(tokens[r], positions[r], targets[r], chatml.pad_id)[0]]
    encoded = [tuple(e.tokens) for e in reference(chatml, [conversation(i, i in LONG) for i in range(20)])]
    assert trained == [e for i, e in enumerate(encoded[:15]) if i not in LONG]
    assert heldout == encoded[15:]
    assert not set(trained) & set(heldout)


def test_weights_set_the_share_of_rows(chatml, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [conversation(i) for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [conversation(100 + i) for i in range(40)])
    mix = build_chat_mix(chatml, [SourceSpec("a", [a], 3.0), SourceSpec("b", [b], 1.0)], tmp_path / "cache", 0.0)
    _, _, _, cursor = mix.next_rows(Cursor(), rows=8, seq_len=SEQ_LEN)
    assert cursor.rows == {"a": 6, "b": 2}


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"text": "hello"}), 'an object with "messages"'),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}),
     "unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}),
     r"message 0 \(user\): missing content"),
    (json.dumps({"messages": [{"role": "user", "content": "only a question"}]}), "no assistant turn"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(chatml, tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(conversation(0)) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{match}"):
        build_chat_mix(chatml, [SourceSpec("bad", [str(path)])], tmp_path / "cache", 0.1)


def test_rendered_once_and_rebuilt_when_a_file_changes(chatml, source_file, tmp_path):
    first = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", 0.1).sources[0].data
    stamp = first.file.prefix.with_name(first.file.prefix.name + ".bin").stat().st_mtime_ns
    again = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", 0.1).sources[0].data
    assert again.file.prefix == first.file.prefix
    assert again.file.prefix.with_name(again.file.prefix.name + ".bin").stat().st_mtime_ns == stamp
    with open(source_file, "a") as out:
        out.write(json.dumps(conversation(99)) + "\n")
    changed = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", 0.1).sources[0].data
    assert changed.file.prefix != first.file.prefix and len(changed) == 21


def test_builtin_sources_and_the_tekken_format(tmp_path):
    tekken = load_chat_format("tekken")
    mix = build_chat_mix(tekken, [SourceSpec("tools", ["builtin:arithmetic_tools?count=6"])], tmp_path / "cache", 0.2)
    assert len(mix.sources[0].data) == 6
    tokens, positions, targets, _ = mix.next_rows(Cursor(), rows=1, seq_len=1024)
    text = tekken.decode(tokens[0].tolist())
    assert text.startswith("<s>[SYSTEM_PROMPT]") and "[TOOL_CALLS]calculator[ARGS]" in text
    assert targets.sum() > 0 and tokens.max() >= 2**16  # Tekken ids need the uint32 token file


def test_a_heldout_split_with_no_conversation_that_fits_is_a_data_error(chatml, source_file, tmp_path):
    mix = build_chat_mix(chatml, [SourceSpec("a", [source_file])], tmp_path / "cache", heldout_fraction=0.25)
    with pytest.raises(DataError, match="no held-out conversation fits in 4 tokens"):
        mix.heldout_rows(4, max_rows_per_source=1)
