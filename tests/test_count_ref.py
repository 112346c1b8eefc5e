"""klanneal._count_ref (pure-PyTorch count likelihoods) against mpmath and torch.distributions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from klanneal import _count_ref

mp = pytest.importorskip("mpmath")

import count_oracle  # noqa: E402  (needs mpmath)

FAMILIES = ("poisson", "nb", "zinb")
OUTPUTS = ("nll", "d_mu", "d_theta", "d_zi_logits")
N_PARAMS = {"poisson": 1, "nb": 2, "zinb": 3}
# In units of float64's eps, relative to count_oracle.eps_errors' scales (d_theta: times
# _autograd_theta_factor). Measured maxima: nll 6.9, d_mu 17.2, d_theta 10.2,
# d_zi_logits 1.2. Looser than the C++ kernels': torch.lgamma (the C library's) is off by
# up to ~18 ulps in places, and the gradients come from autograd through the stable forms.
EPS_BOUNDS = {"nll": 16, "d_mu": 48, "d_theta": 32, "d_zi_logits": 8}


def _nll(family: str, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if family == "poisson":
        return _count_ref.poisson_nll(params[0], x)
    if family == "nb":
        return _count_ref.nb_nll(params[0], params[1], x)
    return _count_ref.zinb_nll(params[0], params[1], params[2], x)


def _values_and_grads(family: str, inputs: dict[str, np.ndarray]) -> list[torch.Tensor]:
    names = ["mu", "theta", "zi_logits"][: N_PARAMS[family]]
    params = [torch.from_numpy(inputs[n]).requires_grad_(True) for n in names]
    nll = _nll(family, params, torch.from_numpy(inputs["x"]))
    upstream = 2.5  # an upstream gradient other than 1
    (upstream * nll).sum().backward()
    return [nll.detach()] + [p.grad / upstream for p in params]


def _autograd_theta_factor(family: str, inputs: dict[str, np.ndarray], refs: list) -> np.ndarray:
    """How much larger than |L(-w)| + |E| the terms are that autograd adds for d/dtheta.

    Autograd differentiates the saddle-point form term by term: d/dtheta of
    x log(mu (x + theta) / (x (theta + mu))) is x/(x + theta) - x/(theta + mu), two terms of
    size x/theta whose difference is O(1/theta^2) for large theta (and theta log1p(mu/theta)
    gives two of size mu/theta); below the series threshold
    d delta(theta)/dtheta = psi(theta) - log(theta) + 1/(2 theta) adds terms of size 1/theta.
    """
    x, mu, theta = (inputs[k].astype(np.float64) for k in ("x", "mu", "theta"))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = x / (x + theta) + (x + mu) / (theta + mu) + np.where(theta < 10, 1 / theta, 0.0)
    scale = np.array([float(abs(r["lw"]) + abs(r["e"])) for r in refs])
    return np.maximum(1.0, np.nan_to_num(terms / np.maximum(scale, 1e-300), posinf=1.0))


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_matches_the_oracle(family: str) -> None:
    inputs = count_oracle.grid(family, np.float64, n_random=200, seed=11)
    refs = count_oracle.references(family, inputs)
    outs = _values_and_grads(family, inputs)
    # Where the loss is +inf (mu = 0 with a count) autograd's gradient is NaN, not -inf.
    finite_loss = np.array([not mp.isinf(r["nll"]) for r in refs])
    for k, out in enumerate(outs):
        name = OUTPUTS[k]
        errors = count_oracle.eps_errors(family, name, out.numpy(), inputs, refs, np.float64)
        if name == "d_theta":
            errors = errors / _autograd_theta_factor(family, inputs, refs)
        if k > 0:
            errors = np.where(finite_loss, errors, 0.0)
        worst = int(np.argmax(errors))
        where = {key: float(v[worst]) for key, v in inputs.items()}
        assert errors[worst] <= EPS_BOUNDS[name], (
            f"{family} {name} at {where}: {out[worst].item()!r} vs "
            f"{mp.nstr(refs[worst][name], 17)} ({errors[worst]:.3g} eps)"
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_matches_torch_distributions(family: str) -> None:
    c = count_oracle.torch_cases()
    names = ["mu", "theta", "zi_logits"][: N_PARAMS[family]]
    params = [c[n].clone().requires_grad_(True) for n in names]
    log_prob = count_oracle.torch_log_prob(family, c, params)
    (-2.5 * log_prob).sum().backward()
    want = [-log_prob.detach()] + [p.grad / 2.5 for p in params]
    got = _values_and_grads(family, {k: v.numpy() for k, v in c.items()})
    scales = count_oracle.torch_scales(family, c)
    eps = float(np.finfo(np.float64).eps)
    for k, name in enumerate(OUTPUTS[: N_PARAMS[family] + 1]):
        finite = torch.isfinite(want[k])
        assert (torch.isfinite(got[k]) | ~finite).all(), name
        err = (got[k] - want[k]).abs()[finite]
        tol = (64 * eps * scales[k] + 1e-300)[finite]
        worst = int(torch.argmax(err / tol))
        assert (err <= tol).all(), (
            f"{family} {name}: {got[k][finite][worst].item()!r} vs torch "
            f"{want[k][finite][worst].item()!r} at "
            + str({key: float(v[finite][worst]) for key, v in c.items()})
        )


def test_gradcheck() -> None:
    torch.manual_seed(0)
    x = torch.tensor([0.0, 0.0, 1.0, 3.0, 12.0, 40.0], dtype=torch.float64)
    mu = torch.tensor([0.3, 5.0, 2.0, 0.1, 30.0, 41.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 12.0, 3.0, 20.0, 2.0, 300.0], dtype=torch.float64).requires_grad_()
    zi = torch.tensor([-2.0, 1.0, 0.5, -1.0, 3.0, 0.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: _count_ref.poisson_nll(m, x), (mu,))
    assert torch.autograd.gradcheck(lambda m, t: _count_ref.nb_nll(m, t, x), (mu, theta))
    assert torch.autograd.gradcheck(
        lambda m, t, z: _count_ref.zinb_nll(m, t, z, x), (mu, theta, zi)
    )


def test_extremes_give_finite_values_and_gradients() -> None:
    # Every branch a torch.where does not take is fed safe inputs: no NaN gradient leaks
    # from it (x = 0 lanes, mu = 1e-10, theta = 1e8, zi_logits = +-80), in float32 too.
    grid = count_oracle.grid("zinb", np.float64)
    keep = grid["mu"] > 0
    for dtype in (torch.float64, torch.float32):
        c = {k: torch.from_numpy(v[keep]).to(dtype) for k, v in grid.items()}
        for family in FAMILIES:
            names = ["mu", "theta", "zi_logits"][: N_PARAMS[family]]
            params = [c[n].clone().requires_grad_(True) for n in names]
            nll = _nll(family, params, c["x"])
            assert nll.dtype == dtype and torch.isfinite(nll).all(), family
            nll.sum().backward()
            for n, p in zip(names, params):
                assert torch.isfinite(p.grad).all(), (family, dtype, n)


def test_limits_and_dtypes() -> None:
    zero = torch.zeros(3, dtype=torch.float64)
    mu = torch.tensor([0.0, 1e-30, 2.0], dtype=torch.float64)
    torch.testing.assert_close(_count_ref.poisson_nll(mu, zero), mu, rtol=0, atol=0)
    assert (_count_ref.nb_nll(zero, torch.ones(3), zero) == 0).all()
    assert torch.isinf(_count_ref.nb_nll(zero, torch.ones(3), torch.ones(3))).all()
    # Broadcasting, and half inputs computed (and returned) in float32.
    out = _count_ref.zinb_nll(
        torch.full((2, 1), 3.0, dtype=torch.float16),
        torch.tensor(2.0, dtype=torch.bfloat16),
        torch.zeros(1, 4, dtype=torch.float16),
        torch.arange(4.0, dtype=torch.float16),
    )
    assert out.shape == (2, 4) and out.dtype == torch.float32
    want = _count_ref.zinb_nll(
        torch.tensor(3.0), torch.tensor(2.0), torch.tensor(0.0), torch.arange(4.0)
    )
    torch.testing.assert_close(out[0], want)
