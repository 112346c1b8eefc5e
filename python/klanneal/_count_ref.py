"""Pure-PyTorch reference of the count likelihoods (Poisson, NB, ZINB).

Elementwise negative log-likelihoods in scvi-tools' parameterisation (mean
``mu``, inverse dispersion ``theta``, zero-inflation logits), written in the
same stable forms as the C++ core (csrc/include/klanneal/count_likelihoods_body.h,
where the derivations are): Loader's saddle-point form with Stirling's
remainder ``delta(z) = lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2]``, so
that counts up to 1e6 and theta up to 1e8 keep their digits, and the ZINB
zero in log space. No epsilon is added to any value. Gradients come from
autograd; every ``torch.where`` feeds each branch inputs that are safe for
it, so the branch not taken contributes a zero gradient, never a NaN.

Computed in float32 for float16/bfloat16 inputs, else in the inputs'
promoted dtype; the result is in that dtype, with the inputs' broadcast shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["nb_nll", "poisson_nll", "zinb_nll"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# At and above this, delta(z) is its Stirling series (7 terms: < 5e-17).
_STIRLING_MIN = 10.0
# B_2k / (2k (2k - 1)): delta(z) = sum_k c_k z^(1 - 2k).
_DELTA_SERIES = (1 / 12, -1 / 360, 1 / 1260, -1 / 1680, 1 / 1188, -691 / 360360, 1 / 156)
# F(w) = (atanh(s) - s) / s^3, w = s^2 <= 1/9 (tests/gen_special_math_coeffs.py).
_ATANH_TAIL = (
    0.3333333333333333,
    0.20000000000007292,
    0.1428571428355438,
    0.11111111358713932,
    0.09090894718066429,
    0.07692785032479312,
    0.06657072104827468,
    0.06000536404795356,
    0.04400369243072337,
    0.08082022805971766,
)


def _horner(x: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def _stirling_delta(z: Tensor) -> Tensor:
    """lgamma(z) - [(z - 1/2) log z - z + log(2 pi)/2] for z > 0."""
    large = z >= _STIRLING_MIN
    z_large = torch.where(large, z, _STIRLING_MIN)
    z_small = torch.where(large, 1.0, z)
    r = 1.0 / z_large
    series = r * _horner(r * r, _DELTA_SERIES)
    direct = torch.lgamma(z_small) - (
        (z_small - 0.5) * torch.log(z_small) - z_small + _HALF_LOG_2PI
    )
    return torch.where(large, series, direct)


def _log1pmx(u: Tensor, rho: Tensor) -> Tensor:
    """log(1 + u) - u, given u and rho = 1 + u (formed by the caller as a ratio).

    For |s| <= 1/3, s = u / (2 + u): -s u + 2 s^3 F(s^2), no cancellation;
    else log(rho) - u.
    """
    s = u / (2.0 + u)
    near = s.abs() <= 1.0 / 3.0
    s_near = torch.where(near, s, 0.0)
    u_near = torch.where(near, u, 0.0)
    series = 2.0 * s_near**3 * _horner(s_near * s_near, _ATANH_TAIL) - s_near * u_near
    direct = torch.log(torch.where(near, 1.0, rho)) - torch.where(near, 0.0, u)
    return torch.where(near, series, direct)


def _softplus(z: Tensor) -> Tensor:
    """log(1 + exp(z)) to full precision for every z (F.softplus returns z above 20)."""
    pos = z > 0
    z_pos = torch.where(pos, z, 0.0)
    z_neg = torch.where(pos, 0.0, z)
    return torch.where(pos, z_pos + torch.log1p(torch.exp(-z_pos)), torch.log1p(torch.exp(z_neg)))


def _expm1(v: Tensor) -> Tensor:
    """exp(v) - 1 for v <= 0 whose gradient is exp(v) (torch.expm1's is expm1(v) + 1, 0 for
    v < -37 in float64)."""
    near = v > -1.0
    return torch.where(near, torch.expm1(torch.where(near, v, 0.0)), torch.exp(v) - 1.0)


def _widened(*tensors: Tensor) -> list[Tensor]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return [t.to(dtype) for t in tensors]  # every formula broadcasts them


def poisson_nll(mu: Tensor, x: Tensor) -> Tensor:
    """-log Poisson(x; mu), elementwise.

    Args:
        mu: rate, >= 0 (mu = 0 gives 0 at x = 0 and +inf at x > 0).
        x: counts, >= 0 (any real >= 0 is accepted: lgamma(x + 1) extends it).

    Returns:
        mu - x log mu + lgamma(x + 1) in the inputs' broadcast shape, computed as
        -x L((mu - x)/x) + log(x)/2 + log(2 pi)/2 + delta(x) for x > 0.
    """
    mu, x = _widened(mu, x)
    pos = x > 0
    xp = torch.where(pos, x, 1.0)
    mp = torch.where(pos, mu, 1.0)
    nll = (
        0.5 * torch.log(xp)
        + _HALF_LOG_2PI
        - xp * _log1pmx((mp - xp) / xp, mp / xp)
        + _stirling_delta(xp)
    )
    return torch.where(pos, nll, mu)


def _nb_parts(mu: Tensor, theta: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(x > 0, -log NB(0), -log NB(x) for x > 0 (finite filler where x = 0)).

    The x > 0 branch sees x = mu = 1 where x = 0, so that its gradient there is 0, not
    0 * inf (log(mu / (theta + mu)) at mu = 0, say).
    """
    tm = theta + mu
    q = theta / tm
    below = theta < mu
    # log q: a ratio below 1/2 where theta < mu, else -log1p(mu/theta), mu/theta <= 1.
    log_q = torch.where(
        below,
        torch.log(torch.where(below, q, 1.0)),
        -torch.log1p(torch.where(below, 0.0, mu / theta)),
    )
    nll_zero = -theta * log_q

    pos = x > 0
    xp = torch.where(pos, x, 1.0)
    mp = torch.where(pos, mu, 1.0)
    tp = theta + mp
    n = theta + xp
    l1 = _log1pmx((xp - mp) / tp, n / tp)
    l2 = _log1pmx((theta / tp) * (mp - xp) / xp, (mp / tp) * n / xp)
    nll_pos = (
        0.5 * (torch.log(xp) + torch.log1p(xp / theta))
        + _HALF_LOG_2PI
        - theta * l1
        - xp * l2
        + (_stirling_delta(theta) - _stirling_delta(n) + _stirling_delta(xp))
    )
    return pos, nll_zero, nll_pos


