"""scvi-tools' ZINB log-likelihood, written out to measure what its epsilon changes.

scvi-tools' ``ZeroInflatedNegativeBinomial(mu, theta, zi_logits).log_prob(x)``
(``log_zinb_positive``) adds ``eps = 1e-8`` inside every logarithm:
log(theta + eps), log(theta + mu + eps), log(mu + eps). klanneal adds none.
This is that formula, with eps as an argument, so that the example can put a
number on the difference (summary.json, ``eps_effect``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCVI_EPS = 1e-8


def scvi_zinb_nll(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, eps: float
) -> torch.Tensor:
    """-log ZINB(x; mu, theta, sigmoid(zi_logits)) per element, in scvi-tools' form.

    log NB(0) = theta (log(theta + eps) - log(theta + mu + eps));
    x = 0: log p = softplus(log NB(0) - zi_logits) - softplus(-zi_logits);
    x > 0: log p = -softplus(zi_logits) + log NB(0) + x (log(mu + eps) - log(theta + mu + eps))
                   + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1).

    Args:
        x: counts [B, G] (whole numbers >= 0); mu: means [B, G] > 0; theta:
            [G] or [B, G] > 0; zi_logits: [B, G]. Computed in their dtype.
        eps: scvi-tools' 1e-8, or 0 for the exact formula.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    log_nb_zero = theta * (torch.log(theta + eps) - log_theta_mu)
    log_p_zero = F.softplus(log_nb_zero - zi_logits) - F.softplus(-zi_logits)
    log_p_positive = (
        -F.softplus(zi_logits)
        + log_nb_zero
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return -torch.where(x > 0, log_p_positive, log_p_zero)
