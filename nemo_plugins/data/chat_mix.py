"""Conversations from JSONL sources as packed rows with an assistant-token target mask, read in ONE pass.

A source is ``data/mix.py``'s ``SourceSpec(name, paths, weight)`` whose paths are JSONL files, directories of
them, or ``builtin:<name>`` (the demo conversations of ``instruct_sources.materialize``). Each line is
``{"messages": [...], "tools": [...]}`` (``tools`` optional, other keys such as ``meta`` ignored); a bad line is
a ``DataError`` naming ``file:line`` and what is wrong. A ``ChatFormat`` renders every source once into a
cached token file (tokens, per-token assistant mask, conversation starts), keyed on the files (name, size,
mtime) and the format's fingerprint; inside a job rank 0 alone renders it while the other ranks wait
(``token_store.built_once``), and ``python -m recipes.tokenize`` can render it before the job.

Rows: whole conversations laid end to end, positions restarting at 0 for each; the rest of the row is padding
(the EOS id, a position run of its own, never a target). A conversation longer than the row is dropped and
counted (``stats``, logged once per row length), never cut. ``target_mask[r, t] = 1`` iff the token at ``t + 1``
is an assistant token of the same conversation, so it lines up with next-token labels (``batches.local_batch``).

Reading is ``DataMix``'s: each row comes from one source, picked by the same smooth weighted round robin; the
same ``Cursor`` records per source the token offset of the next unread conversation (always a conversation
boundary) and the rows handed out, so a resumed run reads what an uninterrupted one would and the next stage
continues where this one stopped. The last ``heldout_fraction`` of every source's conversations is the held-out
split, never trained on.

A stage may screen the records before they are rendered (``RecordScreen``: the reasoning SFT stage drops traces its
filters reject and adds its system prompt, ``rl/sft_kd.py``): a dropped record is counted per filter and reason in
the token file's metadata (``stats()["filtered"]``, hence the stage's manifest) with its line's index among the
source's non-empty lines (``dropped_lines``); the screen's fingerprint is part of the token file's key.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
import torch

from nemo_plugins.data.chat import ChatFormat, EncodedChat
from nemo_plugins.data.instruct_sources import materialize
from nemo_plugins.data.mix import Cursor, SourceSpec, check_sources, round_robin_order
from nemo_plugins.data.token_store import TokenFile, built_once, source_key, token_dtype
from nemo_plugins.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

BUILTIN = "builtin:"
MASK_SUFFIX = ".mask"


def write_chat_tokens(conversations: Iterable[EncodedChat], prefix: str | Path, vocab_size: int, eos_id: int,
                      metadata: dict) -> "ChatTokens":
    """Write rendered conversations as a token file (``token_store`` layout, no EOS appended: a conversation
    ends with its own end-of-turn) plus ``<prefix>.mask``, one uint8 per token; atomic renames at the end."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    suffixes = (".bin", MASK_SUFFIX, ".idx", ".json")
    partial = {s: prefix.with_name(f".{prefix.name}{s}.{os.getpid()}.partial") for s in suffixes}
    starts, assistant_tokens = [0], 0
    try:
        with open(partial[".bin"], "wb") as tokens_out, open(partial[MASK_SUFFIX], "wb") as mask_out:
            for conversation in conversations:
                ids = np.asarray(conversation.tokens, dtype=np.int64)
                if ids.max() >= vocab_size or ids.min() < 0:
                    raise ConfigError(f"token id {int(ids.max())} outside the vocabulary of {vocab_size}: "
                                      "wrong tokenizer")
                tokens_out.write(ids.astype(dtype).tobytes())
                mask_out.write(np.asarray(conversation.assistant_mask, dtype=np.uint8).tobytes())
                starts.append(starts[-1] + len(ids))
                assistant_tokens += sum(conversation.assistant_mask)
        if len(starts) == 1:
            raise DataError(f"no conversations for chat token file {prefix}: its source's files hold none (or the "
                            "stage's screen dropped every one); check the source's paths and filters")
        np.asarray(starts, dtype=np.int64).tofile(partial[".idx"])
        partial[".json"].write_text(json.dumps({**metadata, "vocab_size": vocab_size, "eos_id": eos_id,
                                                "dtype": dtype.name, "documents": len(starts) - 1, "tokens": starts[-1],
                                                "assistant_tokens": assistant_tokens}, indent=2))
        for suffix in suffixes:
            os.replace(partial[suffix], prefix.with_name(prefix.name + suffix))
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return ChatTokens(prefix)


