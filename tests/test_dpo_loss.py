"""The soft two-sided DPO loss: the formula and its gradient, standard DPO at hard labels, beta-rescaling."""

import math

import pytest
import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.dpo_loss import DPOOptions, log_ratio_margin, soft_dpo_loss


def _formula(m: float, p: float, beta: float) -> float:
    """The loss written term by term in plain floats."""
    sig = 1.0 / (1.0 + math.exp(-beta * m))
    return -p * math.log(sig) - (1 - p) * math.log(1 - sig)


@pytest.mark.parametrize("rescale", ["none", "inv_beta"])
def test_the_loss_and_its_gradient_are_the_formula(rescale):
    torch.manual_seed(0)
    beta = 0.3
    margin = (torch.randn(16, dtype=torch.float64) * 4).requires_grad_()
    p = torch.rand(16, dtype=torch.float64)
    loss = soft_dpo_loss(margin, p, DPOOptions(beta=beta, beta_rescale=rescale))
    scale = 1 / beta if rescale == "inv_beta" else 1.0
    expected = [scale * _formula(m, q, beta) for m, q in zip(margin.tolist(), p.tolist())]
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    loss.sum().backward()
    # d/dm of the formula: beta (sigmoid(beta m) - p), times the rescale
    sig = torch.sigmoid(beta * margin.detach())
    assert torch.allclose(margin.grad, scale * beta * (sig - p), atol=1e-6)
    # and autograd of the term-by-term formula through torch ops
    m2 = margin.detach().clone().requires_grad_()
    naive = -p * torch.log(torch.sigmoid(beta * m2)) - (1 - p) * torch.log(1 - torch.sigmoid(beta * m2))
    (scale * naive).sum().backward()
    assert torch.allclose(margin.grad, m2.grad, atol=1e-6)


def _standard_dpo(policy_w, ref_w, policy_l, ref_l, beta):
    """Rafailov et al.'s DPO, written from the paper: -log sigmoid(beta (log-ratio of the winner - of the loser))."""
    return -torch.nn.functional.logsigmoid(beta * ((policy_w - ref_w) - (policy_l - ref_l)))


def test_hard_probabilities_give_standard_dpo():
    torch.manual_seed(1)
    pa, ra, pb, rb = (torch.randn(8, dtype=torch.float64) * 10 for _ in range(4))
    m = log_ratio_margin(pa, ra, pb, rb)
    first_wins = torch.tensor([1.0, 0.0] * 4, dtype=torch.float64)
    loss = soft_dpo_loss(m, first_wins, DPOOptions(beta=0.5, beta_rescale="none"))
    expected = torch.where(first_wins == 1, _standard_dpo(pa, ra, pb, rb, 0.5), _standard_dpo(pb, rb, pa, ra, 0.5))
    assert torch.allclose(loss, expected, atol=1e-9)


def test_hard_labels_round_p_and_keep_ties():
    m = torch.tensor([0.7, 0.7, 0.7, 0.7], dtype=torch.float64)
    p = torch.tensor([0.8, 0.2, 0.5, 1.0], dtype=torch.float64)
    hard = soft_dpo_loss(m, p, DPOOptions(beta=1.0, hard_labels=True))
    rounded = soft_dpo_loss(m, torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64), DPOOptions(beta=1.0))
    assert torch.equal(hard, rounded)
    assert not torch.allclose(hard, soft_dpo_loss(m, p, DPOOptions(beta=1.0))), "soft labels must differ"


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_inv_beta_makes_the_gradient_at_zero_margin_independent_of_beta(p):
    grads = {}
    for rescale in ("none", "inv_beta"):
        for beta in (0.01, 0.1, 1.0):
            m = torch.zeros(1, dtype=torch.float64, requires_grad=True)
            options = DPOOptions(beta=beta, beta_rescale=rescale)
            soft_dpo_loss(m, torch.tensor([p], dtype=torch.float64), options).sum().backward()
            grads[rescale, beta] = m.grad.item()
    assert grads["inv_beta", 0.01] == pytest.approx(grads["inv_beta", 1.0], abs=1e-12)
    assert grads["inv_beta", 0.1] == pytest.approx(0.5 - p, abs=1e-12)
    assert grads["none", 0.01] == pytest.approx(0.01 * grads["none", 1.0], abs=1e-12), "without rescaling it scales"


def test_a_soft_label_is_minimised_at_logit_p():
    p = torch.tensor([0.8], dtype=torch.float64)
    beta = 0.2
    best = math.log(0.8 / 0.2) / beta
    values = [soft_dpo_loss(torch.tensor([m], dtype=torch.float64), p, DPOOptions(beta=beta)).item()
              for m in (best - 1, best, best + 1)]
    assert values[1] < values[0] and values[1] < values[2]


def test_bad_settings_and_probabilities_are_refused():
    with pytest.raises(ConfigError, match="dpo.beta must be > 0"):
        DPOOptions(beta=0.0)
    with pytest.raises(ConfigError, match="dpo.beta_rescale"):
        DPOOptions(beta_rescale="beta")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_dpo_loss(torch.zeros(1), torch.tensor([1.5]), DPOOptions())
