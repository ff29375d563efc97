"""Temperature calibration: the fit recovers a planted temperature, ECE equals a naive loop, calibration lowers
NLL and ECE of over-confident logits, the reliability plot is written."""

import pytest
import torch

from nemo_plugins.errors import DataError
from nemo_plugins.rl.calibration import (
    CalibrationSettings,
    binary_nll,
    calibrate,
    expected_calibration_error,
    fit_temperature,
    probabilities,
    reliability_plot,
)


def _overconfident(n: int, tau: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Outcomes drawn from sigmoid(u); the judge reports tau x u (over-confident when tau > 1)."""
    g = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, generator=g, dtype=torch.float64) * 2.0
    outcomes = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(true_logits)).double()
    return true_logits * tau, outcomes


@pytest.mark.parametrize("true_tau", [0.5, 3.0])
def test_the_fit_recovers_a_planted_temperature(true_tau):
    logits, outcomes = _overconfident(40_000, true_tau, seed=1)
    assert fit_temperature(logits, outcomes) == pytest.approx(true_tau, rel=0.05)


def test_the_fit_on_both_orders_recovers_the_temperature_of_the_averaged_probability():
    """Two orders whose logits disagree (a position bias of +-1): tau is fitted on their averaged probability; at
    the fitted tau no other tau has a lower NLL."""
    logits, outcomes = _overconfident(20_000, 2.0, seed=2)
    both = torch.stack([logits + 1.0, logits - 1.0], -1)
    tau = fit_temperature(both, outcomes)
    best = binary_nll(both, outcomes, tau)
    for other in (0.8 * tau, 0.95 * tau, 1.05 * tau, 1.25 * tau):
        assert binary_nll(both, outcomes, other) > best


def _naive_ece(p: list[float], y: list[float], bins: int) -> float:
    """Guo et al.'s top-label ECE, written out with lists."""
    members = [[] for _ in range(bins)]
    for prob, outcome in zip(p, y):
        confidence = max(prob, 1 - prob)
        correct = 0.5 if prob == 0.5 else 1.0 if (prob > 0.5) == (outcome == 1) else 0.0
        b = 0
        while not (b / bins < confidence <= (b + 1) / bins) and b < bins - 1:
            b += 1
        members[b].append((confidence, correct))
    return sum(len(m) / len(p) * abs(sum(c for _, c in m) / len(m) - sum(x for x, _ in m) / len(m))
               for m in members if m)


@pytest.mark.parametrize("bins", [5, 10, 15])
def test_ece_equals_a_naive_implementation(bins):
    g = torch.Generator().manual_seed(bins)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    p[:10] = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.0, 0.3, 0.4, 0.2], dtype=torch.float64)  # bin edges
    y = (torch.rand(500, generator=g) < 0.6).double()
    assert expected_calibration_error(p, y, bins) == pytest.approx(_naive_ece(p.tolist(), y.tolist(), bins), abs=1e-12)


def test_a_perfectly_calibrated_judge_has_small_ece_and_an_overconfident_one_does_not():
    logits, outcomes = _overconfident(40_000, 1.0, seed=3)
    assert expected_calibration_error(probabilities(logits), outcomes) < 0.01
    assert expected_calibration_error(probabilities(4 * logits), outcomes) > 0.05


def test_calibrate_lowers_nll_and_ece_on_pairs_it_was_not_fitted_on(tmp_path):
    fit, fit_y = _overconfident(5_000, 4.0, seed=4)
    test, test_y = _overconfident(5_000, 4.0, seed=5)
    report = calibrate(fit, fit_y, test, test_y, CalibrationSettings(bins=10))
    assert report.tau == pytest.approx(4.0, rel=0.15)
    assert report.nll_after < report.nll_before and report.ece_after < 0.5 * report.ece_before
    assert report.accuracy == pytest.approx(float(((test > 0) == (test_y == 1)).double().mean()))
    path = reliability_plot({"before": (probabilities(test), test_y), "after": (probabilities(test, report.tau), test_y)},
                            tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soft_outcomes_have_no_ece():
    with pytest.raises(DataError, match="hard outcomes"):
        expected_calibration_error(torch.tensor([0.7, 0.2]), torch.tensor([0.9, 0.0]))


def test_nll_stays_finite_when_float32_probabilities_saturate():
    logits = torch.tensor([[50.0, -50.0], [60.0, 55.0]])  # float32: sigmoid(5000) is exactly 1
    assert torch.isfinite(binary_nll(logits, torch.tensor([1.0, 0.0]), 0.01))
