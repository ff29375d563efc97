"""The vision-language model: our megatron GPTModel whose first pipeline stage embeds images.

``MistralVisionLanguageModel`` is a ``MistralGPTModel`` (so every stage, loss, export and the pipeline schedule take it
unchanged) with two more modules on the first pipeline stage: the frozen Pixtral encoder (``vision_tower``) and the
trainable projector (``multi_modal_projector``), named as in Mistral3 checkpoints. A forward given ``images`` embeds
the tokens as usual and replaces the rows at ``[IMG]`` positions by the projected image features, then hands the
result to GPTModel as ``decoder_input``; later stages receive hidden states from the pipeline as before.

Layouts: the features are placed on the full ``[b, s]`` grid, moved to megatron's ``[s, b, h]`` and, under sequence
parallelism, scattered along the sequence like megatron's own embedding output (whose backward all-gathers the
gradient, so each TP rank's projector sees the full gradient). Under Transformer Engine, rows of packed documents run
as one ``[1, b*s]`` row (``MistralGPTModel``), and the embedding is built in that layout. Context parallelism would
split the rows before the image positions are known: refused.

Both modules are ordinary parameters of the model, so megatron's ``sharded_state_dict`` saves them as replicated
tensors (``vision_tower.*``, ``multi_modal_projector.*``) beside the text weights and a megatron checkpoint carries
them; the encoder has ``requires_grad=False`` and so no optimizer state.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state, tensor_parallel

from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.model.builder import MistralGPTModel, build_model
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.model.fast_path import SpeedOptions
from nemo_plugins.vision.config import VISION_CONFIG_NAME, VisionConfig
from nemo_plugins.vision.encoder import build_encoder, encode
from nemo_plugins.vision.projector import build_projector, project
from nemo_plugins.vision.tokens import RowImage, check_image_count, row_features

ENCODER = "vision_tower"
PROJECTOR = "multi_modal_projector"


class MistralVisionLanguageModel(MistralGPTModel):
    """A MistralGPTModel whose ``forward`` also takes ``images``: ``[3, H, W]`` preprocessed pixel tensors (or
    ``RowImage`` of packed rows) of the micro-batch, in the order their ``[IMG]`` runs appear row by row."""

    non_text_prefixes = (f"{ENCODER}.", f"{PROJECTOR}.")

    def __init__(self, *args, vision: VisionConfig, text: MistralConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.vision = vision
        if self.pre_process:
            self.vision_tower = build_encoder(vision, self.config.params_dtype)
            self.multi_modal_projector = build_projector(vision, text, self.config.params_dtype)

    def checkpoint_files(self) -> dict[str, dict]:
        """JSON files every megatron checkpoint of this model carries (training ones included): the vision config
        marks the checkpoint as vision-language, so every later stage loads it with its encoder and projector."""
        return {VISION_CONFIG_NAME: self.vision.to_dict()}

    def train(self, mode: bool = True) -> "MistralVisionLanguageModel":
        """The encoder stays in eval mode whatever the model's mode: it is frozen."""
        super().train(mode)
        if self.pre_process:
            self.vision_tower.eval()
        return self

    def forward(self, input_ids, position_ids, attention_mask=None, labels=None, return_hidden: bool = False,  # type: ignore[override]
                images: list[torch.Tensor] | None = None, **kwargs):
        if self.pre_process and input_ids is not None and kwargs.get("decoder_input") is None:
            if images:
                thd = (attention_mask is None and self.uses_transformer_engine
                       and self._thd_params(position_ids) is not None)
                rows = (input_ids.reshape(1, -1), position_ids.reshape(1, -1)) if thd else (input_ids, position_ids)
                kwargs["decoder_input"] = self.embed_with_images(*rows, images)
            elif bool((input_ids == self.vision.image_token_id).any()):
                raise DataError(f"a micro-batch holds [IMG] tokens (id {self.vision.image_token_id}) but no images "
                                "were given with it: every [IMG] needs its image")
        return super().forward(input_ids, position_ids, attention_mask, labels, return_hidden, **kwargs)

    def image_features(self, images: list[torch.Tensor | RowImage]) -> torch.Tensor:
        """``[image tokens, hidden]``: frozen encoder, then the projector (the only part with gradients); a
        ``RowImage`` keeps only its features inside the row."""
        pixels = [image.pixels if isinstance(image, RowImage) else image for image in images]
        features = encode(self.vision_tower, pixels, self.vision.vision_feature_layer)
        projected = project(self.multi_modal_projector, features, [(p.shape[1], p.shape[2]) for p in pixels])
        return row_features(projected, images, self.vision)

    def embed_with_images(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          images: list[torch.Tensor | RowImage]) -> torch.Tensor:
        """Megatron's embedding output ``[s, b, h]`` (sequence-sharded under SP) with image features at ``[IMG]``."""
        if parallel_state.get_context_parallel_world_size() > 1:
            raise ConfigError("parallel.cp > 1 with images: context parallelism splits rows before image positions "
                              "are placed; use parallel.cp=1 for vision-language stages")
        features = self.image_features(images)
        check_image_count(input_ids, features.shape[0], self.vision, "a micro-batch")
        embeddings = self.embedding(input_ids=input_ids, position_ids=position_ids)
        is_image = input_ids == self.vision.image_token_id
        placed = embeddings.new_zeros(*input_ids.shape, embeddings.shape[-1])
        placed = placed.masked_scatter(is_image.unsqueeze(-1), features.to(embeddings.dtype)).transpose(0, 1)
        is_image = is_image.t().unsqueeze(-1)
        if self.config.sequence_parallel:
            placed = tensor_parallel.scatter_to_sequence_parallel_region(placed)
            is_image = is_image.chunk(parallel_state.get_tensor_model_parallel_world_size())[
                parallel_state.get_tensor_model_parallel_rank()]
        return torch.where(is_image, placed, embeddings)


def build_vision_language_model(text: MistralConfig, vision: VisionConfig, parallel: ParallelConfig,
                                dtype: torch.dtype = torch.float32,
                                speed: SpeedOptions | None = None) -> MistralVisionLanguageModel:
    """This rank's chunk: ``build_model`` with the encoder (random until loaded) and a fresh projector on stage 0."""
    model = build_model(text, parallel, dtype, speed=speed,
                        model_class=partial(MistralVisionLanguageModel, vision=vision, text=text))
    return model  # type: ignore[return-value]
