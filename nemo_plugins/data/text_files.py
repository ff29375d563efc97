"""Real text from files and directories on disk (Python docs, stdlib source, user corpora)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path
from typing import Iterator

from nemo_plugins.errors import ConfigError

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
    text = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix != ".jsonl":
        yield str(file), text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}:{number}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{file}:{number}: a jsonl document needs a string field \"text\"")
        yield f"{file}:{number}", record["text"]
