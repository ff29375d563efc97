"""The Hugging Face bridge registry: every registered architecture resolves, others are refused by name; each
family's config.json round-trips through MistralConfig; each family's tensor names are exactly those transformers
creates (and llama.cpp stores), so a missing or misspelt name in a bridge fails here."""

import pytest
import torch
import transformers
from gguf import GGUFReader
from safetensors import safe_open

from nemo_plugins.bridges import (
    BRIDGES,
    MISTRAL,
    MISTRAL3,
    bridge_for,
    config_from_hf,
    config_to_hf,
    gguf_bridge,
    multimodal_bridge,
    supported,
    text_bridge,
)
from nemo_plugins.convert.gguf_reader import metadata_value
from nemo_plugins.convert.mapping import hf_layout, hf_shape
from nemo_plugins.convert.sources import embedded_gguf
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig, YarnScaling
from nemo_plugins.vision.config import VisionConfig
from nemo_plugins.vision.model import MistralVisionLanguageModel
from tests.conftest import tiny_config

TEXT_CONFIGS = {
    "MistralForCausalLM": tiny_config(),
    "LlamaForCausalLM": tiny_config(architecture="LlamaForCausalLM", hidden_size=64, tie_embeddings=True),
    "Ministral3ForCausalLM": tiny_config(architecture="Ministral3ForCausalLM", tie_embeddings=True,
                                         rope_scaling=YarnScaling(factor=4.0, original_max_position_embeddings=16),
                                         attention_temperature_beta=0.1),
}
VISION = VisionConfig(encoder=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, head_dim=16, image_size=56, patch_size=14),
                      image_token_id=5, image_break_token_id=6, image_end_token_id=7)


def test_every_supported_architecture_resolves():
    assert supported() == sorted(["MistralForCausalLM", "LlamaForCausalLM", "Ministral3ForCausalLM",
                                  "Mistral3ForConditionalGeneration"])
    for architecture in supported():
        assert bridge_for({"architectures": ["SomethingElse", architecture]}) is BRIDGES[architecture]
    assert {a: text_bridge(a) for a in MISTRAL.architectures} == {a: MISTRAL for a in TEXT_CONFIGS}
    assert multimodal_bridge({"architectures": ["Mistral3ForConditionalGeneration"]}) is MISTRAL3
    assert multimodal_bridge({"architectures": ["MistralForCausalLM"]}) is None
    assert gguf_bridge("llama", "x.gguf") is MISTRAL


def test_unknown_architectures_are_refused_by_name_with_the_supported_list():
    supported_list = str(supported()).replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ConfigError, match=rf"unsupported architecture \['GPT2LMHeadModel'\].*{supported_list}"):
        bridge_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ConfigError, match=r"unsupported architecture 'gpt2'"):
        bridge_for({"model_type": "gpt2"})
    with pytest.raises(ConfigError, match=r"model\.architecture='Mistral3ForConditionalGeneration' is not one of"):
        text_bridge("Mistral3ForConditionalGeneration")
    with pytest.raises(ConfigError, match=r"model\.architecture='GPT2LMHeadModel' is not one of \['LlamaForCausalLM'"):
        tiny_config(architecture="GPT2LMHeadModel")
    with pytest.raises(ConfigError, match=r"x\.gguf: GGUF architecture 'qwen2' is not supported.*'llama'"):
        gguf_bridge("qwen2", "x.gguf")
    with pytest.raises(ConfigError, match=r"text_config\.model_type='qwen2' is not one of"):
        config_from_hf({"architectures": ["Mistral3ForConditionalGeneration"], "text_config": {"model_type": "qwen2"}})


@pytest.mark.parametrize("architecture", sorted(TEXT_CONFIGS))
def test_text_config_round_trips(architecture):
    config = TEXT_CONFIGS[architecture]
    hf = MISTRAL.config_to_hf(config)
    assert hf["architectures"] == [architecture] and hf["model_type"] == MISTRAL.architectures[architecture]
    assert config_from_hf(hf) == config and config_to_hf(config) == hf