class ChatTokens:
    """Read-only memory maps of a chat token file: tokens and document starts (``TokenFile``) + the mask."""

    def __init__(self, prefix: str | Path) -> None:
        self.file = TokenFile(prefix)
        self.mask = np.memmap(self.file.prefix.with_name(self.file.prefix.name + MASK_SUFFIX), dtype=np.uint8, mode="r")
        if len(self.mask) != len(self.file):
            raise DataError(f"chat token file {prefix}: {len(self.mask)} mask bytes for {len(self.file)} tokens")
        self.starts = self.file.starts
        self.lengths = np.diff(self.starts)

    def __len__(self) -> int:
        """Number of conversations."""
        return len(self.lengths)


def resolve_chat_paths(paths: list[str], cache_dir: str | Path) -> list[Path]:
    """The JSONL files of a source, in a reproducible order; ``builtin:`` sources are materialised first."""
    files: list[Path] = []
    for raw in paths:
        if raw.startswith(BUILTIN):
            files.append(materialize(raw.removeprefix(BUILTIN), Path(cache_dir) / "builtin"))
            continue
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(path.rglob("*.jsonl"))
            if not found:
                raise DataError(f"chat data directory {raw!r} holds no .jsonl files: check the source's paths")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"chat data path {raw!r} does not exist (a .jsonl file, a directory of them, or "
                            "builtin:<name>): check the source's paths")
    return files


class RecordScreen(Protocol):
    """A stage's say over its records before they are rendered."""

    def fingerprint(self) -> str:
        """Records screened otherwise render other data: part of the token file's key."""

    def reject(self, record: dict) -> tuple[str, str] | None:
        """``(filter, reason)`` to drop the record, None to keep it."""

    def prepare(self, record: dict) -> dict:
        """The kept record as it is rendered (e.g. with the stage's system prompt)."""


def encode_jsonl(files: list[Path], chat_format: ChatFormat, screen: RecordScreen | None = None,
                 screened: dict | None = None) -> Iterator[EncodedChat]:
    """Every line's conversation rendered; a bad line raises ``DataError`` with ``file:line`` (as a bad line of a
    text corpus does). With ``screen``, rejected records are skipped and recorded in ``screened`` (``filtered``:
    counts per filter and reason; ``dropped_lines``: their indices among the non-empty lines)."""
    line_index = -1
    for file in files:
        with open(file, encoding="utf-8") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                line_index += 1
                where = f"{file}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: not valid JSON ({err.msg})") from err
                if not isinstance(record, dict) or "messages" not in record:
                    raise DataError(f'{where}: a line must be an object with "messages"')
                if screen is not None:
                    if (verdict := screen.reject(record)) is not None:
                        counts = screened["filtered"].setdefault(verdict[0], {})
                        counts[verdict[1]] = counts.get(verdict[1], 0) + 1
                        screened["dropped_lines"].append(line_index)
                        continue
                    record = screen.prepare(record)
                try:
                    encoded = chat_format.encode(record["messages"], record.get("tools"))
                except (ConfigError, DataError) as err:  # a bad record, or one the chat format cannot render
                    raise type(err)(f"{where}: {err}") from err
                if not any(encoded.assistant_mask):
                    raise DataError(f"{where}: no assistant turn, nothing to train on")
                yield encoded


