"""Offline pairwise data: every pair's reason re-checks from its record (the code in the sandbox), mutants and
hanging candidates fail, model samples are used where they qualify, the split / cache are deterministic, and the
engine sampler draws reproducible answers from a model."""

from fractions import Fraction

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.pairwise import (
    CODE_FUNCTIONS,
    FORMAT_CONSTRAINTS,
    EngineSampler,
    Pair,
    PairSampling,
    PairwiseSettings,
    Sample,
    build_or_load_pairs,
    cache_name,
    code_of,
    final_answer,
    function_source,
    make_tasks,
    mutants,
    pair_stats,
    read_pairs,
    run_code_checks,
    verified_pairs,
    word_loop,
)
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError, DataError
from nemo_plugins.generation import tools
from nemo_plugins.model.builder import build_model
from nemo_plugins.sandbox import SandboxLimits
from tests.conftest import tiny_config

SETTINGS = PairwiseSettings(counts={"arithmetic": 6, "code": 8, "loops": 6, "format": 8}, heldout_fraction=0.25, seed=3)
LIMITS = SandboxLimits(wall_seconds=120, cpu_seconds=100, output_bytes=8 << 20)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_or_load_pairs(SETTINGS, tmp_path_factory.mktemp("pairs"))


def _code_verdicts(pairs: list[Pair]) -> list[list[dict]]:
    jobs = [{**{k: p.meta[k] for k in ("module", "name", "cases")},
             "candidates": [code_of(p.chosen), code_of(p.rejected)]}
            for p in pairs]
    return run_code_checks(jobs, LIMITS)


def test_every_pair_reason_rechecks_from_its_record(built):
    pairs, _ = built
    kinds = {p.kind for p in pairs}
    assert kinds == {"arithmetic", "code", "loops", "format"}
    constraints = {c.name: c for c in FORMAT_CONSTRAINTS}
    for pair in pairs:
        assert pair.chosen != pair.rejected and pair.target == 1.0 and pair.reason
        if pair.kind == "arithmetic":
            exact = tools.evaluate(pair.meta["expression"])
            assert final_answer(pair.chosen) == exact == Fraction(pair.meta["answer"])
            assert final_answer(pair.rejected) != exact
        elif pair.kind == "loops":
            assert word_loop(pair.chosen) is None
            assert word_loop(pair.rejected) is not None or (pair.chosen.startswith(pair.rejected)
                                                            and len(pair.rejected) < len(pair.chosen))
        elif pair.kind == "format":
            constraint = constraints[pair.meta["constraint"]]
            assert constraint.follows(pair.chosen) and not constraint.follows(pair.rejected)
            assert pair.meta["answer"] in pair.chosen
    code = [p for p in pairs if p.kind == "code"]
    assert len(code) >= 6
    for pair, (chosen, rejected) in zip(code, _code_verdicts(code)):
        total = len(pair.meta["cases"])
        assert chosen["passed"] == total and rejected["passed"] < total, pair.reason


def test_the_split_holds_out_the_tail_of_every_kind_and_the_cache_is_reused(built, tmp_path):
    pairs, path = built
    stats = pair_stats(pairs)
    for kind, row in stats.items():
        assert row["heldout"] == max(1, round((row["train"] + row["heldout"]) * 0.25)), kind
        splits = [p.split for p in pairs if p.kind == kind]
        assert splits == sorted(splits, key=lambda s: s == "heldout"), "held-out pairs are the tail"
        assert row["chosen_sampled"] == row["rejected_sampled"] == 0  # no sampler: references and perturbations
    again, same_path = build_or_load_pairs(SETTINGS, path.parent)
    assert same_path == path and again == pairs
    six, seven = PairwiseSettings(counts={"arithmetic": 6}), PairwiseSettings(counts={"arithmetic": 7})
    assert cache_name(six, None) != cache_name(seven, None)
    assert cache_name(SETTINGS, "megatron:/a") != cache_name(SETTINGS, None)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(path.read_text().splitlines()[0] + "\n{\"kind\": 3}\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2"):
        read_pairs(broken)


