"""The chat format and chat mix of a recipe's ``chat_data`` config: one set-up for every recipe that reads
conversations (``sft``, ``odpo``, ``cascade``), so they render the same token files and honour the same
``require_prebuilt`` (the command that renders them before a cluster job)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_plugins.data.chat import ChatFormat, load_chat_format
from nemo_plugins.data.chat_mix import ChatMix, RecordScreen, build_chat_mix
from nemo_plugins.data.mix import source_specs
from recipes.tokenize import prebuilt_by


def load_chat_data(cfg: DictConfig, tokenizer_path: Path,
                   screen: RecordScreen | None = None) -> tuple[ChatFormat, ChatMix]:
    """``cfg.chat_data``'s format (read from the tokenizer at ``tokenizer_path``) and its mix, rendered once and cached
    (screened by the stage's ``screen`` if given: reasoning SFT's filters and system prompt)."""
    data = cfg.chat_data
    chat_format = load_chat_format(data.format, tokenizer_path)
    return chat_format, build_chat_mix(chat_format, source_specs(data.sources), data.cache_dir, data.heldout_fraction,
                                       prebuilt_by(cfg, "chat_data"), screen)
