"""The online-DPO loss with soft two-sided labels, as a pure function of per-sequence log-probs.

For a pair (a, b) of responses to one prompt, with p the judge's probability that a wins and
m = [log pi(a) - log ref(a)] - [log pi(b) - log ref(b)] the policy-minus-reference log-ratio margin:

    loss = -p log sigmoid(beta m) - (1 - p) log sigmoid(-beta m)      (= BCE(sigmoid(beta m), p))

p in {0, 1} is standard DPO; a soft p is minimised at beta m = logit(p), so margins settle instead of running
away. ``beta_rescale="inv_beta"`` divides the loss by beta: dL/dm = sigmoid(beta m) - p, whose size does not
depend on beta, so the learning rate and beta are tuned independently (our reading of the paper's
"beta-rescaling"; ``none`` keeps dL/dm = beta (sigmoid(beta m) - p)). ``hard_labels`` rounds p to 0 or 1 (the
ablation against hard-label online DPO); a tie (p = 0.5) stays 0.5: there is no preference to harden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nemo_plugins.errors import ConfigError

BETA_RESCALES = ("none", "inv_beta")


@dataclass
class DPOOptions:
    beta: float = 0.1
    beta_rescale: str = "inv_beta"
    hard_labels: bool = False

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta must be > 0 (it scales the log-ratio margin), got {self.beta}")
        if self.beta_rescale not in BETA_RESCALES:
            raise ConfigError(f"dpo.beta_rescale={self.beta_rescale!r}; allowed: {', '.join(BETA_RESCALES)}")


def log_ratio_margin(policy_a: torch.Tensor, reference_a: torch.Tensor, policy_b: torch.Tensor,
                     reference_b: torch.Tensor) -> torch.Tensor:
    """m per pair from the four per-sequence log-probs (the reference's carry no gradient)."""
    return (policy_a - reference_a) - (policy_b - reference_b)


def labels(p: torch.Tensor, hard: bool) -> torch.Tensor:
    """The target probability that the first response wins: p itself, or rounded away from 0.5."""
    if not hard:
        return p
    return torch.where(p > 0.5, torch.ones_like(p), torch.where(p < 0.5, torch.zeros_like(p), p))


def soft_dpo_loss(margin: torch.Tensor, p: torch.Tensor, options: DPOOptions) -> torch.Tensor:
    """The per-pair loss (not reduced): the caller sums and normalises by the global pair count."""
    if torch.any((p < 0) | (p > 1)):
        raise ValueError(f"win probabilities must lie in [0, 1], got {p.min().item()} .. {p.max().item()}")
    target = labels(p.to(margin.dtype), options.hard_labels)
    z = options.beta * margin
    loss = -target * F.logsigmoid(z) - (1 - target) * F.logsigmoid(-z)
    return loss / options.beta if options.beta_rescale == "inv_beta" else loss
