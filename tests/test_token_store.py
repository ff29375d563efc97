"""Token files: exact round trip of documents, per-document positions, caching, clear errors."""

import numpy as np
import pytest

from nemo_plugins.data.text_files import iter_documents
from nemo_plugins.data.token_store import TokenFile, write_token_file
from nemo_plugins.errors import ConfigError, DataError

DOCS = [[5, 6, 7], [8], [9, 10, 11, 12]]


def test_documents_roundtrip_with_eos_and_positions(tmp_path):
    tf = write_token_file(DOCS, tmp_path / "t", vocab_size=100, eos_id=2, metadata={})
    assert tf.tokens.dtype == np.uint16
    assert tf.tokens.tolist() == [5, 6, 7, 2, 8, 2, 9, 10, 11, 12, 2]
    assert tf.starts.tolist() == [0, 4, 6, 11]
    assert tf.positions(2, 9).tolist() == [2, 3, 0, 1, 0, 1, 2]
    assert not list(tmp_path.glob("*.partial"))


def test_large_vocab_uses_uint32(tmp_path):
    tf = write_token_file([[131_000]], tmp_path / "t", vocab_size=131_072, eos_id=2, metadata={})
    assert tf.tokens.dtype == np.uint32 and tf.tokens.tolist() == [131_000, 2]


def test_token_outside_vocab_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="wrong tokenizer"):
        write_token_file([[1, 200]], tmp_path / "t", vocab_size=128, eos_id=2, metadata={})


def test_truncated_file_is_named(tmp_path):
    write_token_file(DOCS, tmp_path / "t", vocab_size=100, eos_id=2, metadata={})
    data = (tmp_path / "t.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-4])
    with pytest.raises(DataError, match="truncated"):
        TokenFile(tmp_path / "t")


def test_jsonl_files_hold_one_document_per_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc", "id": 2}\n')
    assert [text for _, text in iter_documents([str(tmp_path)])] == ["first doc", "second doc"]
    (tmp_path / "corpus.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: .*\"text\""):
        list(iter_documents([str(tmp_path)]))
