"""The Hugging Face bridge of the Mistral3 multimodal family (``Mistral3ForConditionalGeneration``: Mistral Small
3.1, the Ministral 3 releases): a Mistral text model, a Pixtral vision tower and a projector.

Its text model is the text family's (``text_config``, read and written by the text bridge); this module holds what
the family adds: where the text tensors are stored (two layouts, see ``TEXT_PREFIXES``), the vision tower's and
projector's tensor prefixes, and the config keys that join the vision part to the text model (``VisionConfig``).
"""

from __future__ import annotations

from typing import Any, Mapping

from nemo_plugins.bridges.mistral import MistralBridge
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from nemo_plugins.vision.config import VisionConfig

ARCHITECTURE = "Mistral3ForConditionalGeneration"
MODEL_TYPE = "mistral3"
# stored prefix -> CausalLM prefix of the text tensors: ``language_model.model.*`` / ``language_model.lm_head.*`` as
# released and as transformers 5.x saves by default; ``model.language_model.*`` / ``lm_head.*`` as it saves with
# ``save_original_format=False``
TEXT_PREFIXES = {
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "model.language_model.": "model.",
    "lm_head.": "lm_head.",
}
EXPORT_TEXT_PREFIX = "language_model."  # a CausalLM name under it is the released name
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")  # released names of the encoder's / projector's tensors
UNRELEASED_PREFIX = "model."  # what transformers' other layout puts before them


class Mistral3Bridge:
    """HF config and tensor names of Mistral3ForConditionalGeneration checkpoints."""

    architectures = (ARCHITECTURE,)
    vision_prefixes = VISION_PREFIXES

    def __init__(self, text: MistralBridge):
        self.text = text

    # ------------------------------------------------------------------------------------- config.json
    def text_config(self, hf: Mapping[str, Any]) -> MistralConfig:
        """The text model's config, read by the text bridge from ``text_config``.

        Its architecture follows ``text_config.model_type``: Mistral Small 3.1 24B is ``mistral`` (a plain Mistral,
        rope_theta 1e9, no YaRN), the Ministral 3 children are ``ministral3`` (YaRN + ``llama_4_scaling_beta``).
        Tying comes from ``text_config.tie_word_embeddings`` (default False), never the outer flag: transformers
        5.x defaults the outer one to True, which would discard the 24B's real ``lm_head``.
        """
        text = dict(hf.get("text_config") or {})
        if not text:
            raise ConfigError(f"config.json declares {ARCHITECTURE} but has no text_config")
        model_type = text.get("model_type", "mistral")
        by_type = {t: a for a, t in self.text.architectures.items()}
        if model_type not in by_type:
            raise ConfigError(f"text_config.model_type={model_type!r} is not one of {sorted(by_type)}")
        for key in ("bos_token_id", "eos_token_id"):
            if key not in text and key in hf:
                text[key] = hf[key]
        return self.text.text_config({**text, "architectures": [by_type[model_type]],
                                      "tie_word_embeddings": text.get("tie_word_embeddings", False)})

    def vision_config(self, hf: Mapping[str, Any], **token_ids: int) -> VisionConfig:
        """The vision part of a Mistral3 ``config.json`` (``token_ids``: ``image_break_token_id`` /
        ``image_end_token_id``, which live in the tokenizer, not the config)."""
        if "vision_config" not in hf:
            raise ConfigError(f"a {ARCHITECTURE} config needs vision_config; this one has {sorted(hf)}")
        return VisionConfig(encoder=dict(hf["vision_config"]), image_token_id=int(hf.get("image_token_index", 10)),
                            spatial_merge_size=int(hf.get("spatial_merge_size", 2)),
                            vision_feature_layer=hf.get("vision_feature_layer", -1),
                            projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
                            projector_bias=bool(hf.get("multimodal_projector_bias", False)), **token_ids)

    def vision_part(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        """A Mistral3 ``config.json`` without its text model: what travels with the vision tensors."""
        return {k: v for k, v in hf.items() if k != "text_config"}

    def config_to_hf(self, text: MistralConfig, vision: VisionConfig) -> dict[str, Any]:
        """The Mistral3 ``config.json`` of ``vision`` on ``text``'s language model."""
        text_config = {k: v for k, v in self.text.config_to_hf(text).items()
                       if k not in ("architectures", "torch_dtype")}
        return {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "text_config": text_config,
                "vision_config": dict(vision.encoder), "image_token_index": vision.image_token_id,
                "spatial_merge_size": vision.spatial_merge_size, "vision_feature_layer": vision.vision_feature_layer,
                "projector_hidden_act": vision.projector_hidden_act,
                "multimodal_projector_bias": vision.projector_bias, "tie_word_embeddings": text.tie_embeddings}

    # ------------------------------------------------------------------------------------- tensors
    def text_tensor_name(self, stored: str) -> str | None:
        """The CausalLM name of a stored text tensor; None for the vision tower's and projector's."""
        if stored.removeprefix(UNRELEASED_PREFIX).startswith(VISION_PREFIXES):
            return None
        for prefix, canonical in TEXT_PREFIXES.items():
            if stored.startswith(prefix):
                return canonical + stored[len(prefix):]
        return stored

    def vision_tensor_name(self, stored: str) -> str:
        """The released name of a stored vision tower / projector tensor."""
        return stored.removeprefix(UNRELEASED_PREFIX)

    def export_name(self, text_name: str) -> str:
        """Where an export stores the text tensor of CausalLM name ``text_name`` (the released layout)."""
        return EXPORT_TEXT_PREFIX + text_name
