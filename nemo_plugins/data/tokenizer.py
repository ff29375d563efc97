"""Tokenizers (Hugging Face ``tokenizers`` via transformers) checked against the model they feed."""

from __future__ import annotations

from pathlib import Path

from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig

# Models pad their embedding to a round size; more slack than this means a different tokenizer.
MAX_VOCAB_PADDING = 1024


def tokenizer_files(directory: str | Path) -> dict[str, Path]:
    """The tokenizer's files in a model directory, by name: what travels with every checkpoint and export."""
    return {p.name: p for p in Path(directory).iterdir()
            if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json"}


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {path}: {err}") from err


def check_vocab(tokenizer, config: MistralConfig) -> None:
    """A tokenizer that emits ids the model lacks, or a much smaller one, belongs to another model."""
    size = len(tokenizer)
    if size > config.vocab_size or config.vocab_size - size >= MAX_VOCAB_PADDING:
        raise ConfigError(
            f"tokenizer has {size} tokens but the model's vocab_size is {config.vocab_size}; "
            "use the tokenizer the model was trained with"
        )


def token_documents(tokenizer, documents):
    """Token ids of each (path, text) document, without special tokens (packing adds EOS)."""
    for _, text in documents:
        yield tokenizer(text, add_special_tokens=False)["input_ids"]


def same_tokenizer(one: str | Path, other: str | Path) -> bool:
    """Whether two tokenizer directories map every string to the same ids (same vocabulary and special tokens)."""
    if Path(one).resolve() == Path(other).resolve():
        return True
    first, second = load_tokenizer(one), load_tokenizer(other)
    return first.get_vocab() == second.get_vocab() and first.all_special_tokens == second.all_special_tokens