def test_mutants_change_one_site_and_the_harness_fails_them_and_stops_a_hanging_candidate():
    leapdays = next(f for f in CODE_FUNCTIONS if f.name == "leapdays")
    source = function_source(leapdays)
    found = mutants(source)
    assert len(found) >= 8 and all(code != source for code, _ in found)
    assert all(sum(a != b for a, b in zip(code.split(), source.split())) <= 2 for code, _ in found)
    cases = [[1, 2000], [1900, 2101], [5, 5], [400, 1601]]
    hanging = "def leapdays(y1, y2):\n    while True:\n        pass\n"
    [verdicts] = run_code_checks([{"module": "calendar", "name": "leapdays", "cases": cases,
                                   "candidates": [source, hanging, "not python", *(c for c, _ in found)]}], LIMITS)
    assert verdicts[0] == {"passed": 4, "failure": ""}
    assert verdicts[1] == {"passed": 0, "failure": "over 2 s"} and verdicts[2]["passed"] == 0
    assert sum(v["passed"] < 4 for v in verdicts[3:]) >= len(found) // 2


class PlantedSampler:
    """Per kind, answers that do / do not pass its check (the fake stands in for the policy)."""

    def sample(self, conversations):
        out = []
        for messages in conversations:
            text = messages[-1]["content"]
            if "```python" in text:  # code: a copy of the real function (passes) and a stub (fails)
                name = text.split("`")[1].split("(")[0]
                function = next(f for f in CODE_FUNCTIONS if f.name == name)
                out.append([Sample(f"Here:\n```python\n{function_source(function)}\n```"),
                            Sample("```python\ndef " + name + "(*args):\n    return None\n```")])
            elif "lowercase" in text or "JSON" in text or "<answer>" in text or "at most" in text:
                out.append([Sample("I Refuse To Follow Any Format, AND I write a lot of words here on purpose.")])
            else:
                out.append([Sample("Step: 2 + 2 = 5\nAnswer: 5"), Sample("la la la", loop="repeated_ngram")])
        return out


def test_samples_that_qualify_replace_references_and_perturbations():
    settings = PairwiseSettings(counts={"arithmetic": 3, "code": 2, "loops": 3, "format": 4}, seed=5)
    tasks = make_tasks(settings)
    sampler = PlantedSampler()
    samples = {kind: sampler.sample([t.messages for t in kind_tasks]) for kind, kind_tasks in tasks.items()}
    pairs = verified_pairs(tasks, samples, settings, LIMITS)
    by_kind = {kind: [p for p in pairs if p.kind == kind] for kind in tasks}
    assert all(p.origin == {"chosen": "reference", "rejected": "sampled"} and p.rejected.endswith("Answer: 5")
               for p in by_kind["arithmetic"])
    assert all(p.origin == {"chosen": "sampled", "rejected": "sampled"} and p.chosen.startswith("Here:")
               for p in by_kind["code"])
    assert all(p.origin["rejected"] == "sampled" and p.rejected == "la la la" and "loop detector" in p.reason
               for p in by_kind["loops"])
    assert all(p.origin["rejected"] == "sampled" and p.rejected.startswith("I Refuse") for p in by_kind["format"])


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match="unknown kind"):
        PairwiseSettings(counts={"poetry": 3})
    with pytest.raises(ConfigError, match="heldout_fraction"):
        PairwiseSettings(heldout_fraction=1.0)


def test_the_engine_sampler_draws_reproducible_answers_from_a_model():
    chat_format = load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))
    torch.manual_seed(0)
    model = build_model(tiny_config(vocab_size=49152), ParallelConfig())
    sampler = EngineSampler(model, chat_format, PairSampling(samples=2, temperature=1.0, max_new_tokens=6), seed=11)
    conversations = [[{"role": "user", "content": "Say hi."}], [{"role": "user", "content": "Count to three."}]]
    first, second = sampler.sample(conversations), sampler.sample(conversations)
    assert first == second and [len(s) for s in first] == [2, 2]
    assert first[0][0].text != first[0][1].text, "the two samples of a prompt have their own seeds"
    assert all(s.loop in (None, "no_stop", "repeated_ngram") and s.text for drawn in first for s in drawn)
