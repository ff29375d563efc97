"""The cascade: config validation (before any work), the report's parameter counts, and a tiny end-to-end run
(base + Instruct branch) that survives a SIGKILL in its last online-DPO stage and skips everything when rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_plugins.cascade.plan import CascadePlan, ChildSpec
from nemo_plugins.cascade.plan import plan_from_config as build_plan
from nemo_plugins.cascade.report import non_embedding_parameters
from nemo_plugins.convert import hf_io
from nemo_plugins.convert.sources import ModelSource, hf_dir
from nemo_plugins.data.tokenizer import tokenizer_files
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.builder import build_model
from nemo_plugins.rl.odpo import STEP_METRICS, StepMetrics
from nemo_plugins.train.metrics import MetricsLog
from recipes._entry import compose_typed
from tests.conftest import tiny_config
from tests.hf_reference import assert_loads_with_our_logits, hf_model, hf_state, load_in_transformers


def _compose(*overrides):
    return compose_typed("cascade", *overrides)


def test_demo_and_ministral3_configs_validate():
    demo = build_plan(_compose())
    assert [c.name for c in demo.children] == ["child_14b_like", "child_8b_like", "child_3b_like"]
    paper = build_plan(_compose("cascade=ministral3"))
    assert paper.long.context.max_context == 262_144 and paper.layout("distill_long").cp == 8
    assert build_plan(_compose("token_scale=2")).short.train.train_tokens == 2 * demo.short.train.train_tokens
    assert demo.order()[3] == ("child_14b_like", "sft_kd") and paper.sft.train.fp8 == "hybrid"
    base_only = build_plan(_compose("posttrain=false"))
    assert base_only.sft is None
    assert {stage for _, stage in base_only.order()} == {"prune", "distill_short", "distill_long"}
    assert base_only.pwrm is None and base_only.odpo is None
    stages = [stage for _, stage in demo.order()]
    assert stages.count("pwrm") == 1 and demo.order()[4:6] == [("child_14b_like", "pwrm"), ("child_14b_like", "odpo")]
    assert [c for c, s in demo.order() if s == "odpo"] == [c.name for c in demo.children]
    assert demo.pwrm_init == "parent" and paper.pwrm_init == "parent" and paper.pwrm_pairs_from_policy
    assert not paper.layout("odpo").sequence_parallel and paper.layout("pwrm").cp == 1
    with pytest.raises(ConfigError, match="online-DPO ablations need posttrain=true"):
        build_plan(_compose("posttrain=false", "ablations=[odpo_labels]"))


@pytest.mark.parametrize("override,message", [
    ("tokn_scale=2", "^tokn_scale: unknown key"),
    ("stage.distill_short.train.seq_lenn=64",
     r"^stage.distill_short.train.seq_lenn: unknown key \(allowed here: seq_len,"),
])
def test_misspelt_keys_are_rejected_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        _compose(override)


@pytest.mark.parametrize("override,message", [
    ("cascade.children=[{name: a, num_layers: 2, hiden_size: 8, ffn_hidden_size: 8}]",
     r"^cascade.children.*hiden_size: unknown key"),
    ("until=child_8b_like/distil_short", "until=child_8b_like/distil_short is not a stage"),
    ("ablations=[kl_mix]", "unknown ablation"),
    ("+cascade.stage_parallel.distill={tp: 2}", "unknown stage"),
    ("stage.distill_long.context.original_context=1024", "must equal stage.distill_short.train.seq_len"),
    ("stage.distill_short.optimizer.decay_style=exp", "decay_style='exp'; allowed: cosine"),
    ("stage.sft_kd.teacher=hub:mistral", "hub"),
    ("stage.sft_kd.train.frozen_parameters=7", "frozen_parameters"),
    ("+stage.sft_kd.train.lr=1", r"stage.sft_kd.train.lr"),
    ("pwrm_init=best_child", "pwrm_init='best_child'; allowed: first_child, parent"),
    ("+cascade.stage_parallel.odpo={pp: 2}", "online DPO samples from the policy"),
    ("+cascade.stage_parallel.pwrm={cp: 2}", "stage_parallel.pwrm.cp=2"),
    ("pairs.sample_from=embedded:smollm2", "pwrm_pairs_from_policy=true"),
    ("stage.odpo.sampling.max_new_tokens=2048", "leaves no room for a prompt"),
    ("+stage.pwrm.train.lr=1", r"stage.pwrm.train.lr"),
])
def test_invalid_values_are_rejected_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(_compose(override))


def test_the_reasoning_branch_in_the_plan():
    both = build_plan(_compose("reasoning=true"))
    first = [stage for child, stage in both.order() if child == "child_14b_like"]
    assert first[3:] == ["sft_kd", "pwrm", "odpo", "reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning"]
    assert [stage for child, stage in both.order() if child == "child_3b_like"][3:] == [
        "sft_kd", "odpo", "reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning"]
    alone = build_plan(_compose("reasoning=true", "posttrain=false"))
    assert [s for c, s in alone.order() if c == "child_14b_like"][3:5] == ["reasoning_sft", "pwrm"], \
        "without Instruct the PWRM follows the first reasoning SFT"
    assert alone.sft is None and alone.odpo is None and alone.pwrm is not None
    assert [s for _, s in alone.order()].count("pwrm") == 1
    assert alone.grpo_stem_sources == ("reasoning_math", "reasoning_code") and alone.rubric_judge == "parent"
    assert alone.odpo_reasoning.sampling.strip_thinking and alone.reasoning_sft.kl.ce_weight == 1.0
    demo = {s: alone.training_stage(s).train for s in ("reasoning_sft", "grpo_stem", "grpo_general", "odpo_reasoning")}
    assert {s: t.steps for s, t in demo.items()} == {"reasoning_sft": 2, "grpo_stem": 2, "grpo_general": 1,
                                                     "odpo_reasoning": 1}
    assert alone.grpo_stem.sampling.group_size == 4 and alone.grpo_stem.sampling.max_new_tokens <= 96
    main = build_plan(_compose())
    assert main.reasoning_sft is not None and main.odpo is not None, "the README's main command: both branches"
    assert build_plan(_compose("reasoning=false")).reasoning_sft is None
    assert build_plan(_compose("cascade=ministral3")).reasoning_sft is None, "no paper-scale reasoning budgets yet"
    paper = build_plan(_compose("cascade=ministral3", "reasoning=true", "reasoning_data.format=tekken",
                                "problem_data.format=tekken"))
    assert paper.layout("grpo_stem") == paper.layout("odpo") and paper.layout("reasoning_sft") == paper.layout("sft_kd")
    assert paper.grpo_general.sampling.max_new_tokens == 81_920


@pytest.mark.parametrize("overrides,message", [
    (["stage.odpo_reasoning.sampling.strip_thinking=false"], "stage.odpo_reasoning.sampling.strip_thinking=false"),
    (["grpo_stem_sources=[]"], "grpo_stem_sources is empty"),
    (["grpo_stem_sources=[reasoning_math,poems]"], r"grpo_stem_sources names \['poems'\]"),
    (["rubric_judge=hub:mistral"], "hub"),
    (["+cascade.stage_parallel.grpo_stem={pp: 2}"],
     r"stage_parallel.grpo_stem .*GRPO \(STEM\) samples from the policy"),
    (["posttrain=false", "+cascade.stage_parallel.odpo={cp: 2}", "+cascade.stage_parallel.grpo_stem={}",
      "+cascade.stage_parallel.grpo_general={}"], r"stage_parallel.odpo \(the layout of odpo_reasoning\)"),
    (["stage.grpo_general.sampling.max_new_tokens=4096"], "leaves no room for a prompt"),
    (["until=child_14b_like/grpo_stme"], "until=child_14b_like/grpo_stme is not a stage"),
    (["reasoning_data.format=tekken"], "reasoning_data.format=hf_template"),
    (["+stage.grpo_stem.train.lr=1"], r"stage.grpo_stem.train.lr"),
])
def test_invalid_reasoning_settings_are_rejected_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_plan(_compose("reasoning=true", *overrides))


def test_children_must_shrink_and_fit_the_parent():
    plan = build_plan(_compose())
    parent = tiny_config(num_layers=4, hidden_size=48, tie_embeddings=True)
    children = [ChildSpec("a", 3, 40, 80, True), ChildSpec("b", 3, 40, 80, False)]
    grow = CascadePlan(children, plan.short, plan.long, plan.parallel)
    with pytest.raises(ConfigError, match="'b' has .* not fewer"):
        grow.child_configs(parent)
    with pytest.raises(ConfigError, match="hidden_size=64 must be between 1 and the parent's 48"):
        CascadePlan([ChildSpec("a", 3, 64, 80, True)], plan.short, plan.long, plan.parallel).child_configs(parent)


@pytest.mark.parametrize("tied", [True, False])
def test_non_embedding_parameters_are_the_built_models_outside_embedding_and_output_layer(tied):
    config = tiny_config(tie_embeddings=tied, vocab_size=96)
    model = build_model(config, ParallelConfig())
    counted = {name: p.numel() for name, p in model.named_parameters()}
    outside = sum(n for name, n in counted.items() if "word_embeddings" not in name and "output_layer" not in name)
    assert sum(counted.values()) == config.num_parameters(), "the model is the config's"
    assert non_embedding_parameters(config) == outside


TINY = [
    "model.architecture=null",
    "data.sources=[{name: json, paths: ['stdlib:json'], weight: 1.0}]",
    "cascade.children=[{name: a, num_layers: 3, hidden_size: 40, ffn_hidden_size: 80, tie_embeddings: true},"
    "{name: b, num_layers: 2, hidden_size: 32, ffn_hidden_size: 64, tie_embeddings: true}]",
    "stage.prune.calibration.tokens=256", "stage.prune.calibration.seq_len=64",
    "stage.prune.eval.seq_len=64", "stage.prune.eval.max_windows=2",
    "stage.distill_short.train.seq_len=64", "stage.distill_short.train.train_tokens=768",
    "stage.distill_short.train.save_interval=1", "stage.distill_short.optimizer.lr=3e-3",
    "stage.distill_long.train.seq_len=128", "stage.distill_long.train.train_tokens=256",
    "stage.distill_long.context.original_context=64", "stage.distill_long.context.yarn_factor=2.0",
    "stage.distill_long.long_eval.passkey_lengths=[64,128]", "stage.distill_long.long_eval.paths=['stdlib:json']",
    "report.sample_tokens=4",
    "ablations=[kl_ce_mix,independent_pruning,random_init]",
    "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=300'], weight: 1.0}]",
    "stage.sft_kd.train.seq_len=256", "stage.sft_kd.train.train_tokens=2048", "stage.sft_kd.train.save_interval=1",
    "stage.sft_kd.train.eval_rows_per_source=2", "stage.sft_kd.optimizer.lr=3e-3",
    "stage.sft_kd.sample.max_new_tokens=4",
    "pairs.counts={arithmetic: 8, code: 0, loops: 8, format: 8}", "pwrm_init=first_child",
    "stage.pwrm.train.seq_len=512", "stage.pwrm.train.global_batch_size=8", "stage.pwrm.train.micro_batch_size=4",
    "stage.pwrm.train.train_tokens=8192", "stage.pwrm.train.save_interval=1",
    "stage.odpo.train.seq_len=128", "stage.odpo.train.global_batch_size=2", "stage.odpo.train.train_tokens=768",
    "stage.odpo.train.save_interval=1", "stage.odpo.optimizer.lr=1e-3", "stage.odpo.sampling.max_new_tokens=6",
    "stage.odpo.sampling.truncation_is_loop=false", "stage.odpo.eval_prompts=2",
    "reasoning=false",  # the Reasoning branch has its own tiny run: test_tiny_cascade_with_the_reasoning_branch...
]


@pytest.fixture(scope="module")
def tiny_parent(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=49_152, tie_embeddings=True, num_layers=4)
    return hf_io.write_model_dir(hf_state(hf_model(config)), config, tmp_path_factory.mktemp("parent") / "hf",
                                 extra_files=tokenizer_files(hf_dir(ModelSource.parse("embedded:smollm2"))))


def _cascade(parent, out_dir, env, extra=(), **popen):
    command = [sys.executable, "-m", "recipes.cascade", f"model.source=hf:{parent}", *TINY, *extra,
               f"output_dir={out_dir}"]
    return subprocess.Popen(command, env=env, **popen)


def _outcome(out_dir: Path) -> dict:
    """Everything a run measured (metrics of every stage, samples), without wall times."""
    found = {str(p.relative_to(out_dir)): MetricsLog.read(p) for p in sorted(out_dir.rglob("metrics.jsonl"))}
    found.update({str(p.relative_to(out_dir)): json.loads(p.read_text())["completion"]
                  for p in sorted(out_dir.rglob("sample.json"))})
    found.update({str(p.relative_to(out_dir)): json.loads(p.read_text())["samples"]
                  for p in sorted(out_dir.glob("*/instruct_sft/manifest.json"))})
    found.update({str(p.relative_to(out_dir)): StepMetrics.read(p) for p in sorted(out_dir.rglob(STEP_METRICS))})
    found.update({str(p.relative_to(out_dir)): {k: v for k, v in json.loads(p.read_text()).items()
                                               if k in ("eval", "eval_start", "cursor_end", "calibration", "heldout")}
                  for p in sorted(out_dir.rglob("manifest.json"))})
    return found


def _records(out_dir: Path) -> dict:
    """Every file a finished stage leaves as its record (manifests, export and sample markers, metrics)."""
    names = ("manifest.json", "export.json", "sample.json", "metrics.jsonl", STEP_METRICS, "resolved_config.yaml")
    return {str(p.relative_to(out_dir)): p.read_bytes() for name in names for p in sorted(out_dir.rglob(name))}


@pytest.mark.slow
def test_tiny_cascade_end_to_end_and_after_a_kill(tiny_parent, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CASCADE_CACHE_DIR": str(tmp_path / "cache")}
    reference = tmp_path / "reference"
    assert _cascade(tiny_parent, reference, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    report = (reference / "report.md").read_text()
    for child in ("a", "b"):
        assert (reference / child / "hf" / "config.json").is_file()
        assert (reference / child / "distill_long" / "long_context.png").is_file()
        assert (reference / child / "instruct_sft" / "hf" / "config.json").is_file()
    sft = [json.loads((reference / child / "instruct_sft" / "manifest.json").read_text()) for child in ("a", "b")]
    assert sft[0]["cursor_start"] == {"offsets": {}, "rows": {}}, "the chat data is read from its start, once"
    assert sft[0]["input"].endswith(tuple(f"step_{n:08d}" for n in range(1, 9))) and "distill_long" in sft[0]["input"]
    assert "## Instruct: SFT with logit distillation" in report and "**User:**" in report
    for table in ("## Ablation: loss mix", "| (1 - 0.75) KL + 0.75 CE |", "## Ablation: cascade vs pruning",
                  "| b: pruned straight from the parent |", "## Ablation: pruned vs random", "| random |"):
        assert table in report
    mixes = [MetricsLog.read(reference / "ablations" / "kl_ce_mix" / f"ce_{w}" / "distill_short" / "metrics.jsonl")
             for w in (0.25, 0.5, 0.75)]
    assert len({m[1]["loss"] for m in mixes}) == 3, "each CE weight trains on a different loss"
    assert all(m[0] == mixes[0][0] for m in mixes), "every ablation run starts from the same model and held-out data"
    short = [r for r in MetricsLog.read(reference / "a" / "distill_short" / "metrics.jsonl") if r["kind"] == "eval"]
    assert short[-1]["kl"] < short[0]["kl"]
    cached = sorted((reference / "teacher_heldout").glob("*.pt"))
    assert len(cached) == 2, ("one teacher held-out pass per row length (short, long), shared by both children: "
                              f"{cached}")

    pwrm = json.loads((reference / "pwrm" / "manifest.json").read_text())
    odpo = [json.loads((reference / child / "instruct_odpo" / "manifest.json").read_text()) for child in ("a", "b")]
    assert pwrm["init"] == "first_child" and pwrm["source"] == f"megatron:{sft[0]['checkpoint']}"
    assert pwrm["calibration"]["tau"] > 0 and (reference / "pwrm" / "reliability.png").is_file()
    assert [m["policy_input"] for m in odpo] == [f"megatron:{m['checkpoint']}" for m in sft], "ODPO starts from SFT"
    assert all(m["judge"] == {"pwrm": pwrm["checkpoint"], "tau": pwrm["calibration"]["tau"]} for m in odpo)
    assert odpo[0]["cursor_start"] == sft[0]["cursor_end"] and sft[1]["cursor_start"] == odpo[0]["cursor_end"] \
        and odpo[1]["cursor_start"] == sft[1]["cursor_end"], "SFT and ODPO read the chat data once, in turn"
    assert odpo[0]["eval_start"]["win_rate"] == 0.5, "at the start the policy is its reference"
    for child in ("a", "b"):
        odpo_hf, sft_hf = (reference / child / stage / "hf" for stage in ("instruct_odpo", "instruct_sft"))
        checkpoint = json.loads((reference / child / "instruct_odpo" / "manifest.json").read_text())["checkpoint"]
        assert_loads_with_our_logits(odpo_hf, f"megatron:{checkpoint}")
        trained, start = (load_in_transformers(d).state_dict() for d in (odpo_hf, sft_hf))
        assert any(not torch.equal(trained[k], start[k]) for k in start), f"{child}: the ODPO export is the SFT model"
    for table in ("## Instruct: pairwise reward model", "| held-out accuracy |", "| expected calibration error |",
                  "![reliability](pwrm/reliability.png)", "## Instruct: online DPO", "| a | 3 | 2 | 0.500 -> ",
                  "| b | 3 | 2 | 0.500 -> ", "| a | pwrm | 16 pair orderings |"):
        assert table in report, table
    assert "| a | 2,018,200 | 82.3 | 52,120 | 56.3 |" in report and "| b | 1,597,600 | 65.2 | 24,736 | 26.7 |" in report

    killed = tmp_path / "killed"
    job = _cascade(tiny_parent, killed, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = killed / "b" / "instruct_odpo" / "checkpoints" / "step_00000001"
    deadline = time.monotonic() + 900
    while job.poll() is None and time.monotonic() < deadline and not saved.is_dir():
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the cascade finished before it could be killed mid-stage"
    assert not (killed / "b" / "instruct_odpo" / "manifest.json").exists(), "killed after its last ODPO stage"
    assert _cascade(tiny_parent, killed, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    assert _outcome(killed) == _outcome(reference)

    before = _records(reference)
    assert _cascade(tiny_parent, reference, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    assert _records(reference) == before, "a rerun of a finished cascade redoes nothing"
    _, stderr = _cascade(tiny_parent, reference, env, stderr=subprocess.PIPE, text=True, stdout=subprocess.DEVNULL,
                         extra=["stage.distill_short.optimizer.lr=1e-3"]).communicate()
    assert "finished with a different stage config" in stderr


REASONING = [
    "posttrain=false", "reasoning=true", "ablations=[]",
    "reasoning_data.sources=[{name: reasoning_math, paths: ['builtin:reasoning_math?count=80'], weight: 0.7},"
    "{name: reasoning_code, paths: ['builtin:reasoning_code?count=40'], weight: 0.3}]",
    "problem_data.sources=[{name: reasoning_math, paths: ['builtin:reasoning_math?count=80'], weight: 0.6},"
    "{name: reasoning_code, paths: ['builtin:reasoning_code?count=40'], weight: 0.2},"
    "{name: reasoning_rubric, paths: ['builtin:reasoning_rubric?count=40'], weight: 0.2}]",
    "stage.reasoning_sft.train.seq_len=512", "stage.reasoning_sft.train.train_tokens=2048",
    "stage.reasoning_sft.train.save_interval=1", "stage.reasoning_sft.train.eval_rows_per_source=1",
    "stage.reasoning_sft.optimizer.lr=3e-3", "stage.reasoning_sft.sample.max_new_tokens=4",
    *(f"stage.{stage}.{setting}" for stage, tokens in (("grpo_stem", 1024), ("grpo_general", 512))
      for setting in ("train.seq_len=256", "train.global_batch_size=2", f"train.train_tokens={tokens}",
                      "train.precision=float32", "train.save_interval=1", "train.eval_interval=0",
                      "optimizer.lr=1e-3", "sampling.group_size=2", "sampling.max_new_tokens=8",
                      "sampling.tools=false", "problem_filter.samples=0", "eval_prompts=2")),
    "stage.odpo_reasoning.train.seq_len=256", "stage.odpo_reasoning.train.global_batch_size=2",
    "stage.odpo_reasoning.train.train_tokens=512", "stage.odpo_reasoning.train.save_interval=1",
    "stage.odpo_reasoning.optimizer.lr=1e-3", "stage.odpo_reasoning.sampling.max_new_tokens=6",
    "stage.odpo_reasoning.sampling.truncation_is_loop=false", "stage.odpo_reasoning.sampling.tools=false",
    "stage.odpo_reasoning.eval_prompts=2",
]


@pytest.mark.slow
def test_tiny_cascade_with_the_reasoning_branch_runs_once_and_refuses_a_changed_setting(tiny_parent, tmp_path):
    """Base + Reasoning (Instruct off): the PWRM is trained once, after child a's reasoning SFT; every reasoning
    stage has its manifest and export; the SFT traces and the problems each run one cursor across the children."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "CASCADE_CACHE_DIR": str(tmp_path / "cache")}
    out = tmp_path / "run"
    job = _cascade(tiny_parent, out, env, REASONING, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, stderr = job.communicate()
    assert job.returncode == 0, stderr[-3000:]
    stages = ("reasoning_sft", "reasoning_grpo_stem", "reasoning_grpo_general", "reasoning_odpo")
    manifests = {child: [json.loads((out / child / s / "manifest.json").read_text()) for s in stages] for child in "ab"}
    for child in "ab":
        for stage in stages:
            assert (out / child / stage / "hf" / "config.json").is_file(), (child, stage)
        sft, stem, general, odpo = manifests[child]
        assert "distill_long" in sft["input"] and not (out / child / "instruct_sft").exists(), "from the base"
        assert stem["policy_input"] == f"megatron:{sft['checkpoint']}" and general["policy_input"] == \
            f"megatron:{stem['checkpoint']}" and odpo["policy_input"] == f"megatron:{general['checkpoint']}"
        assert stem["rewards"]["judge"] is None and general["rewards"]["judge"] == f"hf:{tiny_parent}"
        assert odpo["config"]["sampling"]["strip_thinking"] and odpo["eval_start"]["win_rate"] == 0.5
        rubric = [m["cursor_end"]["rows"].get("reasoning_rubric", 0) for m in (stem, general)]
        assert stem["cursor_start"]["rows"].get("reasoning_rubric", 0) == rubric[0] < rubric[1], \
            "STEM reads no rubric problem, General does"
    a, b = manifests["a"], manifests["b"]
    assert a[0]["cursor_start"] == {"offsets": {}, "rows": {}} and b[0]["cursor_start"] == a[0]["cursor_end"]
    assert a[1]["cursor_start"] == {"offsets": {}, "rows": {}}
    assert [m["cursor_start"] for m in a[2:] + b[1:]] == [m["cursor_end"] for m in a[1:] + b[1:3]], \
        "one problem cursor: STEM, General, ODPO of a, then of b"
    pwrm = json.loads((out / "pwrm" / "manifest.json").read_text())
    assert pwrm["source"] == f"megatron:{a[0]['checkpoint']}", "the PWRM starts from the first reasoning SFT model"
    assert all(m[3]["judge"]["pwrm"] == pwrm["checkpoint"] for m in (a, b))
    assert sum(1 for _ in out.rglob("pwrm/manifest.json")) == 1
    report = (out / "report.md").read_text()
    for row in ("## Reasoning: SFT on chain-of-thought traces", "| a | grpo_stem | 2 | ", "| b | grpo_general | 1 | ",
                "| a | 1 | 0.500 -> ", " reasoning chat tokens | 2 | ", " problem tokens | 2 | - | "):
        assert row in report, row

    before = _records(out)
    assert _cascade(tiny_parent, out, env, REASONING, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).wait() == 0
    assert _records(out) == before, "a rerun of a finished cascade redoes nothing"
    _, stderr = _cascade(tiny_parent, out, env, [*REASONING, "stage.grpo_general.loss.eps_high=0.3"],
                         stderr=subprocess.PIPE, text=True, stdout=subprocess.DEVNULL).communicate()
    assert "reasoning_grpo_general was finished with a different stage config" in stderr


def test_the_instruct_report_row_of_a_plain_sft_stage_has_no_kl(tmp_path):
    """A plain SFT stage (kl.ce_weight 1) runs no teacher: its evaluations hold loss and perplexity, no KL."""
    from nemo_plugins.cascade.report import _instruct_section

    stage_dir = tmp_path / "a" / "instruct_sft"
    stage_dir.mkdir(parents=True)
    evals = [{"step": s, "kind": "eval", "loss": loss, "student_ppl": ppl, "tokens": 9}
             for s, loss, ppl in ((0, 3.0, 20.0), (4, 2.0, 7.5))]
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    manifest = {"teacher": None, "tokens": 1234, "chat_data": {"s": {"dropped": 1}},
                "samples": {"before": [], "after": []}}
    lines = _instruct_section({"a": {"sft_kd": manifest}}, tmp_path)
    assert f"| a | `None` | 1,234 | - (plain SFT) | - | 20.00 | 7.50 | - | 1 | `{stage_dir / 'hf'}` |" in lines
