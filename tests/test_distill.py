"""The distillation loop in-process: learning, NaN handling, atomic checkpoints, the single-pass cursor."""

import functools

import pytest
import torch

from nemo_plugins.data.context_parallel import context_parallel_slice
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.context import ContextExtension
from nemo_plugins.distill.kl_loss import KLOptions
from nemo_plugins.distill.step import train_with_distillation
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.model.builder import build_model
from nemo_plugins.train.checkpoint import complete_checkpoints, latest_checkpoint
from nemo_plugins.train.config import OptimizerSettings, TrainSettings
from nemo_plugins.train.loop import NonFiniteLossError
from nemo_plugins.train.metrics import MetricsLog
from tests.conftest import tiny_config

STUDENT = tiny_config(hidden_size=32, ffn_hidden_size=64)


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return Teacher(build_model(tiny_config(), ParallelConfig()))


def _run(out_dir, teacher, mix, config=STUDENT, steps=4, **train):
    student = build_model(config, ParallelConfig())
    settings = TrainSettings(**{"seq_len": 32, "micro_batch_size": 2, "global_batch_size": 4,
                                "train_tokens": steps * 128, "eval_rows_per_source": 2, **train})
    return student, functools.partial(train_with_distillation, student, config, teacher, mix, settings,
                                      OptimizerSettings(lr=1e-2, min_lr=1e-3), KLOptions(chunk_tokens=16), out_dir)


def test_heldout_kl_falls_and_checkpoints_are_atomic_and_pruned(tmp_path, teacher, mix):
    _, run = _run(tmp_path, teacher, mix, steps=6, save_interval=2, keep_last=2)
    result = run(Cursor())
    evals = [r for r in MetricsLog.read(tmp_path / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["kl"] < 0.8 * evals[0]["kl"]
    assert evals[0]["teacher_ppl"] == pytest.approx(evals[-1]["teacher_ppl"]), "the teacher is frozen"
    assert [p.name for p in complete_checkpoints(tmp_path / "checkpoints")] == ["step_00000004", "step_00000006"]
    assert result["checkpoint"].endswith("step_00000006")
    assert result["tokens"] == 6 * 128 and result["cursor_end"]["offsets"]["a"] == 6 * 128
    (tmp_path / "checkpoints" / ".step_00000008.partial").mkdir()  # a save killed midway
    (tmp_path / "checkpoints" / "step_00000010").mkdir()  # no train_state.json: never completed
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000006"


def test_resuming_a_finished_stage_trains_nothing_more(tmp_path, teacher, mix):
    _, first = _run(tmp_path, teacher, mix, steps=2)
    done = first(Cursor())
    student, again = _run(tmp_path, teacher, mix, steps=2)
    repeat = again(Cursor())
    assert repeat["cursor_end"] == done["cursor_end"] and repeat["eval"] == pytest.approx(done["eval"])


def test_resume_refuses_another_runs_checkpoints(tmp_path, teacher, mix):
    _, first = _run(tmp_path, teacher, mix, steps=2)
    first(Cursor())
    _, other = _run(tmp_path, teacher, mix, steps=2)
    with pytest.raises(ConfigError, match="different run's output dir"):
        other(Cursor({"a": 128}, {"a": 4}))


def test_nan_loss_is_skipped_then_stops_without_saving(tmp_path, teacher, mix, caplog):
    student, run = _run(tmp_path, teacher, mix, steps=6, save_interval=1, max_nonfinite_steps=3)
    with torch.no_grad():
        student.decoder.layers[0].mlp.linear_fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        run(Cursor())
    assert "step skipped (1 in a row" in caplog.text
    assert complete_checkpoints(tmp_path / "checkpoints") == []


def test_stages_read_disjoint_contiguous_token_ranges(tmp_path, teacher, mix):
    """short -> long (extended context) -> the next child: each starts where the previous stopped."""
    cursor, ranges = Cursor(), []
    long_config = ContextExtension(original_context=32, yarn_factor=2.0, attention_temperature_beta=0.1).apply(STUDENT)
    next_child = tiny_config(hidden_size=24, ffn_hidden_size=48)
    plan = [("short", STUDENT, 32), ("long", long_config, 64), ("next_child", next_child, 32)]
    for name, config, seq_len in plan:
        _, run = _run(tmp_path / name, teacher, mix, config=config, seq_len=seq_len, train_tokens=2 * 4 * seq_len)
        result = run(cursor)
        ranges.append((result["cursor_start"]["offsets"].get("a", 0), result["cursor_end"]["offsets"]["a"]))
        cursor = Cursor.from_dict(result["cursor_end"])
    assert ranges == [(0, 256), (256, 768), (768, 1024)]


def test_context_parallel_slices_tile_the_sequence_in_zigzag_order():
    rows = torch.arange(16).expand(2, -1)
    parts = [context_parallel_slice(rows, 4, r) for r in range(4)]
    assert parts[0][0].tolist() == [0, 1, 14, 15] and parts[3][0].tolist() == [6, 7, 8, 9]
    assert sorted(torch.cat(parts, 1)[0].tolist()) == list(range(16))
    with pytest.raises(ConfigError, match="divisible by 2 x parallel.cp"):
        context_parallel_slice(torch.zeros(1, 12), 4, 0)


def test_context_parallel_without_transformer_engine_is_refused():
    with pytest.raises(ConfigError, match="parallel.cp=2 needs Transformer Engine"):
        build_model(STUDENT, ParallelConfig(cp=2), use_te=False)


def test_frozen_parameters_get_no_update_and_the_rest_trains(tmp_path, teacher, mix):
    student, run = _run(tmp_path, teacher, mix, steps=2, frozen_parameters=("decoder.layers.*.mlp.*", "embedding.*"))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    run(Cursor())
    changed = {name for name, p in student.named_parameters() if not torch.equal(p, before[name])}
    frozen = {name for name in before if name.startswith("embedding.") or ".mlp." in name}
    assert frozen and not (changed & frozen), f"frozen parameters moved: {sorted(changed & frozen)}"
    assert changed == set(before) - frozen


@pytest.mark.parametrize("pattern,message", [("vision.*", "'vision.\\*' matches no parameter"),
                                             ("decoder.layers.0.*", "in some layers only"),
                                             ("*", "freezes every parameter")])
def test_bad_frozen_patterns_are_config_errors(tmp_path, teacher, mix, pattern, message):
    _, run = _run(tmp_path, teacher, mix, steps=1, frozen_parameters=(pattern,))
    with pytest.raises(ConfigError, match=message):
        run(Cursor())


def test_the_teacher_runs_all_micro_batches_through_one_schedule(teacher, monkeypatch):
    """One forward-only schedule per step (the pipeline drains once), and each micro-batch's hidden states are
    the teacher model's own."""
    import nemo_plugins.distill.teacher as teacher_module

    calls, real = [], teacher_module.get_forward_backward_func

    def counting():
        schedule = real()

        def record(**kwargs):
            calls.append(kwargs["num_microbatches"])
            return schedule(**kwargs)

        return record

    monkeypatch.setattr(teacher_module, "get_forward_backward_func", counting)
    micro = [(torch.randint(0, 128, (2, 16)), torch.arange(16).expand(2, -1).contiguous()) for _ in range(3)]
    out = teacher.run(micro)
    assert calls == [3]
    with torch.no_grad():
        for (tokens, positions), fused in zip(micro, out):
            hidden = teacher.model(tokens, positions, return_hidden=True)
            torch.testing.assert_close(fused.hidden, hidden.transpose(0, 1).reshape(-1, hidden.shape[-1]))
