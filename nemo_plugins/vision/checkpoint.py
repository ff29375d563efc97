"""Mistral3 checkpoints in and out of the vision-language model.

In: an ``hf:`` Mistral3ForConditionalGeneration directory (or an earlier export that kept the vision part aside in
``multimodal.safetensors``) gives the text model through the usual per-rank slice loading and the encoder and
projector whole (``hf_io.Multimodal.read``); a ``megatron:`` checkpoint written by ``save_megatron`` carries both in
its dist-checkpointing shards (replicated tensors) and its ``vision_config.json`` (written by the model itself, so
training checkpoints carry it too). The image token ids come from the source's tokenizer and must agree with the
config's ``image_token_index``. ``load_source_model`` is the one loader the stages call: a vision-language model
when the source has a vision part, the text model otherwise. A pruned child (``vision_child``) takes its parent's
encoder bit for bit and a fresh projector sized for its own hidden size.

Out: ``export_mistral3`` writes the layout transformers releases and loads (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.*``, ``multi_modal_projector.*``) with a Mistral3 config.json. The text
tensors stream in from every rank as for a text export; the encoder and projector come from global rank 0, which is
always on the first pipeline stage, the one holding them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from nemo_plugins.bridges import MISTRAL3
from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.convert.mapping import hf_layout, hf_shape
from nemo_plugins.convert.model_io import export_dtype, iter_hf_tensors
from nemo_plugins.convert.sources import (
    HF_TENSOR_KINDS,
    KINDS,
    ModelSource,
    load_model,
    multimodal_part,
    source_config,
    tokenizer_dir,
)
from nemo_plugins.data.interleaved import ImageInputs
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.manifest import read_json
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.fast_path import SpeedOptions
from nemo_plugins.vision.config import VISION_CONFIG_NAME, VisionConfig, check_token_ids, token_ids
from nemo_plugins.vision.images import ImageProcessing
from nemo_plugins.vision.model import ENCODER, PROJECTOR, MistralVisionLanguageModel, build_vision_language_model
from nemo_plugins.vision.projector import build_projector


def source_vision(source: ModelSource) -> VisionConfig | None:
    """The vision part a source declares, or None for a text-only model; its image token ids are its tokenizer's."""
    if source.kind == "megatron":
        path = Path(source.location) / VISION_CONFIG_NAME
        if not path.is_file():
            return None
        vision = VisionConfig(**read_json(path))  # its ids were read from the tokenizer when it was first loaded
        if (Path(source.location) / megatron_checkpoint.TOKENIZER_DIR).is_dir():
            check_token_ids(vision, token_ids(tokenizer_dir(source), str(source)), str(source))
        return vision
    multimodal = multimodal_part(source)
    if multimodal is None:
        return None
    ids = token_ids(tokenizer_dir(source), str(source))
    vision = MISTRAL3.vision_config(multimodal.config, image_break_token_id=ids["image_break_token_id"],
                                    image_end_token_id=ids["image_end_token_id"])
    check_token_ids(vision, ids, str(source))
    return vision


