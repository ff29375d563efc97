"""Tokenised corpora as memory-mapped token files with document boundaries, built once and cached.

A token file is three siblings sharing a prefix:
* ``<prefix>.bin``   every document's token ids end to end, each document followed by EOS (uint16 when the
  vocabulary fits, else uint32);
* ``<prefix>.idx``   int64 start offset of every document, plus the total length at the end;
* ``<prefix>.json``  what it was built from (tokenizer, files with sizes and mtimes) and counts.
Writing goes to temporary names renamed into place, so a killed build leaves no half file behind, and a
rebuild happens only when the key (tokenizer + source files) changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from nemo_plugins.data.text_files import iter_documents, resolve
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.manifest import read_json


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_token_file(documents: Iterable[list[int]], prefix: str | Path, vocab_size: int, eos_id: int, metadata: dict) -> "TokenFile":
    """Write documents (lists of ids) as a token file; returns it opened."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    starts = [0]
    tmp_bin, tmp_idx, tmp_json = (prefix.with_name(prefix.name + s + ".partial") for s in (".bin", ".idx", ".json"))
    with open(tmp_bin, "wb") as out:
        for doc in documents:
            if not doc:
                continue
            ids = np.asarray(list(doc) + [eos_id], dtype=np.int64)
            if ids.max() >= vocab_size or ids.min() < 0:
                raise ConfigError(f"token id {int(ids.max())} outside the vocabulary of {vocab_size}: wrong tokenizer for this model")
            out.write(ids.astype(dtype).tobytes())
            starts.append(starts[-1] + len(ids))
    if len(starts) == 1:
        raise DataError(f"no non-empty documents for token file {prefix}")
    np.asarray(starts, dtype=np.int64).tofile(tmp_idx)
    tmp_json.write_text(json.dumps({**metadata, "vocab_size": vocab_size, "eos_id": eos_id, "dtype": dtype.name,
                                    "documents": len(starts) - 1, "tokens": starts[-1]}, indent=2))
    for tmp, suffix in ((tmp_bin, ".bin"), (tmp_idx, ".idx"), (tmp_json, ".json")):
        os.replace(tmp, prefix.with_name(prefix.name + suffix))
    return TokenFile(prefix)


@dataclass
class TokenFile:
    """Read-only memory map of a token file."""

    prefix: Path

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix)
        meta_path, bin_path, idx_path = (self.prefix.with_name(self.prefix.name + s) for s in (".json", ".bin", ".idx"))
        self.metadata = read_json(meta_path)
        if self.metadata is None:
            raise DataError(f"token file {self.prefix} not found (no {meta_path.name})")
        fix = f"delete {self.prefix}.* to rebuild it from the source files"
        missing = [p.name for p in (bin_path, idx_path) if not p.is_file()]
        if missing or not isinstance(self.metadata, dict) or "dtype" not in self.metadata:
            raise DataError(f"token file {self.prefix} is damaged ({', '.join(missing) or meta_path.name} "
                            f"{'missing' if missing else 'has no dtype'}): {fix}")
        self.tokens = np.memmap(bin_path, dtype=self.metadata["dtype"], mode="r") if bin_path.stat().st_size else \
            np.zeros(0, dtype=self.metadata["dtype"])
        self.starts = np.fromfile(idx_path, dtype=np.int64)
        if not len(self.starts) or len(self.tokens) != self.starts[-1]:
            raise DataError(f"token file {self.prefix} is truncated: {len(self.tokens)} tokens, index says "
                            f"{self.starts[-1] if len(self.starts) else 'nothing'}: {fix}")

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, start: int, end: int) -> np.ndarray:
        """Position of each token in ``[start, end)`` inside its document."""
        doc = np.searchsorted(self.starts, np.arange(start, end), side="right") - 1
        return np.arange(start, end) - self.starts[doc]


def source_key(tokenizer_name: str, vocab_size: int, paths: list[str]) -> str:
    """Changes when the tokenizer or any source file (name, size, mtime) changes."""
    h = hashlib.sha256(f"{tokenizer_name}:{vocab_size}".encode())
    for raw in paths:
        root = resolve(raw)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def tokenize_to_file(tokenizer, paths: list[str], cache_dir: str | Path, name: str) -> TokenFile:
    """The cached token file of ``paths`` under ``cache_dir``; built on first use."""
    vocab = len(tokenizer)
    key = source_key(getattr(tokenizer, "name_or_path", type(tokenizer).__name__), vocab, paths)
    prefix = Path(cache_dir) / f"{name}-{key}"
    if prefix.with_name(prefix.name + ".json").is_file():
        return TokenFile(prefix)
    docs = (tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in iter_documents(paths))
    return write_token_file(docs, prefix, vocab, tokenizer.eos_token_id, {"paths": list(paths), "key": key})
