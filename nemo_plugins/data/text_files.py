"""Real text from files and directories on disk (Python docs, stdlib source, user corpora), whole or in pieces.

A plain text file is one document; a ``.jsonl`` file holds one per line, in its ``"text"`` field. For tokenising
a corpus with many processes, ``split_pieces`` cuts the corpus (files in sorted order, end to end) into contiguous
pieces of about equal bytes: a ``.jsonl`` file may be cut anywhere, a line belonging to the piece its first byte
lies in, so every document is read exactly once and the pieces' documents, in piece order, are exactly
``iter_documents``' (what makes the merged token store the same bytes for any number of pieces).

Bytes that are not UTF-8 become U+FFFD (a corpus with a stray Latin-1 byte is still a corpus), and how many were
replaced is logged per file (per piece of a ``.jsonl``), so a wrongly encoded corpus shows up in the log instead of
silently as noise.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from nemo_plugins.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
DEFAULT_SUFFIXES = (".py", ".txt", ".rst", ".md", ".jsonl")
JSONL = ".jsonl"


def resolve(path: str) -> Path:
    """Expand the ``stdlib:`` prefix (this interpreter's standard library, present on every machine)."""
    if path.startswith("stdlib:"):
        return Path(sysconfig.get_paths()["stdlib"]) / path.removeprefix("stdlib:")
    return Path(path).expanduser()


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of one file: its documents are the lines of a ``.jsonl`` that start in the range,
    or the whole file (``start == 0``) for any other text file."""

    file: Path
    start: int
    end: int


def path_files(raw: str, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[Path]:
    """The text files of one configured path (itself, or the matching files under it), in sorted order."""
    root = resolve(raw)
    if not root.exists():
        raise ConfigError(f"data path {raw!r} ({root}) does not exist")
    return [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)


def iter_documents(paths: list[str], suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> Iterator[tuple[str, str]]:
    """(name, text) for every non-empty document, files in sorted order so runs are reproducible."""
    found = False
    for raw in paths:
        for file in path_files(raw, suffixes):
            for name, text in piece_documents(Piece(file, 0, file.stat().st_size)):
                found = True
                yield name, text
    if not found:
        raise ConfigError(f"no non-empty text files with suffixes {suffixes} under {paths}")


def split_pieces(paths: list[str], parts: int, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[list[Piece]]:
    """The corpus as ``parts`` lists of pieces, contiguous in document order and of about equal bytes (a part may
    be empty when whole files are larger than a part's share)."""
    if parts < 1:
        raise ConfigError(f"parts must be >= 1, got {parts}")
    files = [f for raw in paths for f in path_files(raw, suffixes)]
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    cuts = [total * k // parts for k in range(1, parts)]  # global byte offsets where part k starts
    split: list[list[Piece]] = [[] for _ in range(parts)]
    begin = 0
    for file, size in zip(files, sizes):
        end = begin + size
        part = sum(cut <= begin for cut in cuts)
        if file.suffix != JSONL:
            split[part].append(Piece(file, 0, size))  # one document: it goes where its first byte lies
        else:
            inner = [cut - begin for cut in cuts if begin < cut < end]
            for k, (lo, hi) in enumerate(zip([0, *inner], [*inner, size])):
                split[part + k].append(Piece(file, lo, hi))
        begin = end
    return split


def piece_documents(piece: Piece) -> Iterator[tuple[str, str]]:
    """(name, text) of the non-empty documents of one piece (``file`` or ``file:line`` for ``.jsonl``)."""
    if piece.file.suffix != JSONL:
        text = read_text(piece.file)
        if text.strip():
            yield str(piece.file), text
        return
    replaced = 0
    with open(piece.file, "rb") as lines:
        number = _line_number(lines, piece.start)
        while lines.tell() < piece.end:
            raw = lines.readline()
            if not raw:
                break
            line = raw.decode("utf-8", errors="replace")
            replaced += line.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())
            if line.strip():
                text = _jsonl_text(line, f"{piece.file}:{number}")
                if text.strip():
                    yield f"{piece.file}:{number}", text
            number += 1
    if replaced:
        logger.warning("%s (bytes %d-%d): %d byte sequence(s) that are not UTF-8 replaced by U+FFFD",
                       piece.file, piece.start, piece.end, replaced)


def _line_number(lines, start: int) -> int:
    """Position ``lines`` (binary) at the first line starting at or after byte ``start``; its 1-based number."""
    if start == 0:
        return 1
    lines.seek(start - 1)
    if lines.read(1) != b"\n":
        lines.readline()  # the rest of a line that started in the previous piece
    position, number = lines.tell(), 1
    lines.seek(0)
    while lines.tell() < position:
        number += lines.read(min(1 << 24, position - lines.tell())).count(b"\n")
    return number


def _jsonl_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{where}: a jsonl document needs a string field \"text\"")
    return record["text"]


def read_text(file: Path) -> str:
    """The file decoded as UTF-8; invalid byte sequences become U+FFFD and are counted in a warning."""
    raw = file.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())
    if replaced:
        logger.warning("%s: %d byte sequence(s) that are not UTF-8 replaced by U+FFFD", file, replaced)
    return text
