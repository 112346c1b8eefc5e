"""The hand-written scVI loss the count benchmarks compare klanneal against.

``log_zinb_positive`` and ``log_nb_positive`` are transcribed from scvi-tools,
src/scvi/distributions/_negative_binomial.py (github.com/scverse/scvi-tools at
93dc4fae21917406673206320c8a3002433c4a5d), line for line: the eps added inside every
log (1e-8, what its NegativeBinomial and ZeroInflatedNegativeBinomial distributions
pass), the float32 masks of the ZINB's two cases. ``handwritten_loss`` is scvi-tools'
``VAE.loss`` around them (src/scvi/module/_vae.py): -log p summed over genes, + beta *
KL, the mean over cells. tests/test_bench_counts.py checks the transcription against
klanneal's reference (klanneal/_count_ref.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCVI_EPS = 1e-8


def log_zinb_positive(x, mu, theta, pi, eps=1e-8):
    """scvi-tools' ``log_zinb_positive`` with log_fn = torch.log, lgamma_fn = torch.lgamma:
    log ZINB(x; mu, theta, sigmoid(pi)) per element (``pi`` holds the logits)."""
    if theta.ndimension() == 1:
        theta = theta.view(1, theta.size(0))
    softplus_pi = F.softplus(-pi)
    log_theta_eps = torch.log(theta + eps)
    log_theta_mu_eps = torch.log(theta + mu + eps)
    pi_theta_log = -pi + theta * (log_theta_eps - log_theta_mu_eps)

    case_zero = F.softplus(pi_theta_log) - softplus_pi
    mul_case_zero = torch.mul((x < eps).type(torch.float32), case_zero)

    case_non_zero = (
        -softplus_pi
        + pi_theta_log
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    mul_case_non_zero = torch.mul((x > eps).type(torch.float32), case_non_zero)
    return mul_case_zero + mul_case_non_zero


def log_nb_positive(x, mu, theta, eps=1e-8):
    """scvi-tools' ``log_nb_positive`` (torch.log, torch.lgamma): log NB(x; mu, theta)."""
    log_theta_mu_eps = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu_eps)
        + x * (torch.log(mu + eps) - log_theta_mu_eps)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def handwritten_loss(px_rate, counts, theta, zi_logits, mu, logvar, beta):
    """scvi-tools' VAE.loss: mean over cells of (-log p(x) summed over genes + beta * KL).

    NB when ``zi_logits`` is None, else ZINB; KL(N(mu, exp(logvar)) || N(0, I)) in closed
    form (what torch's Normal-Normal kl_divergence computes)."""
    if zi_logits is None:
        log_prob = log_nb_positive(counts, px_rate, theta, eps=SCVI_EPS)
    else:
        log_prob = log_zinb_positive(counts, px_rate, theta, zi_logits, eps=SCVI_EPS)
    reconst_loss = -log_prob.sum(-1)
    kl_divergence_z = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
    return torch.mean(reconst_loss + beta * kl_divergence_z)
