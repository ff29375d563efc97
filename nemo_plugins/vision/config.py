"""Typed configuration of the vision part of a Mistral3ForConditionalGeneration model.

The encoder's own shape stays the Hugging Face ``vision_config`` mapping (it is handed to transformers'
``PixtralVisionConfig`` as is, so nothing of it can disagree with the released checkpoint); what the combined model
needs besides it (image token ids, the patch merge, which encoder layer feeds the projector) is typed here and
checked on construction; the Mistral3 bridge (``nemo_plugins.bridges.mistral3``) reads and writes its
``config.json`` keys. The ids default to Tekken's (``[IMG]`` = 10, ``[IMG_BREAK]`` = 12, ``[IMG_END]`` = 13,
mistral-common) only for configs built by hand; a checkpoint's ids are read from its tokenizer (``token_ids``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_plugins.errors import ConfigError

VISION_CONFIG_NAME = "vision_config.json"  # beside a megatron checkpoint's config.json: the model is vision-language
IMAGE_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
REQUIRED_VISION_KEYS = ("hidden_size", "patch_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class VisionConfig:
    """What joins a Pixtral encoder to a Mistral text model; ``encoder`` is the HF ``vision_config``."""

    encoder: dict[str, Any] = field(default_factory=dict)
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    spatial_merge_size: int = 2
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    projector_bias: bool = False

    def __post_init__(self) -> None:
        missing = [k for k in REQUIRED_VISION_KEYS if k not in self.encoder]
        if missing:
            raise ConfigError(f"vision.encoder (the HF vision_config) lacks {missing}: copy the parent's vision_config")
        if self.encoder.get("model_type", "pixtral") != "pixtral":
            raise ConfigError(f"vision.encoder.model_type={self.encoder['model_type']!r}: only Pixtral encoders are "
                              "supported (Mistral Small 3.1, Ministral 3)")
        ids = (self.image_token_id, self.image_break_token_id, self.image_end_token_id)
        if len(set(ids)) != 3 or min(ids) < 0:
            raise ConfigError(f"vision image token ids {ids} ([IMG], [IMG_BREAK], [IMG_END]) must be three distinct "
                              "non-negative ids")
        if not isinstance(self.spatial_merge_size, int) or self.spatial_merge_size < 1:
            raise ConfigError(f"vision.spatial_merge_size={self.spatial_merge_size!r} must be a positive integer")
        if not isinstance(self.vision_feature_layer, int):
            raise ConfigError(f"vision.vision_feature_layer={self.vision_feature_layer!r}: one layer index is "
                              "supported (the released Mistral3 models use -1)")

    @property
    def hidden_size(self) -> int:
        return int(self.encoder["hidden_size"])

    @property
    def patch_size(self) -> int:
        return int(self.encoder["patch_size"])

    @property
    def token_pixels(self) -> int:
        """Pixels per side of one image token: a ``spatial_merge_size``^2 block of patches becomes one token."""
        return self.patch_size * self.spatial_merge_size

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": dict(self.encoder), "image_token_id": self.image_token_id,
                "image_break_token_id": self.image_break_token_id, "image_end_token_id": self.image_end_token_id,
                "spatial_merge_size": self.spatial_merge_size, "vision_feature_layer": self.vision_feature_layer,
                "projector_hidden_act": self.projector_hidden_act, "projector_bias": self.projector_bias}


def token_ids(tokenizer_dir: str | Path, where: str) -> dict[str, int]:
    """``image_token_id`` / ``image_break_token_id`` / ``image_end_token_id`` as the tokenizer in ``tokenizer_dir``
    spells ``[IMG]`` / ``[IMG_BREAK]`` / ``[IMG_END]``: the ids text is tokenised with, never assumed."""
    from nemo_plugins.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(tokenizer_dir).get_vocab()
    missing = [token for token in IMAGE_TOKENS if token not in vocab]
    if missing:
        raise ConfigError(f"{where}: the tokenizer in {tokenizer_dir} has no {missing} token(s); a vision-language "
                          "model needs the tokenizer it was trained with (Tekken's image tokens)")
    return dict(zip(("image_token_id", "image_break_token_id", "image_end_token_id"),
                    (int(vocab[token]) for token in IMAGE_TOKENS)))


def check_token_ids(vision: VisionConfig, tokenizer_ids: dict[str, int], where: str) -> None:
    """The ids a config records must be the tokenizer's: features placed at another id would land on text."""
    recorded = {"image_token_id": vision.image_token_id, "image_break_token_id": vision.image_break_token_id,
                "image_end_token_id": vision.image_end_token_id}
    wrong = [f"{key.replace('_id', '')}: config {recorded[key]} vs tokenizer {tokenizer_ids[key]} ({token})"
             for key, token in zip(recorded, IMAGE_TOKENS) if recorded[key] != tokenizer_ids[key]]
    if wrong:
        raise ConfigError(f"{where}: image token ids disagree between the model config (image_token_index / "
                          f"{VISION_CONFIG_NAME}) and its tokenizer: {'; '.join(wrong)}; use the tokenizer the "
                          "checkpoint was released with")