def nb_nll(mu: Tensor, theta: Tensor, x: Tensor) -> Tensor:
    """-log NB(x; mu, theta), elementwise (scvi-tools' NB: mean mu, inverse dispersion theta).

    log p = theta log(theta/(theta+mu)) + x log(mu/(theta+mu))
            + lgamma(x+theta) - lgamma(theta) - lgamma(x+1).

    Args:
        mu: mean, >= 0.
        theta: inverse dispersion, > 0 and finite (theta -> inf is Poisson).
        x: counts, >= 0.

    Returns:
        The loss in the inputs' broadcast shape.
    """
    mu, theta, x = _widened(mu, theta, x)
    pos, nll_zero, nll_pos = _nb_parts(mu, theta, x)
    return torch.where(pos, nll_pos, nll_zero)


def zinb_nll(mu: Tensor, theta: Tensor, zi_logits: Tensor, x: Tensor) -> Tensor:
    """-log ZINB(x; mu, theta, pi = sigmoid(zi_logits)), elementwise.

    p(x) = pi [x = 0] + (1 - pi) NB(x; mu, theta). At x = 0 the log of the
    mixture is log1p(sigmoid(-z) expm1(log NB(0))) while that is >= log(1/2),
    else logsumexp(log pi, log(1 - pi) + log NB(0)) with log pi = -softplus(-z),
    log(1 - pi) = -softplus(z); no log of a difference is taken.

    Args:
        mu: mean, >= 0.
        theta: inverse dispersion, > 0 and finite.
        zi_logits: logits of the zero-inflation probability, any real.
        x: counts, >= 0.

    Returns:
        The loss in the inputs' broadcast shape.
    """
    mu, theta, z, x = _widened(mu, theta, zi_logits, x)
    pos, nll_zero, nll_pos = _nb_parts(mu, theta, x)
    nb0 = -nll_zero
    softplus_pos, softplus_neg = _softplus(z), _softplus(-z)
    # sigmoid(-z) as exp(-softplus(z)) and expm1 by _expm1: their autograd keeps the
    # digits (torch's sigmoid and expm1 backward use 1 - result and result + 1).
    a = torch.exp(-softplus_pos) * _expm1(nb0)
    small = a >= -0.5
    lse = torch.logaddexp(-softplus_neg, nb0 - softplus_pos)
    log_p0 = torch.where(small, torch.log1p(torch.where(small, a, 0.0)), lse)
    return torch.where(pos, softplus_pos + nll_pos, -log_p0)


def check_count_values(
    recon_input: torch.Tensor, target: torch.Tensor, values: bool = True, **params: Any
) -> None:
    """Values of a count family's call (they read the tensors: a sync on a GPU):
    the means finite and > 0, the counts whole numbers >= 0, theta finite and
    > 0, zi_logits not NaN; each parameter broadcastable to recon_input's shape
    (values=False: the shapes only, where the kernel checks the values)."""
    shape = recon_input.shape
    for name, value in params.items():
        if isinstance(value, torch.Tensor):
            try:
                broadcast = torch.broadcast_shapes(value.shape, shape)  # type: ignore[no-untyped-call]
            except RuntimeError:
                broadcast = None
            if broadcast != shape:
                raise ValueError(
                    f"{name} of shape {tuple(value.shape)} does not broadcast to recon_input's "
                    f"{tuple(shape)} ([G] per gene, or [B, G])"
                )
    if recon_input.is_meta or not values:
        return
    mu = recon_input.detach()
    if not bool(((mu > 0) & torch.isfinite(mu)).all()):
        bad = mu[~((mu > 0) & torch.isfinite(mu))].reshape(-1)[0]
        raise ValueError(f"recon_input: the means must be finite and > 0, found {float(bad)}")
    counts = target.detach()
    if counts.dtype.is_floating_point:
        ok = torch.isfinite(counts) & (counts >= 0) & (counts == torch.floor(counts))
    else:
        ok = counts >= 0
    if not bool(ok.all()):
        bad = counts[~ok].reshape(-1)[0]
        raise ValueError(f"target: counts must be whole numbers >= 0, found {float(bad)}")
    theta = params.get("theta")
    if isinstance(theta, torch.Tensor):
        t = theta.detach()
        if not bool(((t > 0) & torch.isfinite(t)).all()):
            bad = t[~((t > 0) & torch.isfinite(t))].reshape(-1)[0]
            raise ValueError(
                f"theta: the inverse dispersion must be finite and > 0, found {float(bad)}"
            )
    zi = params.get("zi_logits")
    if isinstance(zi, torch.Tensor) and bool(torch.isnan(zi.detach()).any()):
        raise ValueError("zi_logits: found NaN")