def tokenize_chat_source(chat_format: ChatFormat, spec: SourceSpec, cache_dir: str | Path,
                         prebuilt_by: str | None = None, screen: RecordScreen | None = None) -> ChatTokens:
    """The cached chat token file of one source under ``cache_dir``: rendered on first use by rank 0 alone (the
    other ranks wait), or required to exist when ``prebuilt_by`` names the offline command."""

    def locate() -> tuple[Path, Callable[[], object]]:
        files = resolve_chat_paths(list(spec.paths), cache_dir)
        renderer = chat_format.fingerprint + (f"|screen:{screen.fingerprint()}" if screen is not None else "")
        key = source_key(renderer, chat_format.vocab_size, [str(f) for f in files])
        prefix = Path(cache_dir) / f"{spec.name}-chat-{key}"

        def build() -> None:
            logger.info("rendering chat source %s with %s (once; cached at %s)", spec.name, chat_format.name, prefix)
            metadata = {"paths": list(spec.paths), "files": [str(f) for f in files], "format": chat_format.name,
                        "key": key}
            screened = {"filtered": {}, "dropped_lines": []} if screen is not None else None
            if screened is not None:
                metadata["screen"] = screen.fingerprint()
                metadata.update(screened)  # the same dict and list, filled while rendering (metadata is written after)
            write_chat_tokens(encode_jsonl(files, chat_format, screen, screened), prefix, chat_format.vocab_size,
                              chat_format.pad_id, metadata)
            if screened is not None:
                logger.info("chat source %s: %d records dropped by the screen: %s", spec.name,
                            len(screened["dropped_lines"]), screened["filtered"])

        return prefix, build

    return ChatTokens(built_once(locate, f"chat token file of source {spec.name!r}", prebuilt_by))


def build_chat_mix(chat_format: ChatFormat, sources: list[SourceSpec], cache_dir: str | Path,
                   heldout_fraction: float, prebuilt_by: str | None = None,
                   screen: RecordScreen | None = None) -> "ChatMix":
    """Render every source once (cached; see ``tokenize_chat_source``), screened by ``screen`` if given, and mix
    them."""
    if not sources:
        raise ConfigError("data.sources is empty")
    return ChatMix([ChatSource(s.name, tokenize_chat_source(chat_format, s, cache_dir, prebuilt_by, screen), s.weight)
                    for s in sources], heldout_fraction, chat_format.pad_id)


