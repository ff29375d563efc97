"""The recipes' structured configs: every config group rejects a misspelt key and a value of the wrong type with
the key's full path, in one line, before any work; the entry point prints it as a ConfigError (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nemo_plugins.config.schemas import SCHEMAS, CascadeConfig
from nemo_plugins.errors import ConfigError
from recipes._entry import ERROR_EXIT_CODE, compose_typed
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


def _list_item_override(recipe: str, key: str, changes: dict) -> str:
    """An override of the list holding ``key`` (``group[0].field``): the list replaced by its first item with
    ``changes`` (an override cannot address one item)."""
    group = key.split("[0].")[0]
    current = compose_typed(recipe)
    for part in group.split("."):
        current = getattr(current, part)
    item = {**vars(current[0]), **changes}
    rendered = ", ".join(f"{k}: {list(v) if isinstance(v, list) else v}" for k, v in item.items())
    return f"{group}=[{{{rendered}}}]"


@pytest.mark.parametrize("recipe,key,_", GROUP_KEYS, ids=[f"{r}:{k}" for r, k, _ in GROUP_KEYS])
def test_a_misspelt_key_is_named_with_its_full_path(recipe, key, _):
    misspelt = key + "x"
    if "[" in key:  # a list item: the list replaced by its item with the misspelt key added
        group, field = key.split("[0].")
        overrides = [_list_item_override(recipe, key, {f"{field}x": 1})]
        pattern = rf"^{group.replace('.', '[.]')}.*{field}x: unknown key \(allowed here: "
    else:  # + adds past the schema: refused all the same
        overrides = [f"{misspelt}=1", f"+{misspelt}=1"]
        pattern = rf"^{misspelt.replace('.', '[.]')}: unknown key \(allowed here: "
    for override in overrides:
        with pytest.raises(ConfigError, match=pattern):
            compose_typed(recipe, override)


@pytest.mark.parametrize("recipe,key,value", GROUP_KEYS, ids=[f"{r}:{k}" for r, k, _ in GROUP_KEYS])
def test_a_value_of_the_wrong_type_is_named_with_its_full_path(recipe, key, value):
    if "[" in key:  # a list item: the list replaced by its item with the bad value
        override = _list_item_override(recipe, key, {key.split("[0].")[1]: value})
    else:
        override = f"{key}={value}"
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]').replace('[0]', '.*')}: .*'{value}'"):
        compose_typed(recipe, override)


def test_every_recipe_composes_to_its_schema():
    for name, schema in SCHEMAS.items():
        assert type(compose_typed(name)) is schema, name
    tokenize = compose_typed("tokenize")
    assert isinstance(tokenize, CascadeConfig), "tokenize prepares the cascade's data: its config extends it"


def test_one_dtype_setting_decides_every_stage_precision():
    cfg = compose_typed("cascade", "dtype=bfloat16")
    stages = [getattr(cfg.stage, name) for name in ("distill_short", "distill_long", "sft_kd", "pwrm", "odpo",
                                                    "reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning")]
    assert {s.train.precision for s in stages} == {"bfloat16"}
    assert {s.train.precision for s in (getattr(compose_typed("cascade").stage, s.name) for s in stages)} == {"float32"}


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
