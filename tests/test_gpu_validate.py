"""bench/gpu_validate.py in its reduced CPU mode: the rows it can check pass, the TE/GPU rows say why they are
skipped, and each check fails when what it compares is made to differ."""

import importlib.util
import sys
from pathlib import Path

import pytest

from nemo_plugins.distill.kl_loss import KLOptions

PATH = Path(__file__).resolve().parents[1] / "bench" / "gpu_validate.py"


@pytest.fixture(scope="module")
def gpu_validate():
    spec = importlib.util.spec_from_file_location("gpu_validate", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def states(gpu_validate):
    return gpu_validate.random_states(gpu_validate.CPU)


def test_cpu_mode_checks_what_it_can_and_names_what_it_skips(gpu_validate, capsys):
    rows = {row.name: row for row in gpu_validate.main(["--cpu"])}
    out = capsys.readouterr().out
    assert rows["local spec == transformers (packed documents, fp32)"].result == "ok"
    assert rows["KD step loss == plain transformers + PyTorch loop"].result == "ok"
    assert rows["KD tokens/s, ours (local spec) / plain"].result == "measured"
    skipped = [name for name, row in rows.items() if row.result.startswith("skipped: ")]
    assert skipped == ["TE spec == local spec (packed documents, THD)",
                       "THD + attention temperature == local block-diagonal", "MFU float32", "MFU fp8",
                       "peak GPU memory vs memory model"]
    assert all(name in out for name in rows) and "needs Transformer Engine on a GPU" in out
    assert rows["checkpoint save -> resume == straight run (FP32Optimizer)"].result == "ok"


def test_the_logits_row_fails_when_transformers_sees_rows_instead_of_documents(gpu_validate, states, monkeypatch):
    """Our packed rows attend within each document; transformers fed whole rows attends across them."""
    monkeypatch.setattr(gpu_validate, "documents",
                        lambda positions: [(row, 0, positions.shape[1]) for row in range(positions.shape[0])])
    assert gpu_validate.local_vs_transformers(gpu_validate.CPU, states["student"]).result == "FAIL"


def test_the_kd_row_fails_when_our_step_computes_another_loss(gpu_validate, states, monkeypatch):
    monkeypatch.setattr(gpu_validate, "KLOptions",
                        lambda chunk_tokens: KLOptions(temperature=2.0, chunk_tokens=chunk_tokens))
    rows = gpu_validate.kd_rows(gpu_validate.CPU, states, (None, "no GPU"))
    assert rows[0].name == "KD step loss == plain transformers + PyTorch loop" and rows[0].result == "FAIL"


def test_the_resume_row_fails_when_the_checkpoint_loses_the_optimizer_state(gpu_validate, states, monkeypatch):
    """Restoring the weights but not Adam's moments changes the resumed step."""
    real_load = gpu_validate.load_checkpoint

    def load_then_lose_the_moments(path, model, optimizer):
        state = real_load(path, model, optimizer)
        for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
            for moments in chained.optimizer.state.values():
                moments["exp_avg"].zero_()
                moments["exp_avg_sq"].zero_()
        return state

    monkeypatch.setattr(gpu_validate, "load_checkpoint", load_then_lose_the_moments)
    row = gpu_validate.checkpoint_resume(gpu_validate.CPU, states, use_te=False)
    assert row.result == "FAIL" and "two straight runs: 0.0e+00" in row.detail
