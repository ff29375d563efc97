"""Tokenise a run's corpus before the run: the token files ``data`` (and ``chat_data``) name, built with N processes.

    python -m recipes.tokenize cascade=ministral3 \\
        model.source=hf:/data/models/Mistral-Small-3.1-24B-Base-2503 workers=32
    python -m recipes.tokenize data=user_corpus model.source=hf:/data/models/... workers=16 parts=64
    python -m recipes.tokenize ... parts=64 shard=3/16     # one Slurm array task: parts 3, 19, 35, 51; no merge
    python -m recipes.tokenize ... parts=64                # after the array: finds the parts done, merges

The same overrides as the run it prepares (it composes the cascade's config), so it writes exactly the files the
run opens: same tokenizer (model.source), same sources, same cache directory, same key. Each source is cut into
``parts`` pieces of about equal bytes, tokenised by ``workers`` spawned processes into part files, and merged in
document order: the store is the same bytes for any number of parts, workers or array tasks. Interleaved
image-text sources (``kind: interleaved``) are tokenised by this process alone, as the mix builds them (the token
file and its images side file, ``data/interleaved.py``, with the parent's image settings and
``data.max_image_side``); a text-only parent refuses them. Conversations (``chat``) are rendered by this process
alone, screened exactly as the stage that reads them screens them: ``chat_data`` by ``stage.sft_kd``'s filters and
system prompt (so ``recipes.sft stage@stage.sft_kd=reasoning_sft`` finds its files), and with ``reasoning=true``
the cascade's ``reasoning_data`` by ``stage.reasoning_sft``'s and its ``problem_data`` with that stage's system
prompt alone. (Rendering unscreened files and refusing them in the stage would leave the cluster path,
``require_prebuilt: true``, with no way to build what the stage opens.) A run whose data config says
``require_prebuilt: true`` refuses to start without these files and prints this command with its own overrides
(``nemo_plugins.data.from_config.prebuilt_by``).
"""

from __future__ import annotations

import logging
import time

from nemo_plugins.config.schemas import TokenizeConfig
from nemo_plugins.convert.sources import ModelSource, source_config, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import RecordScreen, build_chat_mix
from nemo_plugins.data.from_config import mix_images
from nemo_plugins.data.interleaved import ImageInputs, interleaved_file
from nemo_plugins.data.token_store import BuildOptions, TokenFile, build_token_file
from nemo_plugins.data.tokenizer import check_vocab, load_tokenizer
from nemo_plugins.errors import ConfigError
from recipes._entry import hydra_entry

logger = logging.getLogger(__name__)


def run(cfg: TokenizeConfig) -> dict:
    if not cfg.model.source:
        raise ConfigError("model.source is null: token files are keyed on the tokenizer of the model that reads "
                          "them; give the run's model.source")
    options = BuildOptions(workers=cfg.workers, parts=cfg.parts, shard=cfg.shard)
    source = ModelSource.parse(cfg.model.source)
    tok_dir = tokenizer_dir(source)
    tokenizer = load_tokenizer(tok_dir)
    check_vocab(tokenizer, source_config(source))
    built = {}
    images = mix_images(cfg, source) if any(s.kind == "interleaved" for s in cfg.data.sources) else None
    for spec in cfg.data.sources:
        if spec.kind == "interleaved":
            if options.shard is None:
                built[spec.name] = build_interleaved(cfg, tokenizer, spec, images)
            else:
                print(f"{spec.name}: interleaved, tokenised by one process in the run without shard=")
            continue
        started = time.perf_counter()
        result = build_token_file(tokenizer, list(spec.paths), cfg.data.cache_dir, spec.name, options)
        seconds = time.perf_counter() - started
        rate = f"{result.tokens_built / result.worker_seconds:,.0f}" if result.worker_seconds else "-"
        work = (f"{result.parts_built} part(s), {result.tokens_built:,} tokens tokenised in {seconds:.1f} s "
                f"({rate} tokens/s per worker)")
        if options.shard is None:
            built[spec.name] = {"prefix": str(result.prefix), "tokens": len(TokenFile(result.prefix)),
                                "parts_built": result.parts_built, "seconds": round(seconds, 2)}
            print(f"{spec.name}: {built[spec.name]['tokens']:,} tokens at {result.prefix}; this run: {work}")
        else:
            print(f"{spec.name}: shard {options.shard} of the parts of {result.prefix}: {work}")
    if options.shard is None:
        for group, screen in chat_groups(cfg):
            built.update(render_chat(cfg, group, screen, tok_dir))
    return built


def build_interleaved(cfg: TokenizeConfig, tokenizer, spec, images: ImageInputs | None) -> dict:
    """An interleaved source's token file and images side file, as ``build_mix`` opens them."""
    file, index = interleaved_file(tokenizer, list(spec.paths), cfg.data.cache_dir, spec.name, images)
    print(f"{spec.name}: {len(file):,} tokens, {len(index):,} images (interleaved) at {file.prefix}")
    return {"prefix": str(file.prefix), "tokens": len(file), "images": len(index)}


def chat_groups(cfg: TokenizeConfig) -> list[tuple[str, RecordScreen | None]]:
    """The chat-data groups this run renders, each with the screen of the stage that reads it."""
    groups = []
    if cfg.chat:
        groups.append(("chat_data", cfg.stage.sft_kd.data_screen()))
    if cfg.reasoning:
        reasoning = cfg.stage.reasoning_sft
        groups += [("reasoning_data", reasoning.data_screen()), ("problem_data", reasoning.prompt_screen())]
    return groups


def render_chat(cfg: TokenizeConfig, group: str, screen: RecordScreen | None, tok_dir) -> dict:
    data = getattr(cfg, group)
    chat = build_chat_mix(load_chat_format(data.format, tok_dir), data.sources, data.cache_dir,
                          data.heldout_fraction, screen=screen)
    built = {}
    for s in chat.sources:
        built[f"{group}:{s.name}"] = {"prefix": str(s.data.file.prefix), "tokens": len(s.data.file)}
        print(f"{group} {s.name}: {len(s.data):,} conversations, {len(s.data.file):,} tokens at {s.data.file.prefix}")
    return built


main = hydra_entry("tokenize", run)


if __name__ == "__main__":
    main()
