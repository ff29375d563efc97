"""Temperature calibration of a pairwise judge: fit one temperature on held-out pairs by minimising NLL, and the
numbers that say whether it worked (NLL, expected calibration error, a reliability plot).

A judge reads a pair in both orders: ``logits`` [n, k] are the k "first response wins" logits re-expressed as
"A wins" logits (``z_AB`` and ``-z_BA``; k = 1 is plain temperature scaling). The judge's probability is
``p(A) = sigmoid(mean_j logits[:, j] / tau)``: the orders are averaged in logit space, then ONE temperature
scales that margin, and tau is fitted on exactly that probability (what online DPO's judge uses).

Why the logits and not the probabilities: a position bias is an additive shift b of the first position's logit
(``z_AB = s + b``, ``z_BA = -s + b``), so the averaged logit is exactly the bias-free margin s whatever b is.
Averaging the probabilities instead, 1/2 [sigmoid(s + b) + sigmoid(s - b)], cancels b only to first order and
pulls every pair towards 1/2 when |b| is comparable to |s|; no single temperature then undoes it (scaling
s + b and s - b together keeps them on both sides of 0), and fitting tau on that average drives it to its lower
bound wherever the orders disagree (measured on the demo PWRM: accuracy 0.74 while every averaged probability
sat in 0.50-0.52, ECE 0.268 -> 0.268 with tau fitted on single orders, tau at the 0.01 bound fitted on the
average). On the averaged margin it is standard temperature scaling of one logit: NLL is convex in ``1 / tau``,
so a 1-D L-BFGS on ``log tau`` (positive by construction) finds it in a few iterations.

ECE (Guo et al. 2017, top-label): confidence = max(p, 1 - p), correct = the more probable response is the
preferred one; equal-width confidence bins; ECE = sum over bins of (bin size / n) x |accuracy - mean confidence|.
Outcomes must be hard (1 = A preferred, 0 = B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from nemo_plugins.errors import ConfigError, DataError

TAU_BOUNDS = (1e-2, 1e2)  # a fit outside this range means the logits carry no usable signal


@dataclass
class CalibrationSettings:
    """``bins``: ECE / reliability bins; ``max_iterations``: L-BFGS iterations of the fit."""

    bins: int = 10
    max_iterations: int = 100

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ConfigError(f"calibration.bins must be >= 2, got {self.bins}")
        if self.max_iterations < 1:
            raise ConfigError(f"calibration.max_iterations must be >= 1, got {self.max_iterations}")


def probabilities(logits: torch.Tensor, tau: float | torch.Tensor = 1.0) -> torch.Tensor:
    """[n] p(A wins) from [n, k] "A wins" logits: sigmoid of their mean over orders, divided by tau."""
    return torch.sigmoid(_as_matrix(logits).mean(-1) / tau)


def binary_nll(logits: torch.Tensor, targets: torch.Tensor, tau: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Mean negative log-likelihood of (soft or hard) ``targets`` [n] under ``probabilities(logits, tau)``."""
    p = probabilities(logits.double(), tau).clamp(1e-12, 1 - 1e-12)  # float32 would round 1 - 1e-12 to 1
    targets = targets.to(p.dtype)
    return -(targets * p.log() + (1 - targets) * (-p).log1p()).mean()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor,
                    settings: CalibrationSettings = CalibrationSettings()) -> float:
    """The tau minimising ``binary_nll`` on held-out pairs (L-BFGS on log tau, float64)."""
    logits, targets = _as_matrix(logits).double(), targets.double().reshape(-1)
    if logits.shape[0] != targets.shape[0] or logits.shape[0] == 0:
        raise DataError(f"temperature fit needs one target per pair and at least one pair: {logits.shape[0]} pairs, "
                        f"{targets.shape[0]} targets")
    log_tau = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_tau], lr=1.0, max_iter=settings.max_iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = binary_nll(logits, targets, log_tau.exp())
        loss.backward()
        return loss

    optimizer.step(closure)
    low, high = TAU_BOUNDS
    return float(log_tau.detach().exp().clamp(low, high))


