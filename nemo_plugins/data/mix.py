"""A weighted mix of token files read in ONE pass by a cursor that travels from stage to stage.

The cursor records how many tokens each source has handed out. Which source supplies the next row
depends only on the cursor (smooth weighted round robin: the source furthest behind its share goes next),
so a run resumed from a saved cursor reads exactly what an uninterrupted run would have, and the next stage
(or child) continues where the previous one stopped: no token is read twice. The last ``heldout_fraction``
of every source is never handed out for training; it is the evaluation split.

A cursor belongs to the mix that wrote it: a stage's manifest records the mix's ``identity`` (sources, weights,
the token files' keys), and a cursor from another mix is refused (its offsets would re-read, or skip, data).
Because every row is ``seq_len`` tokens of one source and the round robin only ever skips exhausted sources, the
rows a mix can still supply are known exactly without reading it (``rows_left``), so a stage checks its budget
before the first step.

Sources of ``kind: interleaved`` (image-text JSONL, ``interleaved.py``) are token files like the others plus an image
index; a mix holding one hands out each row's images (``RowImage``) and a target mask without image-token targets
beside the tokens. Their held-out tail is reserved like any source's; the held-out evaluation (``distill/heldout.py``)
reads it one source at a time, with its images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nemo_plugins.data.interleaved import ImageIndex, ImageInputs, interleaved_file, text_target_mask
from nemo_plugins.data.token_store import TokenFile, tokenize_to_file
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.manifest import changed_keys, describe_changes, read_json


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


SOURCE_KINDS = ("text", "interleaved")


@dataclass(frozen=True)
class MixSource:
    name: str
    file: TokenFile
    weight: float
    images: ImageIndex | None = None  # an interleaved source's images


@dataclass
class SourceSpec:
    """One corpus of the mix: files / directories / jsonl (``stdlib:`` = this Python's standard library);
    ``kind: interleaved`` for image-text JSONL (``data/interleaved.py``)."""

    name: str
    paths: list[str]
    weight: float = 1.0
    kind: str = "text"

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError(f"data source {self.name!r}: kind={self.kind!r} must be one of {SOURCE_KINDS}")


def cursor_from_manifest(path: str | None, identity: dict, key: str = "cursor") -> Cursor:
    """The data cursor a previous stage ended at (its manifest's ``cursor_end``); the data's start if none. The
    manifest must come from a stage that read this same mix (``identity``): offsets are only meaningful there."""
    if not path:
        return Cursor()
    manifest = read_json(path)
    if manifest is None:
        raise ConfigError(f"{key}={path}: no such manifest (a finished stage writes <output_dir>/manifest.json)")
    if "cursor_end" not in manifest:
        raise ConfigError(f"{key}={path} is not a training stage's manifest (no cursor_end)")
    recorded = manifest.get("fingerprint", {}).get("data")
    if recorded != identity:
        found = describe_changes(changed_keys(recorded or {}, identity)) if recorded else "it records no data mix"
        raise DataError(f"{key}={path} was written for another data mix ({found}): "
                        "a cursor continues only the mix that wrote it; "
                        f"use that stage's data settings, or leave {key} unset to start at the beginning")
    return Cursor.from_dict(manifest["cursor_end"])


def check_data_budget(data, cursor: Cursor, rows: int, seq_len: int, budget_key: str) -> None:
    """Before the first step: ``data`` (a ``DataMix`` or ``ChatMix``) can supply ``rows`` training rows of
    ``seq_len`` from ``cursor``, or the stage is refused now rather than when the data runs out."""
    left = data.rows_left(cursor, seq_len, rows)
    if left < rows:
        raise DataError(f"the data holds {left} more training rows of {seq_len} tokens after the {cursor.tokens()} "
                        f"tokens already read, but the stage needs {rows} (single pass, no repetition): add data or "
                        f"lower {budget_key}")


def build_mix(tokenizer, sources: list[SourceSpec], cache_dir: str, heldout_fraction: float,
              prebuilt_by: str | None = None, images: ImageInputs | None = None) -> "DataMix":
    """Tokenise every source once into a cached token file (rank 0 builds, the other ranks wait) and mix them.
    ``prebuilt_by``: the command that builds the token files offline (``python -m recipes.tokenize ...``); when
    given, a missing file is a ``DataError`` naming it instead of a build inside the job. ``images``: the model's
    image settings, needed by interleaved sources."""
    if not sources:
        raise ConfigError("data.sources is empty")
    mixed = []
    for s in sources:
        if s.kind == "interleaved":
            file, index = interleaved_file(tokenizer, list(s.paths), cache_dir, s.name, images, prebuilt_by)
            mixed.append(MixSource(s.name, file, s.weight, index))
        else:
            mixed.append(MixSource(s.name, tokenize_to_file(tokenizer, list(s.paths), cache_dir, s.name, prebuilt_by),
                                   s.weight))
    return DataMix(mixed, heldout_fraction, images)


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
    def __init__(self, sources: list[MixSource], heldout_fraction: float = 0.02,
                 images: ImageInputs | None = None) -> None:
        check_sources({s.name: s.weight for s in sources}, heldout_fraction, len(sources))
        self.sources = sources
        self.images = images if any(s.images is not None for s in sources) else None
        self.heldout_fraction = heldout_fraction
        self.train_end = {s.name: int(len(s.file) * (1.0 - heldout_fraction)) for s in sources}

    def _pick(self, cursor: Cursor, seq_len: int) -> MixSource:
        open_sources = [s for s in self.sources if cursor.offsets.get(s.name, 0) + seq_len <= self.train_end[s.name]]
        if not open_sources:
            raise DataError(
                f"the data mix is exhausted after {cursor.tokens()} training tokens (single pass, no repetition): "
                "add data or lower the stage's token budget"
            )
        return min(open_sources, key=lambda s: round_robin_order(cursor, s.name, s.weight))

    def identity(self) -> dict:
        """What a cursor's offsets refer to: per source its weight, token count and token-file key."""
        return {"kind": "text", "heldout_fraction": self.heldout_fraction,
                "sources": {s.name: {"weight": s.weight, "tokens": len(s.file), "key": s.file.metadata.get("key"),
                                     **({"images": len(s.images)} if s.images is not None else {})}
                            for s in self.sources}}

    def rows_left(self, cursor: Cursor, seq_len: int, limit: int | None = None) -> int:
        """Training rows of ``seq_len`` still available from ``cursor`` (exact: each source gives whole rows until
        its training split is used up, and the round robin only skips used-up sources). The count is cheap here;
        ``limit`` (where counting may stop) matters for ``ChatMix``, which counts by packing conversations."""
        return sum(max(0, self.train_end[s.name] - cursor.offsets.get(s.name, 0)) // seq_len for s in self.sources)

    def train_tokens_left(self, cursor: Cursor) -> int:
        """Training-split tokens not yet read: an upper bound of what stages of any row length can still read."""
        return sum(max(0, self.train_end[s.name] - cursor.offsets.get(s.name, 0)) for s in self.sources)

    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple:
        """``rows`` training rows of ``seq_len`` tokens with per-document positions, and the advanced cursor; a mix
        with images also gives, before the cursor, the text-target mask and each row's ``RowImage`` list."""
        cursor = Cursor.from_dict(cursor.to_dict())
        tokens = np.empty((rows, seq_len), dtype=np.int64)
        positions = np.empty((rows, seq_len), dtype=np.int64)
        row_images = []
        for r in range(rows):
            source = self._pick(cursor, seq_len)
            start = cursor.offsets.get(source.name, 0)
            tokens[r], positions[r] = _row(source.file, start, seq_len)
            row_images.append(source.images.row_images(start, start + seq_len) if source.images is not None else [])
            cursor.offsets[source.name] = start + seq_len
            cursor.rows[source.name] = cursor.rows.get(source.name, 0) + 1
        tokens_t, positions_t = torch.from_numpy(tokens), torch.from_numpy(positions)
        if self.images is None:
            return tokens_t, positions_t, cursor
        return tokens_t, positions_t, text_target_mask(tokens_t, self.images.vision), row_images, cursor

    def heldout_rows(self, seq_len: int, max_rows_per_source: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Evaluation rows from the held-out tail of every source (never part of training)."""
        rows = []
        for s in self.sources:
            if s.images is not None:  # read with its images by distill/heldout.heldout_set_with_images
                continue
            start = self.train_end[s.name]
            for i in range(max_rows_per_source):
                begin = start + i * seq_len
                if begin + seq_len > len(s.file):
                    break
                rows.append(_row(s.file, begin, seq_len))
        if not rows:
            raise DataError(f"held-out split holds fewer than {seq_len} tokens per source: raise data.heldout_fraction")
        return torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows]))


def _row(file: TokenFile, start: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and positions of one row; a document cut at the row start restarts at position 0."""
    positions = file.positions(start, start + seq_len)
    first_doc = np.cumsum(positions == 0) == 0
    positions = np.where(first_doc, positions - positions[0], positions)
    return np.asarray(file.tokens[start : start + seq_len], dtype=np.int64), positions
