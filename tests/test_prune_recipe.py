"""recipes.prune end to end on a tiny model with the real tokenizer and real text."""

import json

import pytest

from nemo_plugins.convert import hf_io, megatron_checkpoint
from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from recipes import prune as prune_recipe
from recipes._entry import compose_typed
from tests.conftest import tiny_config
from tests.hf_reference import hf_model, hf_state


@pytest.fixture
def tiny_parent_with_tokenizer(tmp_path):
    """A tied toy parent with SmolLM2's vocabulary and tokenizer files."""
    config = tiny_config(vocab_size=49_152, tie_embeddings=True, num_layers=4)
    tokenizer = tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2")))
    return hf_io.write_model_dir(hf_state(hf_model(config)), config, tmp_path / "parent", extra_files=tokenizer)


def test_prune_recipe_writes_checkpoint_hf_dir_and_report(tiny_parent_with_tokenizer, tmp_path):
    out = tmp_path / "child"
    overrides = [
        f"model.source=hf:{tiny_parent_with_tokenizer}",
        "model.architecture=null",
        "stage.prune.target.num_layers=3",
        "stage.prune.target.hidden_size=32",
        "stage.prune.target.ffn_hidden_size=64",
        "stage.prune.target.tie_embeddings=true",
        "stage.prune.calibration.tokens=512",
        "stage.prune.calibration.seq_len=64",
        "stage.prune.eval.seq_len=64",
        "stage.prune.eval.max_windows=2",
        f"output_dir={out}",
    ]
    report = prune_recipe.run(compose_typed("prune", *overrides))
    child_config = megatron_checkpoint.read_config(out / "megatron")
    assert (child_config.num_layers, child_config.hidden_size, child_config.ffn_hidden_size) == (3, 32, 64)
    assert child_config.tie_embeddings, "tied parent -> tied child"
    assert hf_io.read_config(out / "hf") == child_config
    assert (out / "megatron" / "tokenizer" / "tokenizer.json").is_file()
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["parameters"]["child"] < saved["parameters"]["parent"]
    assert saved["perplexity"]["child"]["tokens"] == saved["perplexity"]["parent"]["tokens"] > 0
    for plot in ("layer_scores.png", "pca_explained.png", "ffn_scores.png"):
        assert (out / plot).stat().st_size > 1000
    assert report["layers"]["kept"] == saved["layers"]["kept"]


def test_prune_recipe_refuses_a_target_larger_than_the_parent(tiny_parent_with_tokenizer, tmp_path):
    from nemo_plugins.errors import ConfigError

    cfg = compose_typed("prune", f"model.source=hf:{tiny_parent_with_tokenizer}", "model.architecture=null",
                   "stage.prune.target.num_layers=5", f"output_dir={tmp_path}/x")
    with pytest.raises(ConfigError, match="prune.target.num_layers=5 must be between 1 and the parent's 4"):
        prune_recipe.run(cfg)
