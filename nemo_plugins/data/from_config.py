"""The data a recipe's config names, opened the one way every recipe opens it: the token mix's image settings, the
conversation mixes, the PWRM's pairs, and the command that builds their files before a cluster job.

Recipes are thin entry points that never import each other; what two of them (or the cascade and a single-stage
recipe) must open identically lives here, so that they render the same token files and honour the same
``require_prebuilt``.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig

from nemo_plugins.convert.sources import ModelSource, load_model, tokenizer_dir
from nemo_plugins.data.chat import ChatFormat, load_chat_format
from nemo_plugins.data.chat_mix import ChatMix, RecordScreen, build_chat_mix
from nemo_plugins.data.interleaved import ImageInputs
from nemo_plugins.data.pairwise import EngineSampler, Pair, PairwiseSettings, build_or_load_pairs, read_pairs
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.generation.torch_engine import generation_layout
from nemo_plugins.vision.checkpoint import image_inputs

# the override keys that decide which token files a run opens (the rest: layouts, stages, outputs, do not)
DATA_KEYS = ("cascade", "model", "data", "chat_data", "posttrain", "reasoning", "reasoning_data", "problem_data")
# the stages whose screen (filters, system prompt) is part of the chat token files' key
SCREEN_STAGES = ("stage.sft_kd", "stage.reasoning_sft")
SCREEN_SETTINGS = ("filters", "system_prompt")


def data_overrides(overrides: list[str]) -> list[str]:
    """The overrides that decide which token files a run opens: data, model and cascade keys, and the choice or the
    screen settings of a stage that screens its conversations."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        stage = key.removeprefix("stage@")
        screens = any(stage == s or any(stage.startswith(f"{s}.{name}") for name in SCREEN_SETTINGS)
                      for s in SCREEN_STAGES)
        if screens or key.replace("@", ".").split(".")[0] in DATA_KEYS:
            kept.append(override)
    return kept


def prebuilt_by(cfg: Any, group: str = "data") -> str | None:
    """The command that builds ``cfg.<group>``'s token files before the run, with this run's data overrides, when
    that data config says ``require_prebuilt: true``; None when the run may build them on first use."""
    if not getattr(cfg, group).require_prebuilt:
        return None
    kept = data_overrides(list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [])
    if group == "chat_data" or not hasattr(cfg, "posttrain"):  # a cascade renders its chat data as posttrain says
        kept.append(f"chat={str(group == 'chat_data').lower()}")
    command = shlex.join(["python", "-m", "recipes.tokenize", *kept])
    return f"`{command} workers=<cpus>` (on Slurm: `sbatch slurm/tokenize.sbatch {shlex.join(kept)}`)"


def mix_images(cfg: Any, source: ModelSource) -> ImageInputs | None:
    """The image settings ``data``'s interleaved sources are tokenised and read with: the model's (None for a
    text-only model) with ``data.max_image_side``, the longest input side accepted before any resize."""
    return image_inputs(source, max_input_side=cfg.data.max_image_side)


def load_chat_data(cfg: Any, tokenizer_path: Path, screen: RecordScreen | None = None,
                   group: str = "chat_data") -> tuple[ChatFormat, ChatMix]:
    """``cfg.<group>``'s chat format (read from the tokenizer at ``tokenizer_path``) and its mix, rendered once and
    cached (screened by the stage's ``screen`` if given: reasoning SFT's filters and system prompt)."""
    data = getattr(cfg, group)
    chat_format = load_chat_format(data.format, tokenizer_path)
    return chat_format, build_chat_mix(chat_format, data.sources, data.cache_dir, data.heldout_fraction,
                                       prebuilt_by(cfg, group), screen)


def load_pairs(pairs: Any, parallel: ParallelConfig, seed: int) -> tuple[list[Pair], dict]:
    """The PWRM's pairs a ``pairs`` config (``nemo_plugins.config.schemas.PairData``) names, and what the manifest
    records of them (file, sampling model): ``pairs.file``, else the demo pairs built once into ``pairs.cache_dir``,
    answered by ``pairs.sample_from`` where it is set."""
    if pairs.file:
        return read_pairs(Path(pairs.file)), {"file": str(pairs.file)}
    settings = PairwiseSettings(counts=dict(pairs.counts), heldout_fraction=pairs.heldout_fraction, seed=pairs.seed)
    make_sampler, identity = None, None
    if pairs.sample_from:
        sample_source = ModelSource.parse(pairs.sample_from)
        identity = f"{sample_source}|{dataclasses.asdict(pairs.sampling)}|{pairs.format}"

        def make_sampler() -> EngineSampler:
            layout = generation_layout(parallel)  # the engine decodes one token per step: TP only
            initialize(layout, seed)
            _, model = load_model(sample_source, layout)
            chat_format = load_chat_format(pairs.format, tokenizer_dir(sample_source))
            return EngineSampler(model, chat_format, pairs.sampling, seed)

    found, path = build_or_load_pairs(settings, pairs.cache_dir, make_sampler, identity)
    initialize(parallel, seed)
    return found, {"file": str(path), "sample_from": pairs.sample_from}
