"""Real text from files and directories on disk (Python docs, stdlib source, user corpora), whole or in pieces.

A plain text file is one document; a ``.jsonl`` file holds one per line, in its ``"text"`` field. For tokenising
a corpus with many processes, ``split_pieces`` cuts the corpus (files in sorted order, end to end) into contiguous
pieces of about equal bytes: a ``.jsonl`` file may be cut anywhere, a line belonging to the piece its first byte
lies in, so every document is read exactly once and the pieces' documents, in piece order, are exactly
``iter_documents``' (what makes the merged token store the same bytes for any number of pieces).

Two path forms bring English prose that every machine with Python has: ``pydoc:topics`` is the reference manual's
topic texts shipped in the standard library (``pydoc_data/topics.py``, one document per topic, read as data with
``ast``, never imported), and ``dir/*`` takes every file in a directory whatever its suffix (Debian's
``/usr/share/common-licenses/*``, whose files have none; links to a file already taken are skipped). A ``dir/*``
whose directory is absent is logged and skipped: an optional corpus, not a broken config.

Bytes that are not UTF-8 become U+FFFD (a corpus with a stray Latin-1 byte is still a corpus), and how many were
replaced is logged per file (per piece of a ``.jsonl``), so a wrongly encoded corpus shows up in the log instead of
silently as noise.
"""

from __future__ import annotations

import ast
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
PYDOC_TOPICS = "pydoc:topics"
ANY_SUFFIX = "/*"


def resolve(path: str) -> Path:
    """Expand the ``stdlib:`` prefix (this interpreter's standard library, present on every machine), ``pydoc:topics``
    (its topic-text module) and a trailing ``/*`` (the directory itself)."""
    if path == PYDOC_TOPICS:
        return Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    if path.startswith("stdlib:"):
        return Path(sysconfig.get_paths()["stdlib"]) / path.removeprefix("stdlib:")
    return Path(path.removesuffix(ANY_SUFFIX)).expanduser()


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of one file: its documents are the lines of a ``.jsonl`` that start in the range,
    or the whole file (``start == 0``) for any other text file."""

    file: Path
    start: int
    end: int
    topics: bool = False  # pydoc's topic table: one document per topic


def path_files(raw: str, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[Path]:
    """The text files of one configured path (itself, or the matching files under it), in sorted order."""
    root = resolve(raw)
    if raw.endswith(ANY_SUFFIX) and not root.is_dir():
        logger.warning("data path %r: no directory %s here, skipped", raw, root)
        return []
    if not root.exists():
        raise DataError(f"data path {raw!r} ({root}) does not exist: check data.sources' paths")
    if root.is_file():
        return [root]
    if not raw.endswith(ANY_SUFFIX):
        return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
    files, seen = [], set()
    for p in sorted(p for p in root.rglob("*") if p.is_file()):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            files.append(p)
    return files


def file_pieces(raw: str, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[Piece]:
    """One whole-file piece per file of a configured path."""
    return [Piece(f, 0, f.stat().st_size, raw == PYDOC_TOPICS) for f in path_files(raw, suffixes)]


def iter_documents(paths: list[str], suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> Iterator[tuple[str, str]]:
    """(name, text) for every non-empty document, files in sorted order so runs are reproducible."""
    found = False
    for raw in paths:
        for piece in file_pieces(raw, suffixes):
            for name, text in piece_documents(piece):
                found = True
                yield name, text
    if not found:
        raise DataError(f"no non-empty text files with suffixes {suffixes} under {paths}: check data.sources' paths")


def split_pieces(paths: list[str], parts: int, suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> list[list[Piece]]:
    """The corpus as ``parts`` lists of pieces, contiguous in document order and of about equal bytes (a part may
    be empty when whole files are larger than a part's share)."""
    if parts < 1:
        raise ConfigError(f"parts must be >= 1, got {parts}")
    whole = [piece for raw in paths for piece in file_pieces(raw, suffixes)]
    total = sum(piece.end for piece in whole)
    cuts = [total * k // parts for k in range(1, parts)]  # global byte offsets where part k starts
    split: list[list[Piece]] = [[] for _ in range(parts)]
    begin = 0
    for piece in whole:
        end = begin + piece.end
        part = sum(cut <= begin for cut in cuts)
        if piece.file.suffix != JSONL:
            split[part].append(piece)  # whole-file documents: they go where the file's first byte lies
        else:
            inner = [cut - begin for cut in cuts if begin < cut < end]
            for k, (lo, hi) in enumerate(zip([0, *inner], [*inner, piece.end])):
                split[part + k].append(Piece(piece.file, lo, hi))
        begin = end
    return split


def piece_documents(piece: Piece) -> Iterator[tuple[str, str]]:
    """(name, text) of the non-empty documents of one piece (``file``, ``file:line`` for ``.jsonl``, ``file:topic``
    for pydoc's topics)."""
    if piece.topics:
        for topic, text in pydoc_topics(piece.file).items():
            if text.strip():
                yield f"{piece.file}:{topic}", text
        return
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


def pydoc_topics(file: Path) -> dict[str, str]:
    """The ``topics`` dict of a ``pydoc_data/topics.py`` (topic -> reference-manual text), read without importing."""
    for node in ast.parse(read_text(file)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            if isinstance(topics, dict) and all(isinstance(v, str) for v in topics.values()):
                return topics
    raise DataError(f"{file}: no `topics = {{name: text}}` dict (is it pydoc_data/topics.py?)")


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
