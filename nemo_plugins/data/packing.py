"""Pack tokenised documents into fixed-length rows with per-document positions (no attention across documents)."""

from __future__ import annotations

from typing import Iterable

import torch


def pack_documents(documents: Iterable[list[int]], seq_len: int, rows: int,
                   eos_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, position_ids)``, each ``[rows, seq_len]``.

    Documents are EOS-terminated and laid end to end; positions restart at 0 at every document start and at
    every row start (a document cut by a row boundary continues as a new document in the next row, since
    rows never attend to each other). Fewer rows come back if the documents run out.
    """
    tokens: list[int] = []
    positions: list[int] = []
    need = rows * seq_len
    for doc in documents:
        doc = list(doc) + ([eos_id] if eos_id is not None else [])
        for i, token in enumerate(doc):
            tokens.append(token)
            positions.append(i)
        if len(tokens) >= need:
            break
    n = min(rows, len(tokens) // seq_len)
    if n == 0:
        raise ValueError(f"only {len(tokens)} tokens: fewer than one row of {seq_len}")
    tok = torch.tensor(tokens[: n * seq_len]).view(n, seq_len)
    pos = torch.tensor(positions[: n * seq_len]).view(n, seq_len)
    starts = pos[:, :1].clone()
    # restart positions at each row start for the document that spills over
    first_doc = torch.cumsum((pos == 0).to(torch.int64), dim=1) == 0
    pos = torch.where(first_doc, pos - starts, pos)
    return tok, pos


def pack_text(tokenizer, paths: list[str], seq_len: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows of real text from files/directories (see ``text_files.resolve`` for ``stdlib:``)."""
    from nemo_plugins.data.text_files import iter_documents
    from nemo_plugins.data.tokenizer import token_documents

    return pack_documents(token_documents(tokenizer, iter_documents(paths)), seq_len, rows, tokenizer.eos_token_id)
