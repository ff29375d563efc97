"""Temperature calibration: the fit recovers a planted temperature (one order, and two orders with a position
bias, averaged in logit space), equals a grid search, ECE equals a naive loop, calibration lowers NLL and ECE of
over-confident logits on pairs it was not fitted on, the reliability plot is written."""

import math

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


def _both_orders(n: int, tau: float, bias: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two orders of a judge that is ``tau`` times over-confident and adds ``bias`` to the first position's
    logit, re-expressed as "A wins" logits: z_AB = tau u + b, -z_BA = tau u - b."""
    logits, outcomes = _overconfident(n, tau, seed)
    return torch.stack([logits + bias, logits - bias], -1), outcomes


@pytest.mark.parametrize("true_tau", [0.3, 4.0])
def test_the_fit_on_both_orders_recovers_the_temperature_whatever_the_position_bias(true_tau):
    """Under- (0.3) and over-confident (4.0) judges with a position bias as large as their margins: the fit on the
    order-averaged margin recovers the planted temperature, and at it ECE is small and below the uncalibrated one."""
    logits, outcomes = _both_orders(40_000, true_tau, bias=3.0 * true_tau, seed=2)
    tau = fit_temperature(logits, outcomes)
    assert tau == pytest.approx(true_tau, rel=0.05)
    assert expected_calibration_error(probabilities(logits, tau), outcomes) < 0.01
    assert expected_calibration_error(probabilities(logits), outcomes) > 0.05
    naive = torch.sigmoid(logits / tau).mean(-1)  # the two probabilities averaged: the bias still pulls towards 1/2
    assert expected_calibration_error(naive, outcomes) > 0.05


def test_the_fitted_temperature_minimises_the_nll_of_a_grid():
    logits, outcomes = _both_orders(5_000, 2.0, bias=1.0, seed=6)
    tau = fit_temperature(logits, outcomes)
    grid = torch.linspace(0.5, 5.0, 451, dtype=torch.float64)
    naive = grid[torch.stack([binary_nll(logits, outcomes, t) for t in grid]).argmin()]
    assert tau == pytest.approx(float(naive), abs=0.011)


def test_the_judges_probability_is_the_sigmoid_of_the_averaged_logit():
    logits = torch.tensor([[2.0, 0.0], [-1.0, -3.0], [4.0, -4.0]], dtype=torch.float64)
    expected = [1 / (1 + math.exp(-m / 0.5)) for m in (1.0, -2.0, 0.0)]
    assert probabilities(logits, 0.5).tolist() == pytest.approx(expected, abs=1e-12)


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
    curves = {"before": (probabilities(test), test_y), "after": (probabilities(test, report.tau), test_y)}
    path = reliability_plot(curves, tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soft_outcomes_have_no_ece():
    with pytest.raises(DataError, match="hard outcomes"):
        expected_calibration_error(torch.tensor([0.7, 0.2]), torch.tensor([0.9, 0.0]))


def test_nll_stays_finite_when_float32_probabilities_saturate():
    logits = torch.tensor([[50.0, -50.0], [60.0, 55.0]])  # float32: sigmoid(5000) is exactly 1
    assert torch.isfinite(binary_nll(logits, torch.tensor([1.0, 0.0]), 0.01))
