"""recipes.convert both ways through a megatron dist checkpoint is bitwise lossless; bad input is named."""

import json

import pytest
import torch

from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.errors import ConfigError
from recipes import convert
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


@pytest.fixture
def tiny_hf_dir(tmp_path):
    config = tiny_config(tie_embeddings=False)
    state = hf_state(hf_model(config))
    return hf_io.write_model_dir(state, config, tmp_path / "hf"), state


def test_hf_to_megatron_to_hf_is_bitwise(tiny_hf_dir, tmp_path):
    src, state = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    assert megatron_checkpoint.read_config(tmp_path / "meg") == hf_io.read_config(src)
    convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "back")]))
    back = hf_io.read_state(tmp_path / "back")
    assert sorted(back) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not list(tmp_path.glob(".*partial")), "no temp dir left behind"


def test_missing_shard_is_named(tiny_hf_dir, tmp_path):
    src, state = tiny_hf_dir
    sharded = hf_io.write_model_dir(state, hf_io.read_config(src), tmp_path / "sharded", max_shard_bytes=20_000)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ConfigError, match=victim.name):
        hf_io.read_state(sharded)


def test_corrupt_shard_is_named(tiny_hf_dir):
    src, _ = tiny_hf_dir
    shard = src / hf_io.SINGLE_NAME
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        hf_io.read_state(src)


def test_missing_megatron_shard_is_reported(tiny_hf_dir, tmp_path):
    src, _ = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    weights = tmp_path / "meg" / megatron_checkpoint.WEIGHTS_DIR
    for data_file in weights.glob("*.distcp"):
        data_file.unlink()
    with pytest.raises(ConfigError, match="cannot load checkpoint shards"):
        convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "x")]))


def test_checkpoint_from_newer_megatron_is_named(tiny_hf_dir, tmp_path):
    from nemo_plugins.convert.megatron_checkpoint import _megatron_version

    if _megatron_version() >= (0, 19):
        pytest.skip("megatron-core >= 0.19 reads both layouts")
    src, _ = tiny_hf_dir
    convert.run(convert.parse_args(["--src", f"hf:{src}", "--to-megatron", str(tmp_path / "meg")]))
    (tmp_path / "meg" / megatron_checkpoint.WEIGHTS_DIR / "common.pt").unlink()
    with pytest.raises(ConfigError, match="megatron-core >= 0.19"):
        convert.run(convert.parse_args(["--src", f"megatron:{tmp_path / 'meg'}", "--to-hf", str(tmp_path / "x")]))
