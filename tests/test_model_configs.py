"""conf/model/*.yaml: valid shapes, exactly Table 1's, lossless config.json round trip."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_plugins.bridges import config_from_hf, config_to_hf
from nemo_plugins.model.config import MistralConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
# Table 1 of the paper (/work/shared/METHOD.md): layers, hidden, q heads, kv heads, head dim, FFN, vocabulary, tied
TABLE1 = {
    "mistral_small_3_1_24b": (40, 5120, 32, 8, 128, 32768, 131_072, False),
    "ministral3_14b": (40, 5120, 32, 8, 128, 16384, 131_072, False),
    "ministral3_8b": (34, 4096, 32, 8, 128, 14336, 131_072, False),
    "ministral3_3b": (26, 3072, 32, 8, 128, 9216, 131_072, True),
}


def load(name: str) -> MistralConfig:
    return MistralConfig.from_dict(OmegaConf.load(CONF / f"{name}.yaml").architecture)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_config_json_roundtrip(name):
    config = load(name)
    assert config_from_hf(config_to_hf(config)) == config


@pytest.mark.parametrize("name, shape", sorted(TABLE1.items()))
def test_table1_shapes(name, shape):
    config = load(name)
    assert (config.num_layers, config.hidden_size, config.num_attention_heads, config.num_kv_heads, config.head_dim,
            config.ffn_hidden_size, config.vocab_size, config.tie_embeddings) == shape
    print(f"{name}: {config.num_parameters() / 1e9:.2f}B parameters")
    config.check_parallel(8)  # one 8-GPU node of tensor parallelism divides every Ministral shape


def test_ministral3_long_context_settings():
    config = load("ministral3_8b")
    scaling = config.rope_scaling
    assert scaling.factor * scaling.original_max_position_embeddings == config.max_position_embeddings == 262_144
    assert config.attention_temperature_beta == 0.1
    assert load("ministral3_3b").tie_embeddings and not load("ministral3_14b").tie_embeddings


def test_transformers_accepts_exported_ministral3_config():
    import transformers

    hf = config_to_hf(load("ministral3_3b"))
    not_arguments = ("architectures", "model_type", "torch_dtype")
    config = transformers.Ministral3Config(**{k: v for k, v in hf.items() if k not in not_arguments})
    assert config.rope_parameters["llama_4_scaling_beta"] == 0.1
    assert config.head_dim == 128 and config.tie_word_embeddings
