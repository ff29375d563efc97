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
from tests.recipe_runs import train_records
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
    """Labels and beta: a run where a cut response is NOT a loop (the judge's soft p counts); loops as losers: one
    where it is (about three in four of the planted policy's 12-token responses are cut)."""
    chat_format, mix = chat
    source = ModelSource.parse(f"megatron:{root / 'policy'}")
    tok = tokenizer_dir(source)

    def run(stage, out_dir):
        return run_odpo_stage(stage, source, source, {"judge": "soft_stop"}, SoftStopJudge, mix, chat_format, tok, tok,
                              Cursor(), out_dir, ParallelConfig())

    train = {"seq_len": 160, "micro_batch_size": 2, "global_batch_size": 4, "train_tokens": 160 * 4 * 3,
             "save_interval": 0, "seed": 3}
    sampling = {"max_new_tokens": 12, "tools": False, "truncation_is_loop": False, "loop": {"ngram": 2, "repeats": 3}}
    stage = _stage(3, train=train, sampling=sampling, eval_prompts=4)
    looping = _stage(3, train=train, sampling={**sampling, "truncation_is_loop": True}, eval_prompts=4)
    done_dir = tmp_path / "stage"
    done = (done_dir, run(stage, done_dir))
    tables = {name: run_ablation(name, stage, run, tmp_path / name, done=done)
              for name in ("odpo_labels", "odpo_beta_rescale")}
    tables["odpo_loop_as_loser"] = run_ablation("odpo_loop_as_loser", looping, run, tmp_path / "odpo_loop_as_loser")
    for name, table in tables.items():
        lines = table.splitlines()
        variants = ODPO_ABLATIONS[name][1](stage)
        rows = [x for x in lines if x.startswith("| ")]
        assert lines[0].startswith("## Ablation: online DPO") and len(rows) == 1 + len(variants)
        assert sum("(the stage's own run)" in x for x in lines) == (name != "odpo_loop_as_loser")

    def steps(name, slug):  # the variant equal to the stage is the stage's own run
        directory = tmp_path / name / slug
        return StepMetrics.read((directory if directory.is_dir() else done_dir) / STEP_METRICS)

    soft, hard = (StepMetrics.read(done_dir / STEP_METRICS), steps("odpo_labels", "hard"))
    assert [r["label_confidence"] for r in soft][:1] == [r["label_confidence"] for r in hard][:1], "same samples, judge"
    # until the first pair that is not a tie, no step moves either policy (the gradient at m = 0 is p - 1/2); at it,
    # every non-tie pair has p - 1/2 = +-0.3 soft and +-0.5 hard: the hard run's gradient is 5/3 of the soft one's
    first = next(i for i, r in enumerate(soft) if r["label_confidence"] > 0)
    norms = [[r["grad_norm"] for r in train_records(d)] for d in (done_dir, tmp_path / "odpo_labels" / "hard")]
    assert norms[1][first] == pytest.approx(norms[0][first] * 0.5 / 0.3, rel=1e-4) and norms[0][first] > 0
    for beta in ABLATION_BETAS:  # at m = 0 (step 1) the loss is ln 2, divided by beta with inv_beta
        assert steps("odpo_beta_rescale", f"beta_{beta:g}_none")[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert steps("odpo_beta_rescale", f"beta_{beta:g}_inv_beta")[0]["loss"] == pytest.approx(math.log(2) / beta,
                                                                                                  rel=1e-5)
    loses, judge_only = (steps("odpo_loop_as_loser", slug) for slug in ("loop_loses", "judge_only"))
    assert sum(r["drop_rate"] for r in loses) > 0 and all(r["drop_rate"] == 0 for r in judge_only)
    assert loses[0]["loop_rate"] == judge_only[0]["loop_rate"] > 0
    assert not (tmp_path / "odpo_labels" / "soft").exists(), "the stage's own setting is not run twice"
