"""Reasoning SFT: the stage's screen (filters + system prompt) applied when the chat mix renders its sources, the
dropped records counted per filter and reason, the kept ones rendered as a naive reference renders them; the stage
config composes and names its bad keys; the recipe trains on think-block data and reports the filter counts."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.chat import load_chat_format
from nemo_plugins.data.chat_mix import build_chat_mix
from nemo_plugins.data.chat_prompts import ChatPrompts
from nemo_plugins.data.mix import Cursor, SourceSpec
from nemo_plugins.data.reasoning_sources import reasoning_math
from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.filters import FilterSettings
from nemo_plugins.rl.sft_kd import SFTScreen, SFTStage, check_screen
from nemo_plugins.train.metrics import MetricsLog
from recipes._entry import compose_typed
from tests.conftest import save_tiny_teacher_and_student
from tests.recipe_runs import recipe_env

CONF = str(Path(__file__).resolve().parents[1] / "conf")
SYSTEM = "Reason step by step."


def planted_records() -> tuple[list[dict], dict[int, tuple[str, str]]]:
    """Good reasoning records with bad ones planted at known lines, and what the filters must say about each."""
    good = list(reasoning_math(8, seed=5))
    user = good[0]["messages"][0]
    thinking, answer = good[0]["messages"][1]["thinking"], good[0]["messages"][1]["content"]
    bad = {
        1: ({"messages": [user, {"role": "assistant", "content": answer}]}, ("format", "no think block")),
        3: ({"messages": [user, {"role": "assistant", "thinking": "Let me add them again. " * 30, "content": answer}]},
            ("repetition", "excessive repetition")),
        4: ({"messages": [user, {"role": "assistant",
                                 "thinking": thinking + "\n然后我们计算总价格并且找零钱给顾客计算总价格。",
                                 "content": answer}]}, ("language", "script switch (CJK in LATIN text)")),
        6: ({"messages": [user, {"role": "assistant", "thinking": thinking, "content": answer}],
             "meta": {"finish_reason": "length"}}, ("truncation", "cut at the length limit")),
        7: ({"messages": [user, {"role": "assistant", "thinking": thinking, "content": f"{answer}</think>"}]},
            ("format", "unbalanced think block")),
    }
    records = list(good)
    for line in sorted(bad):
        records.insert(line, bad[line][0])
    return records, {line: verdict for line, (_, verdict) in bad.items()}


def _counts(verdicts: dict[int, tuple[str, str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, reason in verdicts.values():
        counts.setdefault(name, {})[reason] = counts.get(name, {}).get(reason, 0) + 1
    return counts


@pytest.fixture(scope="module")
def chatml():
    return load_chat_format("hf_template", tokenizer_dir(ModelSource.parse("embedded:smollm2")))


def test_the_screen_drops_and_counts_and_the_rest_renders_with_the_system_prompt(chatml, tmp_path):
    records, verdicts = planted_records()
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = [SourceSpec("reasoning", [str(path)])]
    mix = build_chat_mix(chatml, spec, tmp_path / "cache", 0.0, screen=SFTScreen(SYSTEM, FilterSettings()))
    data = mix.sources[0].data
    assert mix.stats(4096)["reasoning"]["filtered"] == _counts(verdicts)
    assert data.file.metadata["dropped_lines"] == sorted(verdicts)
    kept = [r for i, r in enumerate(records) if i not in verdicts]
    assert len(data) == len(kept) == 8
    for k, record in enumerate(kept):
        reference = chatml.encode([{"role": "system", "content": SYSTEM}, *record["messages"]])
        begin, end = int(data.starts[k]), int(data.starts[k + 1])
        assert data.file.tokens[begin:end].tolist() == list(reference.tokens)
        assert data.mask[begin:end].tolist() == list(reference.assistant_mask)
    rendered = chatml.tokenizer.decode(data.file.tokens[int(data.starts[0]):int(data.starts[1])].tolist())
    assert "<think>" in rendered and "</think>" in rendered and SYSTEM in rendered

    plain = build_chat_mix(chatml, spec, tmp_path / "cache", 0.0)
    assert len(plain.sources[0].data) == len(records) and "filtered" not in plain.stats(4096)["reasoning"]
    assert plain.identity()["sources"]["reasoning"]["key"] != mix.identity()["sources"]["reasoning"]["key"]

    stage, _ = _stage([f"stage.sft_kd.system_prompt='{SYSTEM}'"])
    check_screen(stage, mix)
    with pytest.raises(ConfigError, match="rendered without stage 'reasoning_sft'"):
        check_screen(stage, plain)
    check_screen(dataclasses.replace(_stage([])[0], system_prompt=None, filters=None), plain)


def test_the_system_prompt_goes_before_a_system_message_already_there():
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}], "meta": {}}
    prepared = SFTScreen(SYSTEM, None).prepare(record)
    assert prepared["messages"][0] == {"role": "system", "content": f"{SYSTEM}\n\nBe brief."}
    assert record["messages"][0]["content"] == "Be brief.", "the record itself is not changed"
    assert SFTScreen(None, FilterSettings()).prepare(record) is record


def _stage(overrides: list[str]) -> SFTStage:
    cfg = compose_typed("sft", "stage@stage.sft_kd=reasoning_sft", "data@chat_data=reasoning_demo", *overrides)
    return cfg.stage.sft_kd, cfg


def test_the_reasoning_stage_composes_with_its_data_and_names_bad_keys():
    stage, cfg = _stage([])
    assert stage.name == "reasoning_sft" and stage.kl.ce_weight == 1.0 and stage.filters == FilterSettings()
    assert stage.data_screen() == SFTScreen(stage.system_prompt, FilterSettings())
    assert [s.name for s in cfg.chat_data.sources] == ["reasoning_math", "reasoning_code", "reasoning_rubric"]
    assert dataclasses.replace(stage, system_prompt=None, filters=None).data_screen() is None
    with pytest.raises(ConfigError, match="filters.max_repetition"):
        _stage(["stage.sft_kd.filters.max_repetition=2"])
    with pytest.raises(ConfigError, match="stage.sft_kd.filters.bogus"):
        _stage(["+stage.sft_kd.filters.bogus=1"])
    with pytest.raises(ConfigError, match="stage.sft_kd.system_prompt"):
        _stage(["stage.sft_kd.system_prompt=' '"])


@pytest.mark.slow
def test_the_recipe_trains_on_think_block_data_and_reports_the_filter_counts(tmp_path):
    save_tiny_teacher_and_student(tmp_path)
    records, verdicts = planted_records()
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "recipes.sft", "stage@stage.sft_kd=reasoning_sft", "data@chat_data=reasoning_demo",
               "model=tiny", f"model.source=megatron:{tmp_path / 'teacher'}",
               f"student=megatron:{tmp_path / 'student'}", f"chat_data.cache_dir={tmp_path / 'chat'}",
               "chat_data.sources=[{name: math, paths: ['builtin:reasoning_math?count=300'], weight: 3.0}, "
               f"{{name: planted, paths: ['{planted}'], weight: 1.0}}]",
               "chat_data.heldout_fraction=0.1", "stage.sft_kd.train.seq_len=512",
               "stage.sft_kd.train.micro_batch_size=2", "stage.sft_kd.train.global_batch_size=4",
               "stage.sft_kd.train.train_tokens=12288", "stage.sft_kd.train.eval_rows_per_source=2",
               "stage.sft_kd.optimizer.lr=3e-3", "stage.sft_kd.sample.max_new_tokens=4", f"output_dir={out}"]
    subprocess.run(command, check=True, env=recipe_env(), capture_output=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chat_data"]["planted"]["filtered"] == _counts(verdicts)
    assert manifest["chat_data"]["planted"]["conversations"] == len(records) - len(verdicts)
    assert manifest["chat_data"]["math"]["filtered"] == {}, "the generated traces pass the filters"
    evals = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["student_ppl"] < 0.8 * evals[0]["student_ppl"], "SFT must lower the held-out perplexity"


def test_prompts_of_a_screened_mix_are_the_kept_records_with_the_ids_they_were_rendered_with(chatml, tmp_path):
    """GRPO / online DPO read prompts from a screened mix: conversation k is the k-th KEPT line (the dropped lines
    are skipped, not miscounted as 'the files changed'), its ids the rendered ones (system prompt first)."""
    records, verdicts = planted_records()
    path = tmp_path / "reasoning.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    mix = build_chat_mix(chatml, [SourceSpec("reasoning", [str(path)])], tmp_path / "cache", 0.25,
                         screen=SFTScreen(SYSTEM, FilterSettings()))
    kept = [r for i, r in enumerate(records) if i not in verdicts]
    prompts = ChatPrompts(mix, 0, Cursor(), 1)
    read, cursor = [], Cursor()
    for _ in range(mix.train_end["reasoning"]):
        (prompt,), _, _, cursor = prompts.next_rows(cursor, 1, 4096)
        read.append(prompt)
    read += prompts.heldout(8)
    assert len(read) == len(kept) == 8
    for prompt, record in zip(read, kept):
        assert prompt.messages == record["messages"][:1]
        system = [{"role": "system", "content": SYSTEM}]
        rendered = chatml.encode([*system, *record["messages"]])
        assert list(prompt.ids) == list(rendered.tokens[: rendered.assistant_mask.index(1)])
