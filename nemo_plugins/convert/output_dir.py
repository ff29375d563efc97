"""Directories the project writes (Hugging Face exports, megatron checkpoints) carry a record that marks them as
ours and lists every file's size and sha256.

Why: a conversion pointed at an existing folder used to delete it, with the checkpoint it was converting inside.
Now an existing path is replaced only if its record says it is an earlier output of the same kind and the caller
asked for that (``overwrite``); anything else is refused in one line and left untouched. The new directory is
written beside the old one and swapped in by two renames, so a failure while writing leaves the old one intact.

The sizes and checksums let a resume tell an intact checkpoint from a damaged one. sha256 runs at ~2 GB/s per core
(SHA-NI); the writers split the files over the ranks (``megatron_checkpoint``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from nemo_plugins.errors import CheckpointError, ConfigError

RECORD = ".cascade-output.json"
KINDS = {"hf": "Hugging Face export", "megatron": "megatron checkpoint"}


def _record_kind(path: Path) -> str | None:
    """The kind an existing record names, or None when there is no readable record."""
    try:
        return json.loads((path / RECORD).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def claim(out_dir: str | Path, kind: str, overwrite: bool) -> None:
    """Refuse ``out_dir`` unless it is absent, an empty directory, or (with ``overwrite``) an earlier ``kind``
    output of this project; a refusal touches nothing. Every rank may call it: it only reads."""
    out_dir = Path(out_dir)
    if not os.path.lexists(out_dir):
        return
    real_dir = out_dir.is_dir() and not out_dir.is_symlink()  # a link or a file was never written by us
    if real_dir and not any(out_dir.iterdir()):
        return
    found = _record_kind(out_dir) if real_dir else None
    if found is None:
        raise ConfigError(f"{out_dir} exists and is not a {KINDS[kind]} written by this project (no {RECORD}): "
                          "nothing was written; choose a new or empty directory")
    if found != kind:
        raise ConfigError(f"{out_dir} holds a {KINDS.get(found, found)}, not a {KINDS[kind]}: nothing was written; "
                          "choose another directory")
    if not overwrite:
        raise ConfigError(f"{out_dir} holds an earlier {KINDS[kind]}: nothing was written; "
                          "pass --overwrite to replace it, or choose another directory")


def temp_sibling(out_dir: Path) -> Path:
    """A fresh hidden directory beside ``out_dir`` (same filesystem, so the final rename is atomic)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))


def listed_files(root: str | Path) -> list[str]:
    """Every file under ``root`` (relative, '/'-separated, sorted), the record itself excluded."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != RECORD)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digests(root: str | Path, names: list[str]) -> dict[str, dict]:
    """``{name: {"bytes", "sha256"}}`` for files under ``root``."""
    root = Path(root)
    return {name: {"bytes": (root / name).stat().st_size, "sha256": _sha256(root / name)} for name in names}


def write_record(root: str | Path, kind: str, files: dict[str, dict]) -> None:
    """Written last, inside the temp directory: a directory with a valid record was written completely."""
    (Path(root) / RECORD).write_text(json.dumps({"kind": kind, "files": files}, indent=1, sort_keys=True) + "\n")


def read_record(root: str | Path, kind: str) -> dict[str, dict]:
    """The files the record of ``root`` lists; a missing, unparsable or other-kind record is a CheckpointError."""
    path = Path(root) / RECORD
    try:
        record = json.loads(path.read_text())
        files = record["files"]
        if record["kind"] != kind or not isinstance(files, dict):
            raise ValueError(f"not a {KINDS[kind]} record")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: written by an older version, or not completely") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    return files


def mismatches(root: str | Path, files: dict[str, dict], names: list[str], checksums: bool = True) -> dict[str, str]:
    """``{name: what is wrong}`` for the ``names`` (of ``files``) that are missing or differ from the record;
    without ``checksums`` only the sizes are compared (a stat per file: cheap enough before every load)."""
    root = Path(root)
    found: dict[str, str] = {}
    for name in names:
        path, want = root / name, files[name]
        if not path.is_file():
            found[name] = f"{path} is missing"
        elif path.stat().st_size != want["bytes"]:
            found[name] = f"{path} has {path.stat().st_size} bytes, {want['bytes']} when saved"
        elif checksums and _sha256(path) != want["sha256"]:
            found[name] = f"{path} differs from its checksum recorded when saved"
    return found


def replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an earlier output there (``claim`` allowed it) is renamed aside
    first and deleted only once the new one is in place."""
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".replaced", dir=out_dir.parent))
        os.replace(out_dir, old)  # onto the empty directory just made
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)