@dataclass(frozen=True)
class ChatSource:
    name: str
    data: ChatTokens
    weight: float


Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ChatMix:
    """``DataMix``'s surface for conversations: ``next_rows`` / ``heldout_rows`` also return the target mask."""

    def __init__(self, sources: list[ChatSource], heldout_fraction: float, pad_id: int) -> None:
        check_sources({s.name: s.weight for s in sources} if sources else {}, heldout_fraction, len(sources))
        self.sources = sources
        self.heldout_fraction = heldout_fraction
        self.pad_id = pad_id
        self.train_end = {s.name: int(len(s.data) * (1.0 - heldout_fraction)) for s in sources}
        self._reported: set[int] = set()

    def next_rows(self, cursor: Cursor, rows: int,
                  seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cursor]:
        """``rows`` training rows of ``seq_len``: tokens, per-conversation positions, target mask; the new cursor."""
        self._report_dropped(seq_len)
        cursor = Cursor.from_dict(cursor.to_dict())
        built = []
        for _ in range(rows):
            ready = [(s, k) for s in self.sources
                     if (k := _next_fitting(s.data, self.index(s, cursor), self.train_end[s.name], seq_len))
                     is not None]
            if not ready:
                raise DataError(
                    f"the chat mix is exhausted after {cursor.tokens()} training tokens (single pass, no repetition): "
                    "add conversations or lower the stage's token budget"
                )
            source, k = min(ready, key=lambda sk: round_robin_order(cursor, sk[0].name, sk[0].weight))
            *row, k = self._row(source.data, k, self.train_end[source.name], seq_len)
            built.append(row)
            cursor.offsets[source.name] = int(source.data.starts[k])
            cursor.rows[source.name] = cursor.rows.get(source.name, 0) + 1
        return (*_stack(built), cursor)

    def identity(self) -> dict:
        """What a cursor's offsets refer to: per source its weight, conversation count and token-file key."""
        return {"kind": "chat", "heldout_fraction": self.heldout_fraction,
                "sources": {s.name: {"weight": s.weight, "conversations": len(s.data),
                                     "key": s.data.file.metadata.get("key")}
                            for s in self.sources}}

    def rows_left(self, cursor: Cursor, seq_len: int, limit: int) -> int:
        """Training rows of ``seq_len`` still available from ``cursor``, counted up to ``limit`` (exact: each source
        packs its own rows, and the round robin only skips sources with no conversation left that fits)."""
        left = 0
        for source in self.sources:
            k, end = self.index(source, cursor), self.train_end[source.name]
            while left < limit and (k := _next_fitting(source.data, k, end, seq_len)) is not None:
                k = _pack(source.data.lengths, k, end, seq_len)[1]
                left += 1
        return left

    def heldout_rows(self, seq_len: int, max_rows_per_source: int) -> Rows:
        """Evaluation rows packed from the held-out conversations of every source (never part of training)."""
        built = []
        for s in self.sources:
            k: int | None = self.train_end[s.name]
            for _ in range(max_rows_per_source):
                k = _next_fitting(s.data, k, len(s.data), seq_len)
                if k is None:
                    break
                *row, k = self._row(s.data, k, len(s.data), seq_len)
                built.append(row)
        if not built:
            raise DataError(f"no held-out conversation fits in {seq_len} tokens: raise data.heldout_fraction or "
                            "seq_len")
        return _stack(built)

    def stats(self, seq_len: int) -> dict[str, dict]:
        """Per source: conversations (all / training / held out), tokens, assistant tokens, and how many
        conversations rows of ``seq_len`` drop for being longer (all / in the training split); for a screened
        source also the records its screen dropped, per filter and reason (``filtered``)."""
        out = {}
        for s in self.sources:
            too_long = s.data.lengths > seq_len
            out[s.name] = {"conversations": len(s.data), "train_conversations": self.train_end[s.name],
                           "heldout_conversations": len(s.data) - self.train_end[s.name], "tokens": len(s.data.file),
                           "assistant_tokens": int(s.data.file.metadata["assistant_tokens"]),
                           "dropped": int(too_long.sum()),
                           "dropped_train": int(too_long[: self.train_end[s.name]].sum())}
            if "filtered" in s.data.file.metadata:
                out[s.name]["filtered"] = s.data.file.metadata["filtered"]
        return out

    def _report_dropped(self, seq_len: int) -> None:
        if seq_len in self._reported:
            return
        self._reported.add(seq_len)
        stats = self.stats(seq_len)
        dropped = {name: st["dropped"] for name, st in stats.items() if st["dropped"]}
        logger.info("chat mix at seq_len %d: %d of %d conversations are longer and dropped (never cut)%s", seq_len,
                    sum(dropped.values()), sum(st["conversations"] for st in stats.values()),
                    f": {dropped}" if dropped else "")

    def index(self, source: ChatSource, cursor: Cursor) -> int:
        """The conversation at the cursor's offset for ``source``, which must be a conversation boundary."""
        offset = cursor.offsets.get(source.name, 0)
        k = int(np.searchsorted(source.data.starts, offset))
        if k >= len(source.data.starts) or source.data.starts[k] != offset:
            raise DataError(f"cursor offset {offset} of source {source.name!r} is not a conversation boundary: "
                              "the cursor was written for other data")
        return k

    def _row(self, data: ChatTokens, k: int, end: int, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """One row packed from conversation ``k`` on (``end`` excluded); the next unread conversation."""
        tokens = np.full(seq_len, self.pad_id, dtype=np.int64)
        positions = np.empty(seq_len, dtype=np.int64)
        targets = np.zeros(seq_len, dtype=np.float32)
        used = 0
        packed, next_k = _pack(data.lengths, k, end, seq_len)
        for k in packed:
            length, begin = int(data.lengths[k]), int(data.starts[k])
            tokens[used : used + length] = data.file.tokens[begin : begin + length]
            positions[used : used + length] = np.arange(length)
            targets[used : used + length - 1] = data.mask[begin + 1 : begin + length]
            used += length
        positions[used:] = np.arange(seq_len - used)
        return tokens, positions, targets, next_k


def _pack(lengths: np.ndarray, k: int, end: int, seq_len: int) -> tuple[list[int], int]:
    """The conversations one row takes from ``k`` on (``end`` excluded): whole ones in order, longer-than-row
    ones skipped, until the next does not fit; and the next unread conversation."""
    taken, used = [], 0
    while k < end:
        length = int(lengths[k])
        if length <= seq_len:
            if used + length > seq_len:
                break
            taken.append(k)
            used += length
        k += 1
    return taken, k


def _next_fitting(data: ChatTokens, k: int, end: int, seq_len: int) -> int | None:
    """The first conversation from ``k`` (before ``end``) that fits in a row, or None."""
    while k < end and data.lengths[k] > seq_len:
        k += 1
    return k if k < end else None


def _stack(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Rows:
    return tuple(torch.from_numpy(np.stack([row[i] for row in rows])) for i in range(3))
