"""Online-DPO ablations: each variant differs from the stage in the studied setting only, and on tiny models each
ablation writes its table from real runs whose settings took effect (hard labels, loss / beta, loops losing)."""

import dataclasses
import math

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.odpo import STEP_METRICS, StepMetrics, run_odpo_stage
from nemo_plugins.rl.odpo_ablations import ABLATION_BETAS, ODPO_ABLATIONS, run_ablation
from tests.test_odpo import END_OF_TURN, _stage, chat, root  # noqa: F401  (module fixtures: the tiny policy, the chat mix)

STUDIED = {"odpo_labels": {"dpo.hard_labels"}, "odpo_beta_rescale": {"dpo.beta", "dpo.beta_rescale"},
           "odpo_loop_as_loser": {"loop_as_loser"}}


class SoftStopJudge:
    """Prefers the response that ends its turn, softly (p = 0.8 / 0.2; alike: 0.5), so hard labels differ."""

    def prob_first_wins(self, conversations, responses_a, responses_b):
        a, b = ([END_OF_TURN in r for r in responses] for responses in (responses_a, responses_b))
        return torch.tensor([0.5 + 0.3 * (float(x) - float(y)) for x, y in zip(a, b)])


def _flat(stage) -> dict:
    out = {}
    for key, value in dataclasses.asdict(stage).items():
        for sub, leaf in (value.items() if isinstance(value, dict) else [(None, value)]):
            out[key if sub is None else f"{key}.{sub}"] = leaf
    return out


@pytest.mark.parametrize("name", sorted(ODPO_ABLATIONS))
def test_variants_differ_from_each_other_in_the_studied_setting_only(name):
    stage = _stage(2)
    variants = ODPO_ABLATIONS[name][1](stage)
    base = _flat(stage)
    changed = set().union(*({k for k, v in _flat(v.stage).items() if v != base[k]} for v in variants))
    assert changed and changed <= STUDIED[name]
    assert len({repr(v.stage) for v in variants}) == len(variants), "all distinct"
    assert len({v.slug for v in variants}) == len(variants)
    assert any(v.stage == stage for v in variants), "the stage's own setting is one of the variants"


def test_an_unknown_ablation_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown online-DPO ablation 'odpo_nothing'"):
        run_ablation("odpo_nothing", _stage(2), lambda s, d: {}, tmp_path)


@pytest.mark.slow
def test_each_ablation_writes_its_table_from_runs_whose_setting_took_effect(root, chat, tmp_path):  # noqa: F811
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)

    def run(stage, out_dir):
        return run_odpo_stage(stage, source, source, {"judge": "soft_stop"}, SoftStopJudge, mix, chat_format, tok, tok,
                              Cursor(), out_dir, ParallelConfig())

    sampling = {"max_new_tokens": 12, "tools": False, "truncation_is_loop": True, "loop": {"ngram": 2, "repeats": 3}}
    stage = _stage(2, sampling=sampling, eval_prompts=4)
    done_dir = tmp_path / "stage"
    done = (done_dir, run(stage, done_dir))
    tables = {name: run_ablation(name, stage, run, tmp_path / name, done=done) for name in ODPO_ABLATIONS}
    for name, table in tables.items():
        lines = table.splitlines()
        variants = ODPO_ABLATIONS[name][1](stage)
        assert lines[0].startswith("## Ablation: online DPO") and len([x for x in lines if x.startswith("| ")]) == 1 + len(variants)
        assert sum("(the stage's own run)" in x for x in lines) == 1

    def steps(name, slug):  # the variant equal to the stage is the stage's own run
        directory = tmp_path / name / slug
        return StepMetrics.read((directory if directory.is_dir() else done_dir) / STEP_METRICS)

    soft, hard = (StepMetrics.read(done_dir / STEP_METRICS), steps("odpo_labels", "hard"))
    assert soft[0]["label_confidence"] == hard[0]["label_confidence"] > 0, "the same prompts, samples and judge"
    assert soft[1] != hard[1], "hard labels train another policy"
    for beta in ABLATION_BETAS:  # at m = 0 (step 1) the loss is ln 2, divided by beta with inv_beta
        assert steps("odpo_beta_rescale", f"beta_{beta:g}_none")[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
        if beta != stage.dpo.beta:
            assert steps("odpo_beta_rescale", f"beta_{beta:g}_inv_beta")[0]["loss"] == pytest.approx(math.log(2) / beta,
                                                                                                      rel=1e-5)
    loses, judge_only = (steps("odpo_loop_as_loser", slug) for slug in ("loop_loses", "judge_only"))
    assert sum(r["drop_rate"] for r in loses) > 0 and all(r["drop_rate"] == 0 for r in judge_only)
    assert loses[0]["loop_rate"] == judge_only[0]["loop_rate"] > 0
    assert not (tmp_path / "odpo_labels" / "soft").exists(), "the stage's own setting is not run twice"
