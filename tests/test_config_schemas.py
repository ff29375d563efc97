"""The recipes' structured configs: every config group rejects a misspelt key and a value of the wrong type with
the key's full path, in one line, before any work; the entry point prints it as a ConfigError (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemo_plugins.config.schemas import SCHEMAS, CascadeConfig
from nemo_plugins.errors import ConfigError
from recipes._entry import ERROR_EXIT_CODE
from tests.configs import composed
from tests.recipe_runs import recipe_env

# (recipe, a key of each config group, a value of the wrong type for it)
GROUP_KEYS = [
    ("cascade", "model.architecture.num_layers", "many"),
    ("cascade", "data.heldout_fraction", "some"),
    ("cascade", "data.sources[0].weight", "heavy"),
    ("cascade", "chat_data.heldout_fraction", "some"),
    ("cascade", "pairs.sampling.samples", "two"),
    ("cascade", "stage.prune.calibration.tokens", "lots"),
    ("cascade", "stage.distill_short.train.seq_len", "1k"),
    ("cascade", "stage.distill_long.context.yarn_factor", "big"),
    ("cascade", "stage.sft_kd.kl.temperature", "hot"),
    ("cascade", "stage.pwrm.calibration.bins", "ten"),
    ("cascade", "stage.odpo.dpo.beta", "small"),
    ("cascade", "stage.grpo_stem.loss.eps_low", "low"),
    ("cascade", "parallel.tp", "two"),
    ("cascade", "cluster.nodes", "four"),
    ("cascade", "cascade.children[0].num_layers", "many"),
    ("cascade", "token_scale", "double"),
    ("prune", "stage.prune.target.hidden_size", "wide"),
    ("distill", "stage.distill.optimizer.lr", "fast"),
    ("sft", "stage.sft_kd.train.global_batch_size", "big"),
    ("pwrm", "stage.pwrm.score_micro_batch_size", "four"),
    ("odpo", "stage.odpo.sampling.temperature", "warm"),
    ("grpo", "stage.grpo.sampling.group_size", "eight"),
    ("evaluate", "humaneval.samples", "one"),
    ("tokenize", "workers", "all"),
]


def _misspelt(key: str) -> str:
    """``key`` with its last part misspelt (``a.b.seq_len`` -> ``a.b.seq_lenx``)."""
    return key + "x"


@pytest.mark.parametrize("recipe,key,_", GROUP_KEYS, ids=[f"{r}:{k}" for r, k, _ in GROUP_KEYS])
def test_a_misspelt_key_is_named_with_its_full_path(recipe, key, _):
    misspelt = _misspelt(key)
    if "[" in key:  # inside a list: the override replaces the list's item
        pytest.skip("list items are checked by the wrong-type case and test_cascade's children case")
    for override in (f"{misspelt}=1", f"+{misspelt}=1"):  # + adds past the schema: refused all the same
        with pytest.raises(ConfigError, match=rf"^{misspelt.replace('.', '[.]')}: unknown key \(allowed here: "):
            composed(recipe, override)


@pytest.mark.parametrize("recipe,key,value", GROUP_KEYS, ids=[f"{r}:{k}" for r, k, _ in GROUP_KEYS])
def test_a_value_of_the_wrong_type_is_named_with_its_full_path(recipe, key, value):
    if "[" in key:  # a list item: replace the whole list, with the bad value in its first item
        group, field = key.split("[0].")
        current = composed(recipe)
        for part in group.split("."):
            current = getattr(current, part)
        item = {**{k: v for k, v in vars(current[0]).items()}, field: value}
        rendered = ", ".join(f"{k}: {list(v) if isinstance(v, list) else v}" for k, v in item.items())
        override = f"{group}=[{{{rendered}}}]"
    else:
        override = f"{key}={value}"
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]').replace('[0]', '.*')}: .*'{value}'"):
        composed(recipe, override)


def test_every_recipe_composes_to_its_schema():
    for name, schema in SCHEMAS.items():
        assert type(composed(name)) is schema, name
    tokenize = composed("tokenize")
    assert isinstance(tokenize, CascadeConfig), "tokenize prepares the cascade's data: its config extends it"


def test_one_dtype_setting_decides_every_stage_precision():
    cfg = composed("cascade", "dtype=bfloat16")
    stages = [getattr(cfg.stage, name) for name in ("distill_short", "distill_long", "sft_kd", "pwrm", "odpo",
                                                    "reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning")]
    assert {s.train.precision for s in stages} == {"bfloat16"}
    assert {s.train.precision for s in (getattr(composed("cascade").stage, s.name) for s in stages)} == {"float32"}


@pytest.mark.slow
def test_the_cli_prints_a_schema_error_as_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "recipes.distill", "student=x", "stage.distill.optimizer.lrr=1",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], env=recipe_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == ERROR_EXIT_CODE
    errors = [line for line in done.stderr.splitlines() if "Error" in line and "Warning" not in line]
    assert errors == ["ConfigError: stage.distill.optimizer.lrr: unknown key (allowed here: lr, min_lr, weight_decay, "
                      "adam_beta1, adam_beta2, adam_eps, clip_grad, warmup_fraction, decay_style, wsd_decay_fraction)"]
    assert "Traceback" not in done.stderr and not (tmp_path / "hydra").exists()
