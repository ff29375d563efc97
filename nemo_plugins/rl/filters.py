"""Quality filters for reasoning traces: each a pure function of a response's text (or a chat record) returning
why it is bad, or None.

The paper filters its chain-of-thought SFT data for bad format, excessive repetition and language switching (and
the 3B's endless generations show what truncated traces teach). Here:

* ``truncation``: a think block opened and never closed, a code fence never closed (the text stops mid-way), or
  a record whose ``meta.finish_reason`` is ``"length"`` (its generator cut it at the length limit);
* ``think_format``: the think block (either format's markers, ``data/thinking.py``) missing when required, not at
  the start, repeated, nested or closed without being opened; or nothing after it (no final answer);
* ``repetition``: the share of repeated word n-grams, ``1 - distinct / total``, above a threshold: a text that
  says the same thing k times scores about ``1 - 1/k``, natural text (worked steps included) stays low;
* ``script_mixing``: the share of letters outside the response's dominant Unicode script (the first word of each
  letter's Unicode name: LATIN, CYRILLIC, GREEK, ARABIC, ...; Han, Hiragana and Katakana count as one CJK script
  so Japanese is not a switch), above a threshold: a response that drifts into another language's script.
  Script ratios need no model and no download; a switch between two languages of one script is not seen.

A chat record is judged on its assistant turns: truncation and format on the last one (the final answer), rendered
as the HF template writes it (``<think>\\n{thinking}\\n</think>\\n{content}``); repetition and scripts on all of
them together. ``screen`` applies the enabled filters of ``FilterSettings`` in that order and returns the first
``(filter, reason)``; reasons carry no numbers, so they count well. The chat mix drops the records it rejects when
it renders a source and counts them per filter and reason (``data/chat_mix.py``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from nemo_plugins.data.thinking import THINK_SPANS
from nemo_plugins.errors import ConfigError

FILTERS = ("truncation", "format", "repetition", "language")

_MARKERS = re.compile("|".join(re.escape(marker) for span in THINK_SPANS for marker in span))
_OPENS = frozenset(open_ for open_, _ in THINK_SPANS)
_FENCE = re.compile(r"^\s*```", re.MULTILINE)
_WORD = re.compile(r"\w+|[^\w\s]")
_CJK = frozenset({"CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC"})
_NOT_A_SCRIPT = frozenset({"MATHEMATICAL", "MODIFIER", "SUPERSCRIPT", "SUBSCRIPT", "DOUBLE-STRUCK", "FULLWIDTH"})


@dataclass
class FilterSettings:
    """Which filters run and their thresholds; a threshold set to null turns its filter off."""

    truncation: bool = True
    format: bool = True
    require_thinking: bool = True    # a response without a think block fails the format filter
    max_repetition: float | None = 0.5   # share of repeated word n-grams above which a response is dropped
    repetition_ngram: int = 4
    repetition_min_ngrams: int = 16  # shorter texts are too short to judge
    max_foreign_script: float | None = 0.1  # share of letters outside the dominant script
    script_min_letters: int = 20

    def __post_init__(self) -> None:
        for key in ("max_repetition", "max_foreign_script"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value < 1.0:
                raise ConfigError(f"filters.{key}={value} must be in (0, 1), or null to turn the filter off")
        for key in ("repetition_ngram", "repetition_min_ngrams", "script_min_letters"):
            if getattr(self, key) < 1:
                raise ConfigError(f"filters.{key}={getattr(self, key)} must be >= 1")

    def fingerprint(self) -> str:
        """The settings as text: rendered data filtered with other settings is other data (cache keys)."""
        return repr(self)


# ------------------------------------------------------------------------------------------------ on text

def truncation(text: str) -> str | None:
    """Why ``text`` looks cut off before its end, or None."""
    markers = _MARKERS.findall(text)
    if markers and markers[-1] in _OPENS:
        return "think block never closed"
    if len(_FENCE.findall(text)) % 2:
        return "code block never closed"
    return None


def think_format(text: str, require_thinking: bool = True) -> str | None:
    """Why the think block / final answer layout of ``text`` is wrong, or None."""
    markers = list(_MARKERS.finditer(text))
    if not markers:
        return "no think block" if require_thinking else (None if text.strip() else "no final answer")
    if len(markers) % 2 or any((m.group() in _OPENS) != (i % 2 == 0) for i, m in enumerate(markers)):
        return "unbalanced think block"
    if any(dict(THINK_SPANS)[open_.group()] != close.group() for open_, close in zip(markers[::2], markers[1::2])):
        return "unbalanced think block"
    if len(markers) > 2:
        return "several think blocks"
    if text[: markers[0].start()].strip():
        return "think block not at the start"
    if not text[markers[1].end():].strip():
        return "no final answer"
    return None


def repetition_ratio(text: str, ngram: int = 4) -> tuple[float, int]:
    """(share of word n-grams that repeat an earlier one, number of n-grams)."""
    words = _WORD.findall(text)
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    return (1.0 - len(set(grams)) / len(grams) if grams else 0.0), len(grams)


def repetition(text: str, max_ratio: float = 0.5, ngram: int = 4, min_ngrams: int = 16) -> str | None:
    """"excessive repetition" when more than ``max_ratio`` of the word n-grams are repeats, else None."""
    ratio, count = repetition_ratio(text, ngram)
    return "excessive repetition" if count >= min_ngrams and ratio > max_ratio else None


def script_of(char: str) -> str | None:
    """The Unicode script family of a letter (first word of its name, CJK merged), None for non-letters."""
    if not char.isalpha():
        return None
    word = unicodedata.name(char, "UNKNOWN").split()[0]
    if word in _NOT_A_SCRIPT:
        return None
    return "CJK" if word in _CJK else word


def script_shares(text: str) -> tuple[Counter, int]:
    """(letters per script, letters counted)."""
    scripts = Counter(script for char in text if (script := script_of(char)) is not None)
    return scripts, sum(scripts.values())


def script_mixing(text: str, max_foreign: float = 0.1, min_letters: int = 20) -> str | None:
    """"script switch (<other> in <dominant> text)" when more than ``max_foreign`` of the letters are outside the
    dominant script, else None."""
    scripts, letters = script_shares(text)
    if letters < min_letters or len(scripts) < 2:
        return None
    (dominant, top), (other, _) = scripts.most_common(2)
    return f"script switch ({other} in {dominant} text)" if (letters - top) / letters > max_foreign else None


# ------------------------------------------------------------------------------------------------ on records

def assistant_text(message: dict) -> str:
    """An assistant message as the response it stands for: the trace in a think block, then the content."""
    thinking = message.get("thinking") or message.get("reasoning_content")
    content = message.get("content") or ""
    return f"<think>\n{thinking}\n</think>\n{content}" if thinking else content


def screen_text(text: str, settings: FilterSettings, final: str | None = None) -> tuple[str, str] | None:
    """The first ``(filter, reason)`` the enabled filters give: truncation and format on ``final`` (default: the
    whole text), repetition and scripts on ``text``."""
    final = text if final is None else final
    checks = (
        ("truncation", settings.truncation and truncation(final)),
        ("format", settings.format and think_format(final, settings.require_thinking)),
        ("repetition", settings.max_repetition is not None and repetition(
            text, settings.max_repetition, settings.repetition_ngram, settings.repetition_min_ngrams)),
        ("language", settings.max_foreign_script is not None and script_mixing(
            text, settings.max_foreign_script, settings.script_min_letters)),
    )
    return next(((name, reason) for name, reason in checks if reason), None)


def screen(record: dict, settings: FilterSettings) -> tuple[str, str] | None:
    """Why a chat record's assistant turns fail the filters, as ``(filter, reason)``, or None to keep it."""
    turns = [assistant_text(m) for m in record.get("messages", ()) if m.get("role") == "assistant"]
    if not turns:
        return None
    if settings.truncation and (record.get("meta") or {}).get("finish_reason") == "length":
        return "truncation", "cut at the length limit"
    return screen_text("\n".join(turns), settings, final=turns[-1])
