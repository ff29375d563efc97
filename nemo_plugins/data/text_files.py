"""Real text from files and directories on disk (Python docs, stdlib source, user corpora)."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

from nemo_plugins.errors import ConfigError

DEFAULT_SUFFIXES = (".py", ".txt", ".rst", ".md")


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
            text = file.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                found = True
                yield str(file), text
    if not found:
        raise ConfigError(f"no non-empty text files with suffixes {suffixes} under {paths}")