def _load_module(module: torch.nn.Module, state: Mapping[str, torch.Tensor], prefix: str, where: str) -> None:
    part = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(part)), sorted(set(part) - set(expected))
    wrong = [f"{prefix}{n}: {tuple(part[n].shape)} vs {tuple(t.shape)}" for n, t in expected.items()
             if n in part and part[n].shape != t.shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: {prefix}* does not fit the model (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shapes {wrong[:5]}); is vision_config the checkpoint's own?")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(part[name].to(tensor.dtype))


def load_vision_weights(model: MistralVisionLanguageModel, state: Mapping[str, torch.Tensor], where: str,
                        with_projector: bool = True) -> None:
    """Copy ``vision_tower.*`` (and ``multi_modal_projector.*``) HF tensors into this first-stage chunk."""
    if not model.pre_process:
        return
    _load_module(model.vision_tower, state, f"{ENCODER}.", where)
    if with_projector:
        _load_module(model.multi_modal_projector, state, f"{PROJECTOR}.", where)


def vision_state(model: MistralVisionLanguageModel) -> dict[str, torch.Tensor]:
    """The encoder's and projector's tensors under their Mistral3 names, on the CPU (first stage only)."""
    return {f"{prefix}.{name}": tensor.detach().to("cpu", copy=True)
            for prefix in (ENCODER, PROJECTOR)
            for name, tensor in getattr(model, prefix).state_dict().items()}


def reset_projector(model: MistralVisionLanguageModel, text: MistralConfig) -> None:
    """A fresh projector for a child (the parent's is discarded): the same seed-fixed weights on every rank."""
    if model.pre_process:
        fresh = build_projector(model.vision, text, model.config.params_dtype)
        model.multi_modal_projector.load_state_dict(fresh.state_dict())


def image_inputs(source: ModelSource, max_input_side: int | None = None) -> ImageInputs | None:
    """What interleaved data sources need from the model (``data.interleaved``): its vision config and its
    processor settings (an HF directory's preprocessor config, else Pixtral's defaults); None for a text model."""
    vision = source_vision(source)
    if vision is None:
        return None
    changes = {} if max_input_side is None else {"max_input_side": max_input_side}
    model_dir = Path(source.location) if source.kind == "hf" else None
    processing = (ImageProcessing.from_model_dir(model_dir, vision.token_pixels, **changes) if model_dir is not None
                  else ImageProcessing(vision.token_pixels, **changes))
    return ImageInputs(vision, processing)


def load_vision_language_model(source: ModelSource, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                               fresh_projector: bool = False, speed: SpeedOptions | None = None,
                               config: MistralConfig | None = None,
                               ) -> tuple[MistralConfig, VisionConfig, MistralVisionLanguageModel]:
    """Build this rank's chunk and fill text, encoder and (unless ``fresh_projector``) projector from ``source``;
    ``config`` replaces the text config where a stage changes what does not touch weight shapes (``load_model``)."""
    vision = source_vision(source)
    if vision is None:
        raise ConfigError(f"model.source={source} has no vision part (not a Mistral3ForConditionalGeneration "
                          f"directory, nor a megatron checkpoint with {VISION_CONFIG_NAME})")
    text = config or source_config(source)
    model = build_vision_language_model(text, vision, parallel, dtype, speed)
    KINDS[source.kind].load_weights(model, source, text)  # megatron: the vision tensors are in the same shards
    if source.kind in HF_TENSOR_KINDS:
        load_vision_weights(model, multimodal_part(source).read(), str(source), with_projector=not fresh_projector)
    if fresh_projector:
        reset_projector(model, text)
    return text, vision, model


def load_source_model(source: ModelSource, parallel: ParallelConfig, dtype: torch.dtype = torch.float32,
                      config: MistralConfig | None = None,
                      speed: SpeedOptions | None = None) -> tuple[MistralConfig, torch.nn.Module]:
    """``load_model`` for every stage: with the encoder and the source's own projector when it has a vision part
    (a text-only source gives exactly ``load_model``'s model)."""
    if source_vision(source) is None:
        return load_model(source, parallel, dtype, config=config, speed=speed)
    text, _, model = load_vision_language_model(source, parallel, dtype, speed=speed, config=config)
    return text, model


def _load_encoder(model: MistralVisionLanguageModel, source: ModelSource) -> None:
    """Only ``vision_tower.*`` of ``source`` into ``model`` (the projectors of parent and child differ in shape)."""
    if not model.pre_process:
        return
    if source.kind in HF_TENSOR_KINDS:
        load_vision_weights(model, multimodal_part(source).read(), str(source), with_projector=False)
        return
    prefix = f"{ENCODER}."
    wanted = {k: v for k, v in model.sharded_state_dict().items() if k.startswith(prefix)}
    weights = Path(source.location) / megatron_checkpoint.WEIGHTS_DIR
    loaded = dist_checkpointing.load(wanted, str(weights))
    _load_module(model.vision_tower, loaded, prefix, str(source))


def vision_child(text_model: torch.nn.Module, text: MistralConfig, parent: ModelSource, parallel: ParallelConfig,
                 dtype: torch.dtype = torch.float32) -> MistralVisionLanguageModel:
    """The pruned language model ``text_model`` joined to ``parent``'s encoder (bit for bit) and a freshly
    initialised, seeded projector from the encoder's hidden size to ``text``'s (the parent's is discarded)."""
    model = build_vision_language_model(text, source_vision(parent), parallel, dtype)
    missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
    stray = [k for k in missing if not k.startswith(model.non_text_prefixes)] + list(unexpected)
    if stray:
        raise CheckpointError(f"the pruned text model does not fit its vision-language model: {stray[:5]}")
    _load_encoder(model, parent)
    return model.eval()


def save_megatron(model: MistralVisionLanguageModel, text: MistralConfig, vision: VisionConfig, out_dir: str | Path,
                  tokenizer_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """A megatron checkpoint holding text, encoder and projector (collective)."""
    return megatron_checkpoint.save_model(model, text, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                                          json_files={VISION_CONFIG_NAME: vision.to_dict()})


def _mistral3_stream(text_stream: Iterator[tuple[str, torch.Tensor]],
                     vision: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Text tensors under their released names (their sorted order is kept), then the vision ones, sorted."""
    for name, tensor in text_stream:
        yield MISTRAL3.export_name(name), tensor
    yield from sorted(vision.items())


def export_mistral3(model: MistralVisionLanguageModel, text: MistralConfig, vision: VisionConfig, out_dir: str | Path,
                    max_shard_bytes: int = 4 * 2**30, extra_files: dict[str, Path] | None = None,
                    overwrite: bool = False) -> Path:
    """A Mistral3ForConditionalGeneration directory that transformers loads (collective, written by rank 0)."""
    stream = iter_hf_tensors(model, text)
    if dist.get_rank() == 0:
        dtype = export_dtype(model)
        own = {name: tensor.to(dtype) for name, tensor in vision_state(model).items()}
        specs = {MISTRAL3.export_name(name): (hf_shape(name, text), dtype) for name in hf_layout(text)}
        specs.update({name: (tuple(t.shape), t.dtype) for name, t in own.items()})
        hf_io.write_streamed(_mistral3_stream(stream, own), specs, text, out_dir, max_shard_bytes, extra_files,
                             overwrite, hf_config=MISTRAL3.config_to_hf(text, vision))
    else:
        for _ in stream:
            pass
    dist.barrier()
    return Path(out_dir)
