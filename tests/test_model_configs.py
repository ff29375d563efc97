"""conf/model/*.yaml: valid shapes, Table 1 parameter counts, lossless config.json round trip."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from nemo_plugins.convert.sources import declared_architecture
from nemo_plugins.model.config import MistralConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NOMINAL_BILLIONS = {"mistral_small_3_1_24b": 24, "ministral3_14b": 14, "ministral3_8b": 8, "ministral3_3b": 3}


def load(name: str) -> MistralConfig:
    return declared_architecture(OmegaConf.load(CONF / f"{name}.yaml").architecture)


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_config_json_roundtrip(name):
    config = load(name)
    assert MistralConfig.from_hf(config.to_hf()) == config


@pytest.mark.parametrize("name, billions", sorted(NOMINAL_BILLIONS.items()))
def test_table1_shapes(name, billions):
    config = load(name)
    params = config.num_parameters() / 1e9
    print(f"{name}: {params:.2f}B parameters")
    assert 0.85 * billions <= params <= 1.2 * billions  # names round down (the 3B text model has 3.43B)
    config.check_parallel(8)  # one 8-GPU node of tensor parallelism divides every Ministral shape
    assert config.head_dim == 128 and config.num_kv_heads == 8


def test_ministral3_long_context_settings():
    config = load("ministral3_8b")
    assert config.rope_scaling.factor * config.rope_scaling.original_max_position_embeddings == config.max_position_embeddings == 262_144
    assert config.attention_temperature_beta == 0.1
    assert load("ministral3_3b").tie_embeddings and not load("ministral3_14b").tie_embeddings


def test_transformers_accepts_exported_ministral3_config():
    import transformers

    hf = load("ministral3_3b").to_hf()
    config = transformers.Ministral3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")})
    assert config.rope_parameters["llama_4_scaling_beta"] == 0.1
    assert config.head_dim == 128 and config.tie_word_embeddings
