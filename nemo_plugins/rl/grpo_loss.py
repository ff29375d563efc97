"""The GRPO loss as a pure function of per-token log-probs: group advantages, clip-higher, token-level sums.

For the G responses of one prompt with rewards r_1..r_G, the advantage of response i is ``r_i - mean(r)``
(optionally divided by ``std(r) + 1e-4``, the sample std: ``scale_by_std``), the same for each of its tokens.
A group whose rewards are all equal has zero advantage everywhere: it carries no signal, and the step drops it.

Per response token t with ratio ``rho = exp(logp_t - old_logp_t)`` (old: the sampling policy's log-prob):

    objective_t = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)                 (PPO's clipped surrogate)
    loss_t      = -objective_t + kl_beta * k3_t,   k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1

``eps_high > eps_low`` is DAPO's clip-higher: a rare token with positive advantage may grow further before its
gradient is cut, which keeps exploration alive. k3 is Schulman's unbiased, non-negative KL(pi || ref) estimator
(DeepSeekMath's GRPO); ``kl_beta`` 0 (the default) drops the reference altogether.

Normalisation is token-level (DAPO): the caller sums ``loss_t`` over every response token of the batch's kept
groups and divides by their number, so each token weighs the same whatever its response's length (GRPO's
per-response mean gives a long wrong answer's tokens less weight than a short one's). Here the function returns
the sums; megatron's per-token-loss path divides by the global count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_plugins.errors import ConfigError

STD_EPS = 1e-4  # added to a group's reward std before dividing: a near-constant group's advantages stay bounded


@dataclass
class GRPOLossOptions:
    eps_low: float = 0.2
    eps_high: float = 0.28
    scale_by_std: bool = False
    kl_beta: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.eps_low < 1:
            raise ConfigError(f"grpo.eps_low must be in (0, 1) (the ratio's lower clip is 1 - eps_low), "
                              f"got {self.eps_low}")
        if not self.eps_high > 0:
            raise ConfigError(f"grpo.eps_high must be > 0 (the ratio's upper clip is 1 + eps_high), "
                              f"got {self.eps_high}")
        if self.kl_beta < 0:
            raise ConfigError(f"grpo.kl_beta must be >= 0 (0: no reference model), got {self.kl_beta}")


def group_advantages(rewards: torch.Tensor, scale_by_std: bool) -> torch.Tensor:
    """[groups, G] advantages from [groups, G] rewards: minus the group mean, optionally over the group std."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + STD_EPS)


@dataclass(frozen=True)
class TokenLoss:
    """Sums over the masked tokens (the caller normalises by the global token count)."""

    loss_sum: torch.Tensor  # scalar, carries the gradient
    tokens: torch.Tensor  # scalar: masked tokens
    clipped: torch.Tensor  # scalar: tokens whose clipped branch was active (their gradient is zero)
    kl_sum: torch.Tensor  # scalar: sum of k3 (0 without a reference)


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    options: GRPOLossOptions, ref_logp: torch.Tensor | None = None) -> TokenLoss:
    """The loss summed over the response tokens of [n, s] rows: ``logp`` (with gradient), ``old_logp`` and
    ``ref_logp`` (without), ``mask`` 1 on scored tokens, ``advantages`` [n] one per row."""
    if options.kl_beta > 0 and ref_logp is None:
        raise ValueError("grpo.kl_beta > 0 needs the reference model's log-probs")
    mask = mask.to(logp.dtype)
    advantage = advantages.to(logp.dtype).unsqueeze(-1)
    ratio = torch.exp(logp - old_logp.to(logp.dtype))
    clipped_ratio = ratio.clamp(1 - options.eps_low, 1 + options.eps_high)
    unclipped_term, clipped_term = ratio * advantage, clipped_ratio * advantage
    per_token = -torch.minimum(unclipped_term, clipped_term)
    kl_sum = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if options.kl_beta > 0:
        delta = ref_logp.to(logp.dtype) - logp
        k3 = torch.exp(delta) - delta - 1
        per_token = per_token + options.kl_beta * k3
        kl_sum = (k3.detach() * mask).sum()
    clipped = (clipped_term < unclipped_term).to(logp.dtype) * mask
    return TokenLoss((per_token * mask).sum(), mask.sum(), clipped.sum(), kl_sum)
