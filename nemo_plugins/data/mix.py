"""A weighted mix of token files read in ONE pass by a cursor that travels from stage to stage.

The cursor records how many tokens each source has handed out. Which source supplies the next row
depends only on the cursor (smooth weighted round robin: the source furthest behind its share goes next),
so a run resumed from a saved cursor reads exactly what an uninterrupted run would have, and the next stage
(or child) continues where the previous one stopped: no token is read twice. The last ``heldout_fraction``
of every source is never handed out for training; it is the evaluation split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nemo_plugins.data.token_store import TokenFile, tokenize_to_file
from nemo_plugins.errors import ConfigError, typed


@dataclass
class Cursor:
    """Tokens consumed per source (training split) and rows handed out; JSON-serialisable."""

    offsets: dict[str, int] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"offsets": dict(self.offsets), "rows": dict(self.rows)}

    @classmethod
    def from_dict(cls, values: dict) -> "Cursor":
        return cls(dict(values.get("offsets", {})), dict(values.get("rows", {})))

    def tokens(self) -> int:
        return sum(self.offsets.values())


@dataclass(frozen=True)
class MixSource:
    name: str
    file: TokenFile
    weight: float


@dataclass(frozen=True)
class SourceSpec:
    """One corpus of the mix: files / directories / jsonl (``stdlib:`` = this Python's standard library)."""

    name: str
    paths: list[str]
    weight: float = 1.0


def source_specs(node) -> list[SourceSpec]:
    """The ``sources`` list of a data config (``data.sources`` / ``chat_data.sources``), typed."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(node, resolve=True) if not isinstance(node, list) else node
    return [typed(SourceSpec, s, f"data.sources[{i}]") for i, s in enumerate(values)]


def cursor_from_manifest(path: str | None) -> Cursor:
    """The data cursor a previous stage ended at (its manifest's ``cursor_end``); the data's start if none."""
    if not path:
        return Cursor()
    manifest = Path(path)
    if not manifest.is_file():
        raise ConfigError(f"cursor={path}: no such manifest (a finished stage writes <output_dir>/manifest.json)")
    return Cursor.from_dict(json.loads(manifest.read_text())["cursor_end"])


def build_mix(tokenizer, sources: list[SourceSpec], cache_dir: str, heldout_fraction: float) -> "DataMix":
    """Tokenise every source once into a cached token file and mix them."""
    if not sources:
        raise ConfigError("data.sources is empty")
    return DataMix([MixSource(s.name, tokenize_to_file(tokenizer, list(s.paths), cache_dir, s.name), s.weight)
                    for s in sources], heldout_fraction)


def check_sources(weights: dict[str, float], heldout_fraction: float, count: int) -> None:
    """A mix needs sources with unique names and positive weights, and a held-out fraction in [0, 1)."""
    if not count:
        raise ConfigError("the data mix has no sources")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if len(weights) != count:
        raise ConfigError(f"data source names must be unique, got {count} sources named {sorted(weights)}")
    for name, weight in weights.items():
        if weight <= 0:
            raise ConfigError(f"data source {name!r} has weight {weight}; weights must be > 0")


def round_robin_order(cursor: Cursor, name: str, weight: float) -> tuple[float, str]:
    """Smooth weighted round robin: the source furthest behind its share of rows goes next (ties by name)."""
    return (cursor.rows.get(name, 0) + 1) / weight, name


class DataMix:
    def __init__(self, sources: list[MixSource], heldout_fraction: float = 0.02) -> None:
        check_sources({s.name: s.weight for s in sources}, heldout_fraction, len(sources))
        self.sources = sources
        self.train_end = {s.name: int(len(s.file) * (1.0 - heldout_fraction)) for s in sources}

    def _pick(self, cursor: Cursor, seq_len: int) -> MixSource:
        open_sources = [s for s in self.sources if cursor.offsets.get(s.name, 0) + seq_len <= self.train_end[s.name]]
        if not open_sources:
            raise ConfigError(
                f"the data mix is exhausted after {cursor.tokens()} training tokens (single pass, no repetition): "
                "add data or lower the stage's token budget"
            )
        return min(open_sources, key=lambda s: round_robin_order(cursor, s.name, s.weight))

    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor, Cursor]:
        """``rows`` training rows of ``seq_len`` tokens with per-document positions, and the advanced cursor."""
        cursor = Cursor.from_dict(cursor.to_dict())
        tokens = np.empty((rows, seq_len), dtype=np.int64)
        positions = np.empty((rows, seq_len), dtype=np.int64)
        for r in range(rows):
            source = self._pick(cursor, seq_len)
            start = cursor.offsets.get(source.name, 0)
            tokens[r], positions[r] = _row(source.file, start, seq_len)
            cursor.offsets[source.name] = start + seq_len
            cursor.rows[source.name] = cursor.rows.get(source.name, 0) + 1
        return torch.from_numpy(tokens), torch.from_numpy(positions), cursor

    def heldout_rows(self, seq_len: int, max_rows_per_source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation rows from the held-out tail of every source (never part of training)."""
        rows = []
        for s in self.sources:
            start = self.train_end[s.name]
            for i in range(max_rows_per_source):
                begin = start + i * seq_len
                if begin + seq_len > len(s.file):
                    break
                rows.append(_row(s.file, begin, seq_len))
        if not rows:
            raise ConfigError(f"held-out split holds fewer than {seq_len} tokens per source: raise data.heldout_fraction")
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def _row(file: TokenFile, start: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions of one row; a document cut at the row start restarts at position 0."""
    positions = file.positions(start, start + seq_len)
    first_doc = np.cumsum(positions == 0) == 0
    positions = np.where(first_doc, positions - positions[0], positions)
    return np.asarray(file.tokens[start : start + seq_len], dtype=np.int64), positions