def test_mistral3_config_round_trips():
    text = TEXT_CONFIGS["Ministral3ForCausalLM"]
    hf = MISTRAL3.config_to_hf(text, VISION)
    assert hf["architectures"] == ["Mistral3ForConditionalGeneration"]
    assert hf["text_config"]["model_type"] == "ministral3"
    assert config_from_hf(hf) == text and MISTRAL3.config_to_hf(text, VISION) == hf
    assert MISTRAL3.vision_config(hf, image_break_token_id=6, image_end_token_id=7) == VISION
    assert "text_config" not in MISTRAL3.vision_part(hf)


def test_a_llama_reshaped_off_heads_times_head_dim_exports_as_mistral():
    llama = TEXT_CONFIGS["LlamaForCausalLM"]
    assert llama.replace(num_layers=1).architecture == "LlamaForCausalLM"
    assert llama.replace(hidden_size=48).architecture == "MistralForCausalLM"
    assert llama.replace(hidden_size=48, architecture="LlamaForCausalLM").architecture == "LlamaForCausalLM"


def _text_model(config: MistralConfig) -> torch.nn.Module:
    hf = MISTRAL.config_to_hf(config)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in hf.items() if k != "torch_dtype"})
    return getattr(transformers, config.architecture)(hf_config)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("architecture", sorted(TEXT_CONFIGS))
def test_text_mapping_covers_exactly_what_transformers_creates(architecture, tied):
    config = TEXT_CONFIGS[architecture].replace(tie_embeddings=tied)
    model = _text_model(config)
    created = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if tied:  # transformers lists the tied lm_head among its tensors; it is not stored (nor mapped)
        assert created.pop("lm_head.weight") == created["model.embed_tokens.weight"]
    assert created == {name: hf_shape(name, config) for name in hf_layout(config)}


def _stored_names(model_dir) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("tied", [False, True])
def test_mistral3_names_cover_exactly_what_transformers_stores(tied, tmp_path):
    text = TEXT_CONFIGS["MistralForCausalLM"].replace(tie_embeddings=tied)
    hf_config = transformers.Mistral3Config(**{k: v for k, v in MISTRAL3.config_to_hf(text, VISION).items()
                                               if k not in ("architectures", "model_type")})
    model = transformers.Mistral3ForConditionalGeneration(hf_config)
    layouts = {}
    for released in (True, False):  # the released layout, and transformers' own
        model.save_pretrained(tmp_path / str(released), save_original_format=released)
        layouts[released] = _stored_names(tmp_path / str(released))
    vision = {released: {n for n in stored if MISTRAL3.text_tensor_name(n) is None}
              for released, stored in layouts.items()}
    for released, stored in layouts.items():
        assert {MISTRAL3.text_tensor_name(n) for n in stored - vision[released]} == set(hf_layout(text))
        assert {MISTRAL3.vision_tensor_name(n) for n in vision[released]} == vision[True]
    assert {MISTRAL3.export_name(n) for n in hf_layout(text)} == layouts[True] - vision[True]
    assert vision[True] and all(n.startswith(MISTRAL3.vision_prefixes) for n in vision[True])
    assert MistralVisionLanguageModel.non_text_prefixes == MISTRAL3.vision_prefixes  # our model's own names


def test_gguf_names_cover_exactly_the_hf_layout():
    reader = GGUFReader(embedded_gguf("smollm2"))
    bridge = gguf_bridge(metadata_value(reader, "general.architecture"), "smollm2")
    names = [t.name for t in reader.tensors]
    config = bridge.gguf_config(lambda key, default=None: metadata_value(reader, key, default), set(names))
    assert {bridge.gguf_tensor_name(n) for n in names} == set(hf_layout(config))
    assert bridge.gguf_rotary_heads("model.layers.0.self_attn.k_proj.weight", config) == config.num_kv_heads
    assert bridge.gguf_rotary_heads("model.layers.0.self_attn.v_proj.weight", config) is None
    with pytest.raises(ConfigError, match="unexpected tensor 'blk.0.attn_qkv.weight'"):
        bridge.gguf_tensor_name("blk.0.attn_qkv.weight")
