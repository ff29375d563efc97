"""Bad input fails early with one line that names the problem and what to do."""

import pytest
import torch

from nemo_plugins.bridges import config_from_hf
from nemo_plugins.convert.mapping import hf_to_megatron
from nemo_plugins.convert.sources import ModelSource, check_declared
from nemo_plugins.data.tokenizer import check_vocab
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.config import MistralConfig
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


def test_unknown_architecture_in_config_json():
    with pytest.raises(ConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        config_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_tensor_shape_mismatch_names_tensor_and_shapes():
    config = tiny_config()
    state = hf_state(hf_model(config))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 48)
    with pytest.raises(ConfigError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(95, 48\).*\(96, 48\)"):
        hf_to_megatron(state, config)


def test_missing_tensor_is_named():
    config = tiny_config()
    state = hf_state(hf_model(config))
    del state["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConfigError, match="k_proj"):
        hf_to_megatron(state, config)


@pytest.mark.parametrize(
    "changes, tp, key",
    [
        ({"num_attention_heads": 9, "num_kv_heads": 1}, 2, "num_attention_heads"),
        ({"num_attention_heads": 4, "num_kv_heads": 1}, 2, "num_kv_heads"),
        ({"vocab_size": 129}, 2, "vocab_size"),
    ],
)
def test_tensor_parallel_must_divide(changes, tp, key):
    with pytest.raises(ConfigError, match=f"parallel.tp={tp} does not divide model.{key}"):
        tiny_config(**changes).check_parallel(tp)


def test_pipeline_parallel_must_divide_layers():
    with pytest.raises(ConfigError, match="parallel.pp=3"):
        tiny_config(num_layers=4).check_parallel(1, 3)


def test_world_size_must_fit_layout():
    with pytest.raises(ConfigError, match="world size 3"):
        ParallelConfig(tp=2).data_parallel_size(3)


def test_tokenizer_vocab_must_match_model():
    class FakeTokenizer:
        def __len__(self):
            return 131_072

    with pytest.raises(ConfigError, match="tokenizer has 131072 tokens but the model's vocab_size is 49152"):
        check_vocab(FakeTokenizer(), tiny_config(vocab_size=49_152))


def test_gqa_groups_must_be_whole():
    with pytest.raises(ConfigError, match="not a multiple of model.num_kv_heads"):
        tiny_config(num_attention_heads=6, num_kv_heads=4)


def test_unknown_config_key_is_named():
    with pytest.raises(ConfigError, match="model.architecture.hidden_dim"):
        MistralConfig.from_dict({**tiny_config().to_dict(), "hidden_dim": 3})


def test_bad_source_string():
    with pytest.raises(ConfigError, match="<kind>:<location>"):
        ModelSource.parse("/just/a/path")


def test_declared_architecture_must_match_weights():
    with pytest.raises(ConfigError, match="model.architecture.num_layers: config says 2, .* has 3"):
        check_declared(tiny_config(), tiny_config(num_layers=3), "hf:/x")


def test_misspelt_stage_key_is_named():
    from nemo_plugins.config.build import build
    from nemo_plugins.prune.pipeline import PruneOptions

    with pytest.raises(ConfigError,
                       match=r"^stage.prune.options.layer_metod: unknown key \(allowed here: layer_method,"):
        build(PruneOptions, {"layer_metod": "random"}, "stage.prune.options")
    with pytest.raises(ConfigError, match=r"^stage.prune.options.layer_method: Invalid value 'norm'"):
        build(PruneOptions, {"layer_method": "norm"}, "stage.prune.options")
