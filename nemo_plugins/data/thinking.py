"""Where a response's reasoning trace is: the think-block markers of both chat formats, split and stripped.

A reasoning model writes its trace in a think block before the final answer: ``<think>...</think>`` in the Hugging
Face templates (``data/chat.py`` renders ``thinking`` that way) and ``[THINK]...[/THINK]`` in Tekken. Rewards grade
only the answer, the online-DPO judge reads the response without its trace, and the SFT filters check that the
block is well formed; all of them parse with this one module so the two formats are handled alike. A block left
open (the response was cut at its length limit) runs to the end of the text.
"""

from __future__ import annotations

import re

# (open, close) markers of every chat format's think block: HF templates, Tekken.
THINK_SPANS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))

_SPAN = re.compile(
    "|".join(f"{re.escape(open_)}(.*?)(?:{re.escape(close)}|$)" for open_, close in THINK_SPANS), re.DOTALL
)


def split_thinking(text: str) -> tuple[str | None, str]:
    """(the trace, the answer): the spans' insides joined (None when there is none) and the text outside them.

    Both parts are stripped of surrounding whitespace, inverting the renderer's ``<think>\\n...\\n</think>\\n``.
    """
    spans = [next(group for group in match.groups() if group is not None) for match in _SPAN.finditer(text)]
    thinking = "\n".join(span.strip() for span in spans) if spans else None
    return thinking, _SPAN.sub("", text).strip()


def strip_thinking(text: str) -> str:
    """The text without its thinking spans (an unclosed one runs to the end), whitespace kept: what a judge reads."""
    return _SPAN.sub("", text)