def expected_calibration_error(p: torch.Tensor, outcomes: torch.Tensor, bins: int = 10) -> float:
    """Top-label ECE of probabilities ``p`` [n] that A wins against hard ``outcomes`` [n] (1: A preferred)."""
    p, outcomes = p.double().reshape(-1), outcomes.double().reshape(-1)
    _check_hard(outcomes)
    confidence, correct = top_label(p, outcomes)
    index = bin_index(confidence, bins)
    total = torch.zeros((), dtype=torch.float64)
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.double().mean() * (correct[inside].mean() - confidence[inside].mean()).abs()
    return float(total)


def top_label(p: torch.Tensor, outcomes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence max(p, 1 - p) and whether the more probable response is the preferred one; an exact tie
    (p = 1/2, e.g. saturated orders that disagree) is right half the time, as a coin flip would be."""
    correct = ((p > 0.5) == (outcomes > 0.5)).double()
    return torch.maximum(p, 1 - p), torch.where(p == 0.5, torch.full_like(correct, 0.5), correct)


def bin_index(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bins over [0, 1], right-closed: bin b holds (b / bins, (b + 1) / bins]."""
    return (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)


@dataclass(frozen=True)
class CalibrationReport:
    """The fitted temperature and the held-out numbers before (tau = 1) and after it."""

    tau: float
    fit_pairs: int  # pairs tau was fitted on (none of them among the test pairs)
    test_pairs: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    accuracy: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(fit_logits: torch.Tensor, fit_targets: torch.Tensor, test_logits: torch.Tensor,
              test_outcomes: torch.Tensor, settings: CalibrationSettings = CalibrationSettings()) -> CalibrationReport:
    """Fit tau on one held-out set and report NLL / ECE before and after on another (a fit measured on its own
    pairs would flatter it). Accuracy does not depend on tau: scaling never moves p across 1/2."""
    tau = fit_temperature(fit_logits, fit_targets, settings)
    before, after = probabilities(test_logits).double(), probabilities(test_logits, tau).double()
    return CalibrationReport(
        tau=tau, fit_pairs=int(fit_targets.numel()), test_pairs=int(test_outcomes.numel()),
        nll_before=float(binary_nll(test_logits, test_outcomes)),
        nll_after=float(binary_nll(test_logits, test_outcomes, tau)),
        ece_before=expected_calibration_error(before, test_outcomes, settings.bins),
        ece_after=expected_calibration_error(after, test_outcomes, settings.bins),
        accuracy=float(top_label(after, test_outcomes.double())[1].mean()))


def reliability_plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, bins: int = 10) -> Path:
    """A reliability diagram (accuracy against mean confidence per bin, with the diagonal) of each named
    ``(p, outcomes)`` curve, e.g. before and after calibration, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", label="perfect calibration")
    for name, (p, outcomes) in curves.items():
        confidence, correct = top_label(p.double().reshape(-1), outcomes.double().reshape(-1))
        index = bin_index(confidence, bins)
        points = [(float(confidence[index == b].mean()), float(correct[index == b].mean()), int((index == b).sum()))
                  for b in range(bins) if (index == b).any()]
        ece = expected_calibration_error(p, outcomes, bins)
        axis.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=f"{name} (ECE {ece:.3f})")
    axis.set_xlabel("confidence max(p, 1 - p)")
    axis.set_ylabel("accuracy of the more probable response")
    axis.set_xlim(0.45, 1.02)
    axis.set_ylim(0.0, 1.02)
    axis.legend(loc="lower right")
    axis.set_title("PWRM reliability on held-out pairs")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def _as_matrix(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, None] if logits.dim() == 1 else logits


def _check_hard(outcomes: torch.Tensor) -> None:
    if not bool(((outcomes == 0) | (outcomes == 1)).all()):
        raise DataError("expected calibration error needs hard outcomes (1: A preferred, 0: B preferred); "
                        "soft labels have no top label to be right or wrong about")

