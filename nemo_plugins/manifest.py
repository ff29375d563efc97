"""Stage manifests: what a stage read, wrote and measured, written atomically (a stage is finished iff its
manifest exists), stamped with the code version that produced it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

MANIFEST = "manifest.json"


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


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def read_manifest(stage_dir: str | Path) -> dict | None:
    """The finished stage's manifest, or None while the stage has not finished."""
    return read_json(Path(stage_dir) / MANIFEST)
