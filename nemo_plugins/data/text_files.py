"""Real text from files and directories on disk (Python docs, stdlib source, user corpora).

Bytes that are not UTF-8 become U+FFFD (a corpus with a stray Latin-1 byte is still a corpus), and how many were
replaced is logged per file, so a wrongly encoded corpus shows up in the log instead of silently as noise.
"""

from __future__ import annotations

import json
import logging
import sysconfig
from pathlib import Path
from typing import Iterator

from nemo_plugins.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
DEFAULT_SUFFIXES = (".py", ".txt", ".rst", ".md", ".jsonl")


def resolve(path: str) -> Path:
    """Expand the ``stdlib:`` prefix (this interpreter's standard library, present on every machine)."""
    if path.startswith("stdlib:"):
        return Path(sysconfig.get_paths()["stdlib"]) / path.removeprefix("stdlib:")
    return Path(path).expanduser()


def iter_documents(paths: list[str], suffixes: tuple[str, ...] = DEFAULT_SUFFIXES) -> Iterator[tuple[str, str]]:
    """(path, text) for every matching file, in sorted order so runs are reproducible."""
    found = False
    for raw in paths:
        root = resolve(raw)
        if not root.exists():
            raise ConfigError(f"data path {raw!r} ({root}) does not exist")
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
        for file in files:
            for name, text in _file_documents(file):
                if text.strip():
                    found = True
                    yield name, text
    if not found:
        raise ConfigError(f"no non-empty text files with suffixes {suffixes} under {paths}")


def _file_documents(file: Path) -> Iterator[tuple[str, str]]:
    """A text file is one document; a ``.jsonl`` file holds one per line, in its ``"text"`` field."""
    text = read_text(file)
    if file.suffix != ".jsonl":
        yield str(file), text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{file}:{number}: a jsonl document needs a string field \"text\"")
        yield f"{file}:{number}", record["text"]


def read_text(file: Path) -> str:
    """The file decoded as UTF-8; invalid byte sequences become U+FFFD and are counted in a warning."""
    raw = file.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())
    if replaced:
        logger.warning("%s: %d byte sequence(s) that are not UTF-8 replaced by U+FFFD", file, replaced)
    return text
