"""NeMo 2 checkpoints read without NeMo: our model filled from a checkpoint NeMo itself wrote
(``tests/assets/nemo2_tiny``, made by ``tests/assets/make_nemo2_tiny.py``) computes NeMo's logits."""

import copy
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nemo_plugins.convert import nemo2
from nemo_plugins.data.tokenizer import load_tokenizer
from nemo_plugins.distributed import ParallelConfig, initialize
from nemo_plugins.errors import CheckpointError, ConfigError
from nemo_plugins.model.builder import build_model
from nemo_plugins.model.config import MistralConfig
from tests import distributed_worker

FIXTURE = Path(__file__).parent / "assets" / "nemo2_tiny"
REFERENCE = load_file(FIXTURE / "reference.safetensors")


def _nemo_model(parallel: ParallelConfig = ParallelConfig()):
    config = nemo2.read_config(FIXTURE)
    model = build_model(config, parallel).eval()
    nemo2.load_weights(model, FIXTURE)
    return model


def _logits(model) -> torch.Tensor:
    ids = REFERENCE["input_ids"]
    with torch.no_grad():
        return model(ids, torch.arange(ids.shape[1]).unsqueeze(0))


def test_config_is_the_imported_llama():
    assert nemo2.read_config(FIXTURE) == MistralConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=64,
        vocab_size=128, rms_norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False, max_position_embeddings=256,
        architecture="LlamaForCausalLM", bos_token_id=1, eos_token_id=2,
    )


def test_logits_equal_nemos():
    model = _nemo_model()
    norms = torch.stack([layer.input_layernorm.weight for layer in model.decoder.layers])
    assert (norms - 1).abs().max() > 0.5, "the fixture's per-layer norms must be far from their initial 1.0"
    assert (_logits(model) - REFERENCE["nemo_logits"]).abs().max().item() <= 1e-4


def test_tokenizer_gives_nemos_ids():
    tokenizer = load_tokenizer(nemo2.tokenizer_dir(FIXTURE))
    ids = tokenizer(_prompt(), add_special_tokens=False)["input_ids"]
    assert ids == REFERENCE["input_ids"][0].tolist()


def _prompt() -> str:
    from safetensors import safe_open

    with safe_open(FIXTURE / "reference.safetensors", "pt") as f:
        return f.metadata()["prompt"]


def _yaml_config() -> dict:
    return copy.deepcopy(nemo2.read_model_yaml(FIXTURE)["config"])


@pytest.mark.parametrize("change, named", [
    ({"_target_": "nemo.collections.llm.gpt.model.qwen2.Qwen2Config"}, "Qwen2Config"),
    ({"scale_factor": 8.0}, "scale_factor"),
    ({"add_qkv_bias": True}, "add_qkv_bias"),
    ({"window_size": [4096, 0]}, "window_size"),
    ({"normalization": "LayerNorm"}, "normalization"),
    ({"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}}, "activation_func"),
])
def test_other_architectures_are_refused_by_name(change, named):
    config = {**_yaml_config(), **change}
    with pytest.raises(ConfigError, match=named):
        nemo2.to_mistral_config(config, 128, 1, 2, "model.yaml")


def test_a_field_left_out_reads_as_megatrons_default():
    config = _yaml_config()
    del config["gated_linear_unit"]  # megatron's default is False: not a SwiGLU model
    with pytest.raises(ConfigError, match="gated_linear_unit"):
        nemo2.to_mistral_config(config, 128, 1, 2, "model.yaml")


def test_planted_pickle_is_refused_before_it_runs(tmp_path):
    ckpt = Path(shutil.copytree(FIXTURE, tmp_path / "ckpt"))

    class Planted:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    torch.save({"state_dict": Planted()}, ckpt / "weights" / "common.pt")
    model = build_model(nemo2.read_config(ckpt), ParallelConfig())
    with pytest.raises(CheckpointError, match="common.pt"):
        nemo2.load_weights(model, ckpt)
    assert not (tmp_path / "ran").exists()


def test_a_model_the_checkpoint_does_not_hold_is_named():
    config = nemo2.read_config(FIXTURE).replace(num_layers=3)
    with pytest.raises(CheckpointError, match=r"stored with shape \(2, 32\), the model expects \(3, 32\)"):
        nemo2.load_weights(build_model(config, ParallelConfig()), FIXTURE)


def test_keys_without_prefix_and_bf16_weights_load_into_fp32(tmp_path):
    """Megatron-Bridge writes the model's keys unprefixed (as our own writer does) and users' weights are bf16."""
    from nemo_plugins.convert import megatron_checkpoint
    from tests.conftest import tiny_config

    config = tiny_config()
    saved = build_model(config, ParallelConfig(), torch.bfloat16)
    megatron_checkpoint.save_model(saved, config, tmp_path / "ckpt")
    loaded = build_model(config, ParallelConfig(), torch.float32)
    nemo2.load_sharded(loaded, tmp_path / "ckpt" / megatron_checkpoint.WEIGHTS_DIR)
    state = loaded.state_dict()
    for name, tensor in saved.state_dict().items():
        if not name.endswith("_extra_state"):
            assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor.float()), name


def test_not_a_nemo_checkpoint_is_named(tmp_path):
    with pytest.raises(ConfigError, match="model.yaml"):
        nemo2.read_config(tmp_path)


def _tp_logits(out: str) -> None:
    parallel = ParallelConfig(tp=2)
    initialize(parallel)
    from megatron.core import tensor_parallel

    logits = tensor_parallel.gather_from_tensor_model_parallel_region(_logits(_nemo_model(parallel)))
    if torch.distributed.get_rank() == 0:
        torch.save(logits, out)


@pytest.mark.distributed
def test_tensor_parallel_2_load_equals_1(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "tp2.pt"
    mp.spawn(distributed_worker.run, args=(2, port, _tp_logits, (str(out),)), nprocs=2, join=True)
    assert (torch.load(out) - _logits(_nemo_model())).abs().max().item() <= 1e-5


def test_convert_recipe_exports_nemos_model(tmp_path):
    from recipes import convert

    convert.run(convert.parse_args(["--src", f"nemo2:{FIXTURE}", "--to-hf", str(tmp_path / "hf")]))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(REFERENCE["input_ids"]).logits
    assert (logits - REFERENCE["nemo_logits"]).abs().max().item() <= 1e-4
    assert load_tokenizer(tmp_path / "hf").get_vocab() == load_tokenizer(nemo2.tokenizer_dir(FIXTURE)).get_vocab()
