"""mpmath oracle of the count likelihoods (Poisson, NB, ZINB) and the input grids the tests use.

The textbook formulas evaluated at 60 digits at the exact (float32 or float64) inputs, so
their own rounding is far below any tolerance: values and the analytic gradients, and for
NB's d/dtheta the two parts the kernels add, L(-w) = log q + w and
E = psi(x + theta) - psi(theta) - x/(theta + mu), whose sizes bound what a sum of two
accurately computed parts can lose (the gradient is O(1/theta^2) while each part is
O(x^2/theta^2), e.g. at x = mu).
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import mpmath as mp
import numpy as np
import torch

mp.mp.dps = 60

# The ranges of the brief (scvi-tools#2965): theta 1e-6 .. 1e8, mu 1e-10 .. 1e8 (and 0),
# counts up to 1e6, zi_logits up to +-80. 7.5 and 10 sit on both sides of the float64
# series threshold of the kernels.
THETAS = (1e-6, 1e-3, 0.1, 1.0, 7.5, 10.0, 100.0, 1e4, 1e6, 1e8)
MUS = (0.0, 1e-10, 1e-6, 1e-2, 0.5, 1.0, 3.0, 100.0, 1e4, 1e6, 1e8)
COUNTS = (0.0, 1.0, 2.0, 3.0, 5.0, 10.0, 100.0, 1e3, 1e4, 1e6)
ZI_LOGITS = (-80.0, -5.0, 0.0, 2.0, 80.0)


def grid(family: str, dtype: type, n_random: int = 0, seed: int = 0) -> dict[str, np.ndarray]:
    """Every combination of the grids above (and n_random log-uniform draws) in dtype."""
    axes: list[tuple[float, ...]] = [COUNTS, MUS]
    if family in ("nb", "zinb"):
        axes.append(THETAS)
    if family == "zinb":
        axes.append(ZI_LOGITS)
    rows = np.array(list(itertools.product(*axes)), dtype=np.float64)
    if n_random:
        rng = np.random.default_rng(seed)
        draws = [
            np.floor(np.exp(rng.uniform(0, np.log(1e6), n_random))) - 1,  # counts, 0 included
            np.exp(rng.uniform(np.log(1e-10), np.log(1e8), n_random)),
            np.exp(rng.uniform(np.log(1e-6), np.log(1e8), n_random)),
            rng.uniform(-80, 80, n_random),
        ]
        rows = np.concatenate([rows, np.stack(draws[: len(axes)], axis=1)])
    names = ["x", "mu", "theta", "zi_logits"][: len(axes)]
    return {name: np.ascontiguousarray(rows[:, k]).astype(dtype) for k, name in enumerate(names)}


def poisson(x: float, mu: float) -> dict[str, mp.mpf]:
    x_, mu_ = mp.mpf(x), mp.mpf(mu)
    if x_ == 0:
        return {"nll": mu_, "d_mu": mp.mpf(1)}
    if mu_ == 0:
        return {"nll": mp.inf, "d_mu": -mp.inf}
    return {"nll": mu_ - x_ * mp.log(mu_) + mp.loggamma(x_ + 1), "d_mu": 1 - x_ / mu_}


def nb(x: float, mu: float, theta: float) -> dict[str, mp.mpf]:
    x_, mu_, th = mp.mpf(x), mp.mpf(mu), mp.mpf(theta)
    tm = th + mu_
    log_q = mp.log(th / tm)
    nb0 = th * log_q
    lw = log_q + mu_ / tm
    e = mp.digamma(x_ + th) - mp.digamma(th) - x_ / tm if x_ > 0 else mp.mpf(0)
    if x_ == 0:
        nll, d_mu = -nb0, th / tm
    elif mu_ == 0:
        nll, d_mu = mp.inf, -mp.inf
    else:
        log_p = (
            nb0
            + x_ * mp.log(mu_ / tm)
            + mp.loggamma(x_ + th)
            - mp.loggamma(th)
            - mp.loggamma(x_ + 1)
        )
        nll, d_mu = -log_p, th * (mu_ - x_) / (mu_ * tm)
    return {"nll": nll, "d_mu": d_mu, "d_theta": -(lw + e), "lw": lw, "e": e, "nb0": nb0}


def zinb(
    x: float, mu: float, theta: float, zi_logits: float, nb_ref: Optional[dict] = None
) -> dict[str, mp.mpf]:
    r = nb_ref if nb_ref is not None else nb(x, mu, theta)
    z = mp.mpf(zi_logits)
    pi = 1 / (1 + mp.exp(-z))
    if x > 0:
        return {
            "nll": r["nll"] + mp.log1p(mp.exp(z)),
            "d_mu": r["d_mu"],
            "d_theta": r["d_theta"],
            "d_zi_logits": pi,
            "lw": r["lw"],
            "e": r["e"],
            "nb0": r["nb0"],
        }
    p_nb0 = mp.exp(r["nb0"])
    p0 = pi + (1 - pi) * p_nb0
    w_b = (1 - pi) * p_nb0 / p0
    return {
        "nll": -mp.log(p0),
        "d_mu": w_b * r["d_mu"],
        "d_theta": w_b * r["d_theta"],
        "d_zi_logits": -pi * (1 - pi) * (1 - p_nb0) / p0,
        "lw": w_b * r["lw"],
        "e": mp.mpf(0),
        "nb0": r["nb0"],
    }


def references(family: str, inputs: dict[str, np.ndarray]) -> list[dict[str, mp.mpf]]:
    """The oracle at every element of inputs (as grid() returns them)."""
    x = [float(v) for v in inputs["x"]]
    mu = [float(v) for v in inputs["mu"]]
    if family == "poisson":
        return [poisson(a, b) for a, b in zip(x, mu)]
    theta = [float(v) for v in inputs["theta"]]
    if family == "nb":
        return [nb(a, b, c) for a, b, c in zip(x, mu, theta)]
    cache: dict[tuple[float, float, float], dict] = {}
    out = []
    for a, b, c, z in zip(x, mu, theta, (float(v) for v in inputs["zi_logits"])):
        key = (a, b, c)
        if key not in cache:
            cache[key] = nb(a, b, c)
        out.append(zinb(a, b, c, z, cache[key]))
    return out


def eps_errors(
    family: str, name: str, got: np.ndarray, inputs: dict, refs: list, dtype: type
) -> np.ndarray:
    """|got - reference| per element, in units of dtype's eps times a scale per output.

    nll, d_mu, d_zi_logits: |reference|. d_theta: |L(-w)| + |E|, the two parts the kernels
    add (count_likelihoods_body.h): the gradient can be much smaller than either (it is
    O(1/theta^2) at x = mu while they are O(x^2/theta^2)). ZINB at x = 0: times
    1 + |zi_logits| + |log NB(0)|: the mixture weights are exp(-|zi_logits - log NB(0)|),
    which amplifies the rounding of the inputs themselves by that much (the conditioning of
    the function, not of the method). Infinite references must be met exactly.
    """
    eps = float(np.finfo(dtype).eps)
    floor = float(np.finfo(dtype).tiny) + 1e-40  # underflow; the oracle's own 60 digits
    out = np.empty(len(refs))
    for i, r in enumerate(refs):
        g, ref = float(got[i]), r[name]
        if mp.isinf(ref):
            out[i] = 0.0 if g == float(ref) else math.inf
            continue
        scale = abs(ref)
        if name == "d_theta":
            scale = abs(r["lw"]) + abs(r["e"])
        if family == "zinb" and inputs["x"][i] == 0:
            scale *= 1 + abs(float(inputs["zi_logits"][i])) + abs(float(r["nb0"]))
        out[i] = float(abs(mp.mpf(g) - ref)) / (float(scale) + floor) / eps
    return out


# ---- torch.distributions in float64 ---------------------------------------------------------
# torch evaluates the textbook formulas, whose error grows with the size of the terms that
# cancel (theta log theta, lgamma(x + theta), ...): tolerances are a multiple of float64's
# eps times torch_scales(), the sum of the absolute values of the terms torch adds.


def torch_cases() -> dict[str, torch.Tensor]:
    inputs = grid("zinb", np.float64, n_random=200, seed=3)
    keep = inputs["mu"] > 0  # torch's logits = log mu - log theta is -inf at mu = 0
    return {k: torch.from_numpy(v[keep]) for k, v in inputs.items()}


def torch_nb(mu: torch.Tensor, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dist = torch.distributions.NegativeBinomial(
        total_count=theta, logits=torch.log(mu) - torch.log(theta), validate_args=False
    )
    return dist.log_prob(x)


def torch_log_prob(family: str, c: dict[str, torch.Tensor], params: list[torch.Tensor]):
    x = c["x"]
    if family == "poisson":
        return torch.distributions.Poisson(params[0], validate_args=False).log_prob(x)
    lp = torch_nb(params[0], params[1], x)
    if family == "nb":
        return lp
    z = params[2]
    log_pi, log_1m_pi = torch.nn.functional.logsigmoid(z), torch.nn.functional.logsigmoid(-z)
    return torch.where(x == 0, torch.logaddexp(log_pi, log_1m_pi + lp), log_1m_pi + lp)


def torch_scales(family: str, c: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    x, mu = c["x"], c["mu"]
    theta, z = c["theta"], c["zi_logits"]
    if family == "poisson":
        value = mu + (x * torch.log(mu)).abs() + torch.lgamma(x + 1)
        return [value, 1 + x / mu]
    tm = theta + mu
    value = (
        (theta * torch.log(theta / tm)).abs()
        + (x * torch.log(mu / tm)).abs()
        + torch.lgamma(x + theta).abs()
        + torch.lgamma(theta).abs()
        + torch.lgamma(x + 1)
    )
    d_mu = (theta + x) / tm + x / mu
    d_theta = (
        torch.log(theta / tm).abs()
        + (mu + x) / tm
        + 1
        + torch.digamma(x + theta).abs()
        + torch.digamma(theta).abs()
    )
    scales = [value, d_mu, d_theta]
    if family == "zinb":
        # log pi and log(1 - pi) are added in too; at x = 0 the mixture weights amplify
        # the error of their exponent z - log NB(0) (see the oracle test's note).
        log_pi = torch.nn.functional.logsigmoid(z).abs() + torch.nn.functional.logsigmoid(-z).abs()
        nb0 = (theta * torch.log(theta / tm)).abs()
        amplify = torch.where(x == 0, 1 + z.abs() + nb0, 1.0)
        scales = [(value + log_pi) * amplify, d_mu * amplify, d_theta * amplify, amplify]
    return scales
