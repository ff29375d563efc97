"""Prompts for on-policy training (online DPO): the chat mix's training conversations cut before their first
assistant turn, read once in the mix's weighted round robin with its cursor, each step's sampling seed derived from
the cursor it starts at (a resumed run samples the same responses)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from nemo_plugins.data.chat_mix import ChatMix
from nemo_plugins.data.mix import Cursor, round_robin_order
from nemo_plugins.errors import DataError


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]  # the rendered conversation through the assistant's generation prompt
    messages: list[dict]  # the same messages, for the judge
    meta: dict = field(default_factory=dict)  # the record's "meta" (how GRPO rewards a response); {} when absent


class ChatPrompts:
    """The chat mix's training conversations as prompts, one per row, in the mix's weighted round robin; the
    cursor advances one conversation per prompt. Conversation k of a source is the k-th non-empty line of the
    JSONL files its token file was rendered from (``chat_mix.encode_jsonl`` renders every line, in order) that
    the stage's screen kept (its ``dropped_lines`` are skipped), so the judge gets the messages and the policy the
    very ids SFT trained on. A screened record's messages are the record's own: the policy's ids carry the
    screen's system prompt, the judge reads the user's conversation without it."""

    def __init__(self, mix: ChatMix, seed: int, start: Cursor, per_step: int) -> None:
        self.mix = mix
        self.seed = seed
        self.start_rows = sum(start.rows.values())
        self.per_step = per_step
        self._lines: dict[str, list[tuple[str, int]]] = {}

    def next_rows(self, cursor: Cursor, rows: int, seq_len: int) -> tuple[list[Prompt], int, int, Cursor]:
        """``rows`` prompts, the step's sampling seed (from the cursor it starts at), the step's number in the
        stage and the next cursor."""
        seed = _derived_seed(self.seed, cursor.to_dict())
        step = (sum(cursor.rows.values()) - self.start_rows) // self.per_step + 1
        cursor = Cursor.from_dict(cursor.to_dict())
        prompts = []
        for _ in range(rows):
            ready = [s for s in self.mix.sources if self.mix.index(s, cursor) < self.mix.train_end[s.name]]
            if not ready:
                raise DataError(f"the chat mix has no prompt left after {cursor.tokens()} tokens (single pass, no "
                                "repetition): add conversations or lower the stage's train_tokens")
            source = min(ready, key=lambda s: round_robin_order(cursor, s.name, s.weight))
            k = self.mix.index(source, cursor)
            prompts.append(self.prompt(source, k))
            cursor.offsets[source.name] = int(source.data.starts[k + 1])
            cursor.rows[source.name] = cursor.rows.get(source.name, 0) + 1
        return prompts, seed, step, cursor

    def rows_left(self, cursor: Cursor, seq_len: int, limit: int) -> int:
        return min(limit, sum(self.mix.train_end[s.name] - self.mix.index(s, cursor) for s in self.mix.sources))

    def heldout(self, count: int) -> list[Prompt]:
        """Up to ``count`` held-out prompts, taken from the sources in turn (never trained on)."""
        queues = [[(s, k) for k in range(self.mix.train_end[s.name], len(s.data))] for s in self.mix.sources]
        picked = [item for group in zip(*[q + [None] * (count - len(q)) for q in queues]) for item in group if item]
        if not picked:
            raise DataError("the chat mix has no held-out conversation: raise chat_data.heldout_fraction")
        return [self.prompt(s, k) for s, k in picked[:count]]

    def identity(self) -> dict:
        return {**self.mix.identity(), "kind": "chat_prompts"}

    def prompt(self, source, k: int) -> Prompt:
        begin, end = int(source.data.starts[k]), int(source.data.starts[k + 1])
        first_target = begin + int(np.argmax(source.data.mask[begin:end]))
        record = json.loads(self._line(source, k))
        messages = record["messages"]
        first_assistant = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return Prompt(tuple(int(t) for t in source.data.file.tokens[begin:first_target]), messages[:first_assistant],
                      dict(record.get("meta") or {}))

    def _line(self, source, k: int) -> str:
        if source.name not in self._lines:
            metadata = source.data.file.metadata
            dropped = set(metadata.get("dropped_lines", ()))
            found, index = [], 0
            for path in metadata["files"]:
                with open(path, "rb") as lines:
                    offset = 0
                    for line in lines:
                        if line.strip():
                            if index not in dropped:
                                found.append((path, offset))
                            index += 1
                        offset += len(line)
            if len(found) != len(source.data):
                raise DataError(f"source {source.name!r}: {len(found)} lines in its files (less the {len(dropped)} its "
                                f"screen dropped) but {len(source.data)} rendered conversations: the files changed "
                                "after rendering; remove the chat cache")
            self._lines[source.name] = found
        path, offset = self._lines[source.name][k]
        with open(path, "rb") as lines:
            lines.seek(offset)
            return lines.readline().decode("utf-8")


def _derived_seed(seed: int, cursor: dict) -> int:
    digest = hashlib.sha256(json.dumps([seed, cursor], sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:7], "little")
