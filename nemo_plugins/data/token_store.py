"""Tokenised corpora as memory-mapped token files with document boundaries, built once and cached.

A token file is three siblings sharing a prefix:
* ``<prefix>.bin``   every document's token ids end to end, each document followed by EOS (uint16 when the
  vocabulary fits, else uint32);
* ``<prefix>.idx``   int64 start offset of every document, plus the total length at the end;
* ``<prefix>.json``  what it was built from (paths, key of tokenizer + source files) and counts.
Files are written under temporary names and renamed into place, ``.json`` last (it marks the file complete), so a
killed build leaves no half file behind; a rebuild happens only when the key (tokenizer + source files) changes.

Building scales out: the corpus is split into ``parts`` pieces of about equal bytes (``text_files.split_pieces``),
each tokenised by a worker process into a part file (``<prefix>.part-00003-of-00008.*``), and the parts are
concatenated in order. The documents and their order do not depend on the split, so the store is the same bytes
for any number of parts or workers, built by one process pool or by the tasks of a Slurm array
(``recipes/tokenize.py``). Inside a training job only rank 0 builds a missing entry while the others wait
(``built_once``); a cluster preset can instead require the store to exist (``prebuilt_by``: the command to run).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from nemo_plugins.data.text_files import Piece, piece_documents, resolve, split_pieces
from nemo_plugins.errors import ConfigError, DataError, ProjectError
from nemo_plugins.manifest import read_json

logger = logging.getLogger(__name__)

SUFFIXES = (".bin", ".idx", ".json")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def sibling(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def _describe(metadata: dict, vocab_size: int, eos_id: int, documents: int, tokens: int) -> str:
    return json.dumps({**metadata, "vocab_size": vocab_size, "eos_id": eos_id, "dtype": token_dtype(vocab_size).name,
                       "documents": documents, "tokens": tokens}, indent=2)


def _publish(partial: dict[str, Path], prefix: Path, write: Callable[[], None]) -> None:
    """``write`` the files under their temporary names, then rename them into place, ``.json`` last; a failed
    write leaves nothing behind."""
    try:
        write()
        for suffix in SUFFIXES:
            os.replace(partial[suffix], sibling(prefix, suffix))
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)


def _partial_names(prefix: Path) -> dict[str, Path]:
    """Temporary names private to this process (two writers never rename each other's files)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return {s: prefix.with_name(f".{prefix.name}{s}.{os.getpid()}.partial") for s in SUFFIXES}


def _write(documents: Iterable[list[int]], prefix: Path, vocab_size: int, eos_id: int, metadata: dict,
           allow_empty: bool) -> None:
    dtype = token_dtype(vocab_size)
    partial = _partial_names(prefix)

    def write() -> None:
        starts = [0]
        with open(partial[".bin"], "wb") as out:
            for doc in documents:
                if not doc:
                    continue
                ids = np.asarray(list(doc) + [eos_id], dtype=np.int64)
                if ids.max() >= vocab_size or ids.min() < 0:
                    raise ConfigError(f"token id {int(ids.max())} outside the vocabulary of {vocab_size}: "
                                      "wrong tokenizer for this model")
                out.write(ids.astype(dtype).tobytes())
                starts.append(starts[-1] + len(ids))
        if len(starts) == 1 and not allow_empty:
            raise DataError(f"no non-empty documents for token file {prefix}")
        np.asarray(starts, dtype=np.int64).tofile(partial[".idx"])
        partial[".json"].write_text(_describe(metadata, vocab_size, eos_id, len(starts) - 1, starts[-1]))

    _publish(partial, prefix, write)


def write_token_file(documents: Iterable[list[int]], prefix: str | Path, vocab_size: int, eos_id: int,
                     metadata: dict) -> "TokenFile":
    """Write documents (lists of ids) as a token file; returns it opened."""
    _write(documents, Path(prefix), vocab_size, eos_id, metadata, allow_empty=False)
    return TokenFile(prefix)


@dataclass
class TokenFile:
    """Read-only memory map of a token file."""

    prefix: Path

    def __post_init__(self) -> None:
        self.prefix = Path(self.prefix)
        bin_path, idx_path, meta_path = (sibling(self.prefix, s) for s in SUFFIXES)
        self.metadata = read_json(meta_path)
        if self.metadata is None:
            raise DataError(f"token file {self.prefix} not found (no {meta_path.name})")
        fix = f"delete {self.prefix}.* to rebuild it from the source files"
        missing = [p.name for p in (bin_path, idx_path) if not p.is_file()]
        if missing or not isinstance(self.metadata, dict) or "dtype" not in self.metadata:
            raise DataError(f"token file {self.prefix} is damaged ({', '.join(missing) or meta_path.name} "
                            f"{'missing' if missing else 'has no dtype'}): {fix}")
        self.tokens = np.memmap(bin_path, dtype=self.metadata["dtype"], mode="r") if bin_path.stat().st_size else \
            np.zeros(0, dtype=self.metadata["dtype"])
        self.starts = np.fromfile(idx_path, dtype=np.int64)
        if not len(self.starts) or len(self.tokens) != self.starts[-1]:
            raise DataError(f"token file {self.prefix} is truncated: {len(self.tokens)} tokens, index says "
                            f"{self.starts[-1] if len(self.starts) else 'nothing'}: {fix}")

    def __len__(self) -> int:
        return len(self.tokens)

    def positions(self, start: int, end: int) -> np.ndarray:
        """Position of each token in ``[start, end)`` inside its document."""
        doc = np.searchsorted(self.starts, np.arange(start, end), side="right") - 1
        return np.arange(start, end) - self.starts[doc]


def source_key(tokenizer_name: str, vocab_size: int, paths: list[str]) -> str:
    """Changes when the tokenizer or any source file (name, size, mtime) changes."""
    h = hashlib.sha256(f"{tokenizer_name}:{vocab_size}".encode())
    for raw in paths:
        root = resolve(raw)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            st = f.stat()
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def store_prefix(tokenizer, paths: list[str], cache_dir: str | Path, name: str) -> tuple[Path, str]:
    """Where the token file of ``paths`` lives under ``cache_dir``, and its key."""
    key = source_key(getattr(tokenizer, "name_or_path", type(tokenizer).__name__), len(tokenizer), paths)
    return Path(cache_dir) / f"{name}-{key}", key


def is_built(prefix: Path) -> bool:
    return sibling(prefix, ".json").is_file()


def part_prefix(prefix: Path, part: int, parts: int) -> Path:
    return prefix.with_name(f"{prefix.name}.part-{part:05d}-of-{parts:05d}")


def tokenize_part(tokenizer, pieces: list[Piece], prefix: Path, metadata: dict) -> tuple[int, float]:
    """Tokenise the documents of ``pieces`` into the part file ``prefix`` (run in a worker process); returns its
    tokens and the seconds it took (reading + tokenising + writing)."""
    start = time.perf_counter()
    documents = (tokenizer(text, add_special_tokens=False)["input_ids"] for piece in pieces
                 for _, text in piece_documents(piece))
    _write(documents, prefix, len(tokenizer), tokenizer.eos_token_id, metadata, allow_empty=True)
    return int(read_json(sibling(prefix, ".json"))["tokens"]), time.perf_counter() - start


def merge_parts(prefix: Path, parts: int, metadata: dict) -> "TokenFile":
    """Concatenate the part files, in order, into the token file ``prefix``; the parts are removed after."""
    files = [TokenFile(part_prefix(prefix, i, parts)) for i in range(parts)]
    for i, file in enumerate(files):
        if file.metadata.get("key") != metadata["key"] or file.metadata.get("part") != [i, parts]:
            raise DataError(f"part file {file.prefix} belongs to another build (key {file.metadata.get('key')}, "
                            f"part {file.metadata.get('part')}): delete it and rerun")
    vocab_size, eos_id = files[0].metadata["vocab_size"], files[0].metadata["eos_id"]
    offsets = np.cumsum([0] + [len(f) for f in files])
    starts = np.concatenate([f.starts[:-1] + offset for f, offset in zip(files, offsets)] + [offsets[-1:]])
    if len(starts) == 1:
        raise DataError(f"no non-empty documents for token file {prefix} (paths {metadata.get('paths')})")
    partial = _partial_names(prefix)

    def write() -> None:
        if parts == 1:  # a second name for the one part (no copy); the part stays intact until the end
            _link_or_copy(sibling(files[0].prefix, ".bin"), partial[".bin"])
        else:
            with open(partial[".bin"], "wb") as out:
                for file in files:
                    with open(sibling(file.prefix, ".bin"), "rb") as part:
                        shutil.copyfileobj(part, out, 1 << 24)
        starts.astype(np.int64).tofile(partial[".idx"])
        partial[".json"].write_text(_describe(metadata, vocab_size, eos_id, len(starts) - 1, int(starts[-1])))

    _publish(partial, prefix, write)
    for file in files:
        for suffix in SUFFIXES:
            sibling(file.prefix, suffix).unlink(missing_ok=True)
    return TokenFile(prefix)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(source, target)


@dataclass(frozen=True)
class BuildOptions:
    """How an offline build divides the work: ``parts`` (default: ``workers``) decides the part files, ``workers``
    how many processes tokenise them here, ``shard="i/n"`` that this process tokenises only the parts with
    ``part % n == i`` and merges nothing (one task of a Slurm array). None of it changes the merged bytes."""

    workers: int = 1
    parts: int | None = None
    shard: str | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers={self.workers}: give at least 1 tokenising process")
        if self.parts is not None and self.parts < 1:
            raise ConfigError(f"parts={self.parts}: give at least 1 part (or null: one per worker)")
        if self.shard is not None:
            index, _, count = self.shard.partition("/")
            if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
                raise ConfigError(f"shard={self.shard!r} must be 'i/n' with 0 <= i < n (e.g. a Slurm array task: "
                                  "shard=$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")

    def part_count(self) -> int:
        return self.parts or self.workers

    def mine(self, part: int) -> bool:
        """Whether this process tokenises ``part``."""
        if self.shard is None:
            return True
        index, count = (int(v) for v in self.shard.split("/"))
        return part % count == index


@dataclass(frozen=True)
class BuildResult:
    """What one ``build_token_file`` call did: the store's prefix, and the parts it tokenised itself (none when
    the store or the parts were there already) with their tokens and the seconds its workers spent on them."""

    prefix: Path
    parts_built: int = 0
    tokens_built: int = 0
    worker_seconds: float = 0.0


def build_token_file(tokenizer, paths: list[str], cache_dir: str | Path, name: str,
                     options: BuildOptions = BuildOptions()) -> BuildResult:
    """Build the token file of ``paths`` under ``cache_dir`` if missing: the parts ``options`` gives this process
    (skipping parts already written: a rerun continues), then, unless it is one shard of many, the merge."""
    prefix, key = store_prefix(tokenizer, paths, cache_dir, name)
    if is_built(prefix):
        return BuildResult(prefix)
    parts = options.part_count()
    pieces = split_pieces(list(paths), parts)
    jobs = [(tokenizer, pieces[i], part_prefix(prefix, i, parts),
             {"paths": list(paths), "key": key, "part": [i, parts]})
            for i in range(parts) if options.mine(i) and not is_built(part_prefix(prefix, i, parts))]
    logger.info("tokenising %s: %d of %d parts with %d worker(s) into %s", name, len(jobs), parts, options.workers,
                prefix)
    if options.workers == 1 or len(jobs) <= 1:
        done = [tokenize_part(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(min(options.workers, len(jobs)), mp_context=get_context("spawn")) as pool:
            done = list(pool.map(tokenize_part, *zip(*jobs)))
    if options.shard is None:
        merge_parts(prefix, parts, {"paths": list(paths), "key": key})
    return BuildResult(prefix, len(done), sum(t for t, _ in done), sum(s for _, s in done))


def built_once(locate: Callable[[], tuple[Path, Callable[[], object]]], what: str,
               prebuilt_by: str | None = None) -> Path:
    """The prefix of a cache entry, built if missing by rank 0 alone while every other rank waits (a torch
    distributed job), then checked by all. ``locate`` (rank 0 only: it may stat a whole corpus) gives the prefix
    and the function that builds it. With ``prebuilt_by`` (the command that builds it offline) a missing entry is
    a ``DataError`` on every rank."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    outcome: list = [None, None]
    if rank == 0:
        try:
            prefix, build = locate()
            if not is_built(prefix):
                if prebuilt_by:
                    raise DataError(f"no prebuilt {what} at {prefix}.*: the data config requires it built "
                                    f"before the job (require_prebuilt: true); run: {prebuilt_by}")
                build()
            outcome[0] = str(prefix)
        except Exception as err:
            if not distributed:
                raise
            outcome[1] = err if isinstance(err, ProjectError) else \
                RuntimeError(f"rank 0 failed building {what}: {type(err).__name__}: {err}")
            _broadcast(outcome)
            raise
    if distributed:
        _broadcast(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    prefix = Path(outcome[0])
    if not is_built(prefix):
        raise DataError(f"{what} built by rank 0 at {prefix} is not visible on rank {rank}: the cache directory must "
                        "be on a filesystem every node shares")
    return prefix


def _broadcast(outcome: list) -> None:
    import torch.distributed as dist

    from nemo_plugins.distributed import device

    dist.broadcast_object_list(outcome, src=0, device=device())


def tokenize_to_file(tokenizer, paths: list[str], cache_dir: str | Path, name: str,
                     prebuilt_by: str | None = None) -> TokenFile:
    """The cached token file of ``paths`` under ``cache_dir``: built on first use by rank 0 (one process), or
    required to exist when ``prebuilt_by`` names the offline command (cluster presets)."""
    prefix = built_once(lambda: (store_prefix(tokenizer, paths, cache_dir, name)[0],
                                 lambda: build_token_file(tokenizer, paths, cache_dir, name)),
                        f"token file of source {name!r}", prebuilt_by)
    return TokenFile(prefix)
