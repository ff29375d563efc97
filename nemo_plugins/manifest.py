"""Stage manifests: what a stage read, wrote and measured, written atomically (a stage is finished iff its
manifest exists), stamped with the code version that produced it.

A manifest also records the stage's ``fingerprint``: everything that decides its trajectory (model sources, the
data mix, the stage settings, the data cursor it started from). A rerun compares fingerprints key by key, so a
changed setting is named (``stage.optimizer.lr: 0.003 -> 0.001``) instead of being silently ignored or recorded
as if it had been used.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from nemo_plugins.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_ABSENT = "<absent>"


def code_version() -> str:
    """``git describe`` of the checkout (``-dirty`` if modified), else the installed package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"cascade {version('cascade')}"
        except PackageNotFoundError:
            return "unknown"


def write_json_atomic(path: str | Path, values: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(values, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_manifest(stage_dir: str | Path, values: dict) -> Path:
    return write_json_atomic(Path(stage_dir) / MANIFEST, {**values, "code_version": code_version()})


def read_json(path: str | Path) -> Any:
    """The parsed file, or None if there is none; a file that does not parse is a ``DataError`` naming it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err}); the file is damaged (a write cut short?): restore or "
                        "delete it") from None


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The finished stage's manifest, or None while the stage has not finished."""
    return read_json(Path(stage_dir) / MANIFEST)


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict) and values:
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: values}


def changed_keys(recorded: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (recorded, current)}`` for every leaf that differs (JSON-normalised: tuples are lists)."""
    old, new = _flatten(json.loads(json.dumps(recorded))), _flatten(json.loads(json.dumps(current)))
    return {key: (old.get(key, _ABSENT), new.get(key, _ABSENT)) for key in sorted(set(old) | set(new))
            if old.get(key, _ABSENT) != new.get(key, _ABSENT)}


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    """``a.b: 1 -> 2; c: 'x' -> 'y'`` (the first ``limit``, then how many more)."""
    shown = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def finished_stage(stage_dir: str | Path, fingerprint: dict, resume_with_changes: bool = False) -> dict | None:
    """The manifest of a stage finished earlier with this same fingerprint (the stage is skipped), None if it has
    not finished. Other settings are refused, naming the keys; with ``resume_with_changes`` the finished stage is
    kept as it is (its manifest records what it was trained with) and nothing is retrained."""
    done = read_manifest(stage_dir)
    if done is None:
        return None
    changes = changed_keys(done.get("fingerprint", {}), fingerprint)
    if not changes:
        logger.info("%s: finished earlier, skipped", stage_dir)
        return done
    if not resume_with_changes:
        raise ConfigError(f"{stage_dir} was finished with a different stage config than this run's "
                          f"({describe_changes(changes)}); use another output_dir, or delete {stage_dir} (and the "
                          "stages after it) to redo it, or set resume_with_changes=true to keep it as it is")
    logger.warning("%s: finished earlier with other settings (%s); resume_with_changes=true: nothing is retrained, "
                   "its manifest keeps the settings it was trained with", stage_dir, describe_changes(changes))
    return done
