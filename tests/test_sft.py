"""SFT with logit distillation: the loss sees assistant tokens only, the recipe learns, resumes bit-identically
after a SIGKILL, and refuses a teacher with another tokenizer."""

import json
import math
import random
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

from nemo_plugins.convert.sources import ModelSource, tokenizer_dir
from nemo_plugins.data.mix import Cursor
from nemo_plugins.distill.kl_loss import KLOptions, naive_kl_loss
from nemo_plugins.distill.step import DistillationStep, use_per_token_loss
from nemo_plugins.distill.teacher import Teacher
from nemo_plugins.distributed import ParallelConfig
from nemo_plugins.errors import ConfigError
from nemo_plugins.generation.torch_engine import check_layout, generation_layout
from nemo_plugins.model.builder import build_model
from nemo_plugins.rl.sft_kd import PlainSFTStep, check_tokenizers, heldout_nll
from nemo_plugins.train.config import TrainSettings
from nemo_plugins.train.metrics import MetricsLog
from nemo_plugins.train.optimizer import wrap_for_training
from tests.conftest import save_tiny_teacher_and_student, tiny_config
from tests.recipe_runs import interrupt_after_step, recipe_env, train_records

STEPS = 6


def test_the_distillation_step_with_a_target_mask_is_the_kl_of_the_masked_tokens_only():
    """Against a naive reference on full logits: the mean KL over the masked targets of the whole batch (two
    micro-batches with unequal target counts weigh every target alike)."""
    torch.manual_seed(0)
    teacher_model = build_model(tiny_config(), ParallelConfig())
    student = build_model(tiny_config(hidden_size=32), ParallelConfig())
    train = TrainSettings(seq_len=16, micro_batch_size=2, global_batch_size=4, train_tokens=64)
    tokens = torch.randint(0, 128, (4, 16))
    positions = torch.arange(16).expand(4, -1).contiguous()
    target_mask = (torch.rand(4, 16) < 0.4).float()
    use_per_token_loss(student)
    ddp, _ = wrap_for_training(student)
    step = DistillationStep(Teacher(teacher_model), KLOptions(chunk_tokens=8), train)
    loss = step(ddp, (tokens, positions, target_mask))

    with torch.no_grad():
        mask = target_mask.clone()
        mask[:, -1] = 0  # the last position has no next token
        assert mask[:2].sum() != mask[2:].sum(), "the micro-batches must differ in target count"
        t = teacher_model(tokens, positions).float()
        s = student(tokens, positions).float()
        expected = float(naive_kl_loss(s.reshape(-1, 128), t.reshape(-1, 128), mask.reshape(-1)))
    assert loss == pytest.approx(expected, rel=1e-5)
    unmasked = DistillationStep(Teacher(teacher_model), KLOptions(chunk_tokens=8), train)(ddp, (tokens, positions))
    assert unmasked != pytest.approx(loss, rel=1e-3), "the mask must change which tokens count"


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path):
    ours = tokenizer_dir(ModelSource.parse("embedded:smollm2"))
    other = tmp_path / "other"
    shutil.copytree(ours, other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # same size, two ids swapped: still another tokenizer
    (other / "tokenizer.json").write_text(json.dumps(spec))
    check_tokenizers(ours, ours)
    with pytest.raises(ConfigError, match="tokenizer .* differs from the student's"):
        check_tokenizers(other, ours)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny teacher and student on SmolLM2's real tokenizer and chat template, as megatron checkpoints."""
    root = tmp_path_factory.mktemp("sft_recipe")
    save_tiny_teacher_and_student(root)
    return root


def _command(root, out_dir):
    return [sys.executable, "-m", "recipes.sft", "model=tiny", f"model.source=megatron:{root / 'teacher'}",
            f"student=megatron:{root / 'student'}", f"chat_data.cache_dir={root / 'chat'}",
            "chat_data.sources=[{name: arithmetic, paths: ['builtin:arithmetic?count=300'], weight: 1.0}]",
            "stage.sft_kd.train.seq_len=256", "stage.sft_kd.train.micro_batch_size=2",
            "stage.sft_kd.train.global_batch_size=4", f"stage.sft_kd.train.train_tokens={STEPS * 1024}",
            "stage.sft_kd.train.save_interval=2", "stage.sft_kd.train.eval_rows_per_source=4",
            "stage.sft_kd.optimizer.lr=3e-3", "stage.sft_kd.sample.max_new_tokens=4", f"output_dir={out_dir}"]


@pytest.mark.slow
def test_sft_recipe_lowers_assistant_kl_and_a_sigkill_resumes_bit_identically(checkpoints, tmp_path):
    env = recipe_env()
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(checkpoints, reference), check=True, env=env, capture_output=True)
    manifest = json.loads((reference / "manifest.json").read_text())
    evals = [r for r in MetricsLog.read(reference / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals[-1]["kl"] < 0.9 * evals[0]["kl"], "SFT-KD must lower the held-out assistant-token KL"
    assert evals[0]["tokens"] == manifest["eval"]["tokens"] < 4 * 256, "only assistant targets are counted"
    assert Cursor.from_dict(manifest["cursor_end"]).tokens() > 0 and len(manifest["samples"]["after"]) == 2

    kill_after = random.randrange(1, STEPS - 1)
    interrupted = tmp_path / "interrupted"
    code, _ = interrupt_after_step(_command(checkpoints, interrupted), interrupted, kill_after + 1, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"the job finished before the kill after step {kill_after + 1}"
    subprocess.run(_command(checkpoints, interrupted), check=True, env=env, capture_output=True)
    assert train_records(interrupted) == train_records(reference), f"killed after step {kill_after + 1}"
    resumed = json.loads((interrupted / "manifest.json").read_text())
    assert resumed["eval"] == manifest["eval"] and resumed["cursor_end"] == manifest["cursor_end"]
    assert resumed["samples"] == manifest["samples"]


@pytest.mark.parametrize("training", [ParallelConfig(tp=8, cp=8, sequence_parallel=True), ParallelConfig(tp=2, pp=4)])
def test_samples_and_exports_load_in_a_layout_the_generation_engine_runs(training):
    layout = generation_layout(training)
    assert layout.tp == training.tp
    check_layout(types.SimpleNamespace(pipeline_model_parallel_size=layout.pp, context_parallel_size=layout.cp,
                                       sequence_parallel=layout.sequence_parallel))


def test_plain_sft_is_the_masked_cross_entropy_of_the_assistant_tokens_without_a_teacher():
    """kl.ce_weight = 1: the step and the held-out numbers against a naive full-logit cross-entropy over the masked
    targets of the whole batch (two micro-batches with unequal target counts weigh every target alike)."""
    torch.manual_seed(0)
    student = build_model(tiny_config(hidden_size=32), ParallelConfig())
    train = TrainSettings(seq_len=16, micro_batch_size=2, global_batch_size=4, train_tokens=64)
    tokens = torch.randint(0, 128, (4, 16))
    positions = torch.arange(16).expand(4, -1).contiguous()
    target_mask = (torch.rand(4, 16) < 0.4).float()
    with torch.no_grad():
        mask = target_mask.clone()
        mask[:, -1] = 0  # the last position has no next token
        assert mask[:2].sum() != mask[2:].sum(), "the micro-batches must differ in target count"
        logits = student(tokens, positions).float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1),
                                                reduction="none")
        expected = float((nll * mask[:, :-1].reshape(-1)).sum() / mask.sum())
    heldout = heldout_nll(student, tokens, positions, target_mask, micro_batch_size=3)
    assert heldout["loss"] == pytest.approx(expected, rel=1e-5) and heldout["tokens"] == int(mask.sum())
    assert heldout["student_ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    use_per_token_loss(student)
    ddp, _ = wrap_for_training(student)
    assert PlainSFTStep(train)(ddp, (tokens, positions, target_mask)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_plain_sft_neither_loads_nor_runs_a_teacher(checkpoints, tmp_path):
    """With kl.ce_weight = 1 the teacher's logits would be multiplied by 0: a teacher with a tokenizer but no
    config or weights is never opened, and the manifest says there was none."""
    out = tmp_path / "plain"
    shutil.copytree(checkpoints / "student" / "tokenizer", tmp_path / "no_teacher_here" / "tokenizer")
    command = [*_command(checkpoints, out)[:-1], "stage.sft_kd.kl.ce_weight=1.0", f"output_dir={out}",
               f"stage.sft_kd.teacher=megatron:{tmp_path / 'no_teacher_here'}",
               f"stage.sft_kd.train.train_tokens={2 * 1024}"]
    done = subprocess.run(command, env=recipe_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    evals = [r for r in MetricsLog.read(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert manifest["teacher"] is None and manifest["steps"] == 2 and "kl" not in evals[0]
    assert evals[-1]["loss"] < evals[0]["loss"], "cross-entropy on the assistant tokens goes down"
