"""The GRPO loss against a naive reference written token by token (value and autograd gradient), its clip at both
ends, group advantages, and zero-advantage groups."""

import math

import pytest
import torch

from nemo_plugins.errors import ConfigError
from nemo_plugins.rl.grpo_loss import GRPOLossOptions, group_advantages, grpo_token_loss


def naive_loss(logp, old_logp, advantages, mask, eps_low, eps_high, kl_beta, ref_logp):
    """Sum over masked tokens of -min(rho A, clip(rho) A) + beta k3, with Python scalars and branches."""
    total, tokens, clipped = 0.0, 0, 0
    for i in range(logp.shape[0]):
        a = float(advantages[i])
        for t in range(logp.shape[1]):
            if mask[i, t] == 0:
                continue
            rho = torch.exp(logp[i, t] - float(old_logp[i, t]))
            low, high = 1 - eps_low, 1 + eps_high
            if (a > 0 and rho > high) or (a < 0 and rho < low):
                term = (high if a > 0 else low) * a + 0 * rho  # the clipped branch: constant in logp
                clipped += 1
            else:
                term = rho * a
            loss = -term
            if kl_beta:
                d = float(ref_logp[i, t]) - logp[i, t]
                loss = loss + kl_beta * (torch.exp(d) - d - 1)
            total = total + loss
            tokens += 1
    return total, tokens, clipped


def _batch(seed=0, rows=6, length=9, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, length, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(rows, length, generator=g, dtype=torch.float64) - 0.5) * spread
    ref = old + (torch.rand(rows, length, generator=g, dtype=torch.float64) - 0.5) * spread
    mask = (torch.rand(rows, length, generator=g) > 0.3).to(torch.float64)
    advantages = torch.randn(rows, generator=g, dtype=torch.float64)
    return logp, old, ref, mask, advantages


@pytest.mark.parametrize("kl_beta", [0.0, 0.05])
def test_loss_and_gradient_equal_the_naive_reference(kl_beta):
    logp, old, ref, mask, advantages = _batch()
    options = GRPOLossOptions(eps_low=0.2, eps_high=0.28, kl_beta=kl_beta)
    fast_logp = logp.clone().requires_grad_(True)
    out = grpo_token_loss(fast_logp, old, advantages, mask, options, ref)
    out.loss_sum.backward()
    naive_logp = logp.clone().requires_grad_(True)
    value, tokens, clipped = naive_loss(naive_logp, old, advantages, mask, 0.2, 0.28, kl_beta, ref)
    value.backward()
    assert 0 < clipped < tokens, "the toy batch must clip some tokens and not others"
    assert out.tokens.item() == tokens and out.clipped.item() == clipped
    torch.testing.assert_close(out.loss_sum, value, rtol=0, atol=1e-6)
    torch.testing.assert_close(fast_logp.grad, naive_logp.grad, rtol=0, atol=1e-6)
    assert bool((fast_logp.grad[mask == 0] == 0).all()), "unmasked tokens get no gradient"


def test_the_clip_cuts_the_gradient_at_each_end_only_on_its_side():
    options = GRPOLossOptions(eps_low=0.2, eps_high=0.28)
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[0.7, 0.9, 1.2, 1.35]], dtype=torch.float64)  # below 0.8, inside, inside, above 1.28
    for advantage, cut in ((1.0, [False, False, False, True]), (-1.0, [True, False, False, False])):
        logp = ratios.log().requires_grad_(True)
        out = grpo_token_loss(logp, old, torch.tensor([advantage], dtype=torch.float64), torch.ones(1, 4), options)
        out.loss_sum.backward()
        assert [bool(g == 0) for g in logp.grad[0]] == cut, (advantage, logp.grad)
        assert out.clipped.item() == 1
        # where the gradient flows it is d(-rho A)/d logp = -rho A
        flowing = ~torch.tensor(cut)
        torch.testing.assert_close(logp.grad[0][flowing], -ratios[0][flowing] * advantage)
    wide = GRPOLossOptions(eps_low=0.2, eps_high=0.4)  # clip-higher: 1.35 is inside 1 + 0.4
    logp = ratios.log().requires_grad_(True)
    grpo_token_loss(logp, old, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 4), wide).loss_sum.backward()
    assert bool((logp.grad != 0).all())


def test_group_advantages_are_centred_and_optionally_scaled():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    centred = group_advantages(rewards, scale_by_std=False)
    torch.testing.assert_close(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))
    assert bool((centred[1] == 0).all())
    torch.testing.assert_close(centred[2], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))
    scaled = group_advantages(rewards, scale_by_std=True)
    std = math.sqrt(sum((x - 0.25) ** 2 for x in [1.0, 0.0, 0.0, 0.0]) / 3)
    torch.testing.assert_close(scaled[2], centred[2] / (std + 1e-4))
    assert bool((scaled[1] == 0).all()), "a group with equal rewards has zero advantage, scaled or not"


def test_a_zero_advantage_group_contributes_tokens_but_no_gradient():
    logp, old, _, mask, _ = _batch(seed=1, rows=4, spread=0.01)  # nothing clipped
    logp.requires_grad_(True)
    advantages = group_advantages(torch.tensor([[0.3, 0.3], [1.0, 0.0]], dtype=torch.float64), False).reshape(-1)
    out = grpo_token_loss(logp, old, advantages, mask, GRPOLossOptions())
    out.loss_sum.backward()
    assert bool((logp.grad[:2] == 0).all()) and bool((logp.grad[2:][mask[2:] > 0] != 0).all())


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="grpo.eps_low"):
        GRPOLossOptions(eps_low=1.0)
    with pytest.raises(ConfigError, match="grpo.eps_high"):
        GRPOLossOptions(eps_high=0.0)
    with pytest.raises(ConfigError, match="grpo.kl_beta"):
        GRPOLossOptions(kl_beta=-0.1)
    logp, old, _, mask, advantages = _batch()
    with pytest.raises(ValueError, match="reference"):
        grpo_token_loss(logp, old, advantages, mask, GRPOLossOptions(kl_beta=0.1))
