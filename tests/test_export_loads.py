"""Every Hugging Face directory we write loads in transformers (AutoModelForCausalLM) and gives our logits.

Which architecture an export gets: the parent's, except that a Llama model reshaped to a hidden size other than
heads x head_dim (SmolLM2 -> hidden 464 or 352 with 9 heads of 64) becomes MistralForCausalLM, whose config takes
head_dim explicitly (``MistralConfig.replace``); transformers' LlamaConfig refuses such a shape.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassClassValidationError

from nemo_plugins.bridges import config_to_hf
from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from recipes import prune as prune_recipe
from recipes._entry import compose_typed
from tests.conftest import tiny_config
from tests.hf_reference import assert_loads_with_our_logits, hf_model, hf_state

# Llama-shaped (3 heads x 16 = 48), SmolLM2's vocabulary: a child of hidden 32 is not a multiple of 3 heads.
LLAMA_PARENT = tiny_config(architecture="LlamaForCausalLM", num_attention_heads=3, num_kv_heads=1, vocab_size=49_152,
                           tie_embeddings=True, num_layers=3)


def hf_config_refuses(config) -> bool:
    """Whether transformers' own config class for ``config.architecture`` rejects its config.json."""
    hf = config_to_hf(config)
    cls = getattr(transformers, hf["architectures"][0].replace("ForCausalLM", "Config"))
    try:
        cls(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type", "torch_dtype")}).validate()
    except StrictDataclassClassValidationError:
        return True
    return False


def test_a_reshaped_llama_becomes_mistral_only_when_llama_cannot_carry_it():
    assert LLAMA_PARENT.llama_shaped()
    assert LLAMA_PARENT.replace(num_layers=2, ffn_hidden_size=64).architecture == "LlamaForCausalLM"  # FFN / depth only
    child = LLAMA_PARENT.replace(hidden_size=32)
    assert child.architecture == "MistralForCausalLM"
    assert hf_config_refuses(child.replace(architecture="LlamaForCausalLM")), "the shape Llama cannot carry"
    assert not hf_config_refuses(child)
    hf = config_to_hf(child)
    assert (hf["head_dim"], hf["sliding_window"], hf["tie_word_embeddings"]) == (16, None, True)
    assert "rope_scaling" not in hf and "attention_bias" not in hf
    explicit = child.replace(architecture="LlamaForCausalLM")
    assert explicit.architecture == "LlamaForCausalLM", "an explicit choice is kept"
    assert tiny_config(hidden_size=32).architecture == "MistralForCausalLM"


@pytest.fixture(scope="module")
def llama_parent(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llama") / "hf"
    return hf_io.write_model_dir(hf_state(hf_model(LLAMA_PARENT)), LLAMA_PARENT, out,
                                 extra_files=tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2"))))


def run_prune(parent: str, out: Path, *target: str) -> Path:
    overrides = [f"model.source={parent}", "model.architecture=null", *target,
                 "stage.prune.calibration.tokens=256", "stage.prune.calibration.seq_len=64",
                 "stage.prune.eval.seq_len=64", "stage.prune.eval.max_windows=1", f"output_dir={out}"]
    prune_recipe.run(compose_typed("prune", *overrides))
    return out


@pytest.mark.parametrize("hidden, ffn, architecture", [(32, 64, "MistralForCausalLM"), (48, 64, "LlamaForCausalLM")])
def test_prune_recipe_exports_load_in_transformers(llama_parent, tmp_path, hidden, ffn, architecture):
    out = run_prune(f"hf:{llama_parent}", tmp_path / "child", "stage.prune.target.num_layers=2",
                    f"stage.prune.target.hidden_size={hidden}", f"stage.prune.target.ffn_hidden_size={ffn}",
                    "stage.prune.target.tie_embeddings=true")
    checkpoint = megatron_checkpoint.read_config(out / "megatron")
    assert checkpoint.architecture == architecture and hf_io.read_config(out / "hf") == checkpoint
    assert assert_loads_with_our_logits(out / "hf", f"megatron:{out / 'megatron'}") == architecture


@pytest.mark.slow
def test_demo_child_of_the_real_parent_loads_in_transformers(tmp_path):
    """SmolLM2 (9 heads of 64) -> the demo's second child shape, hidden 464: written as Mistral, loads with our
    logits."""
    out = run_prune("embedded:smollm2", tmp_path / "child", "stage.prune.target.num_layers=26",
                    "stage.prune.target.hidden_size=464", "stage.prune.target.ffn_hidden_size=672",
                    "stage.prune.target.tie_embeddings=true")
    assert json.loads((out / "hf" / "config.json").read_text())["head_dim"] == 64
    assert assert_loads_with_our_logits(out / "hf", f"megatron:{out / 'megatron'}", length=24) == "MistralForCausalLM"


@pytest.mark.slow
def test_every_hf_directory_of_the_tiny_cascade_loads_in_transformers(tmp_path):
    """The tiny cascade of tests/test_cascade.py, from a Llama parent (as the demo's SmolLM2) to one child that Llama
    cannot carry: every HF directory it writes (the child after pruning, and after distill_long as Ministral 3).
    The ablations' and post-training's exports go through the same ``run_prune_stage`` / ``export_hf``."""
    import os
    import subprocess
    import sys

    from tests.test_cascade import TINY

    torch.manual_seed(0)
    config = LLAMA_PARENT.replace(num_layers=4)
    parent = hf_io.write_model_dir(hf_state(hf_model(config)), config, tmp_path / "parent" / "hf",
                                   extra_files=tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2"))))
    out = tmp_path / "cascade"
    overrides = [o for o in TINY if not o.startswith(("cascade.children=", "ablations="))] + [
        "cascade.children=[{name: a, num_layers: 3, hidden_size: 32, ffn_hidden_size: 80, tie_embeddings: true}]",
        "ablations=[]", "posttrain=false"]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CASCADE_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "recipes.cascade", f"model.source=hf:{parent}", *overrides,
                           f"output_dir={out}"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    written = sorted(p.parent for p in out.rglob("config.json") if list(p.parent.glob("*.safetensors")))
    assert [p.relative_to(out) for p in written] == [Path("a/hf"), Path("a/prune/hf")]
    classes = {}
    for directory in written:
        checkpoint = directory.parent / "megatron"
        classes[directory.parent.name] = assert_loads_with_our_logits(
            directory, f"megatron:{checkpoint}" if checkpoint.is_dir() else None, length=100)
    assert classes == {"a": "Ministral3ForCausalLM", "prune": "MistralForCausalLM"}
