"""Posterior-collapse diagnostics: active units, I(x; z), KL per dimension.

The numbers to watch for KL vanishing in a VAE with a strong decoder:

* :func:`active_units` -- latent dimensions whose posterior mean varies with
  the data (Burda et al. 2016). A collapsed dimension has ``E_q[z_d | x]``
  equal for every ``x``.
* :func:`mutual_information` -- I(x; z) under the encoder's joint
  ``q(x, z) = q(z | x) p_data(x)``, the aggregate-posterior estimator of
  Hoffman & Johnson (2016) used by He et al. (2019) and the cyclical-annealing
  paper's follow-ups. Zero when the code carries nothing about x.
* :class:`PosteriorStats` -- both of the above and the KL per dimension,
  accumulated batch by batch over an evaluation loader.
* :class:`CollapseMonitor` -- during training: the KL per dimension, an EMA
  estimate of the active units and a collapse flag, streamed over the
  training batches from the op's ``kl_per_dim`` (no host sync per batch).

Every function takes ``mu`` and ``logvar`` of ``q(z|x) = N(mu, exp(logvar))``
as ``[N, D]`` tensors (one row per data point) and computes in float64.

Example:
    >>> stats = PosteriorStats()
    >>> for batch in loader:                         # doctest: +SKIP
    ...     mu, logvar = model.encode(batch)
    ...     stats.update(mu, logvar)
    >>> stats.compute()["active_units"]              # doctest: +SKIP
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, TypedDict

import numpy as np
import torch

from klanneal.reference import kl_per_element

__all__ = [
    "CollapseMonitor",
    "CollapseWarning",
    "PosteriorStats",
    "PosteriorSummary",
    "active_units",
    "mutual_information",
]

#: Cov_x(E_q[z_d | x]) above this counts as active (Burda et al. 2016).
ACTIVE_UNIT_THRESHOLD = 0.01
#: A dimension whose mean KL(q(z_d|x) || p(z_d)) is below this many nats is collapsed.
COLLAPSE_THRESHOLD = 0.01
#: Data points PosteriorStats keeps for the mutual-information estimate.
MI_POINTS = 2048

# Elements of the [S, N, D] pairwise tensor of one mutual-information chunk.
_PAIRWISE_CHUNK = 4_000_000


def _check_posterior(mu: Any, logvar: Any, *, allow_empty: bool = False) -> None:
    for name, value in (("mu", mu), ("logvar", logvar)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 2 or not value.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a 2-D floating-point tensor [N, D], got shape "
                f"{tuple(value.shape)} and dtype {value.dtype}"
            )
    if mu.shape != logvar.shape:
        raise ValueError(
            f"mu and logvar must have the same shape, got {tuple(mu.shape)} and "
            f"{tuple(logvar.shape)}"
        )
    if mu.device != logvar.device:
        raise ValueError(f"mu is on {mu.device} but logvar is on {logvar.device}")
    if mu.shape[0] == 0 and not allow_empty:
        raise ValueError("mu is empty (N = 0): the metrics need at least one data point")
    for name, value in (("mu", mu), ("logvar", logvar)):
        # A NaN would drop out of the counts (NaN > threshold is False) and
        # leave an active-unit or collapse count that looks valid.
        if not bool(torch.isfinite(value.detach()).all()):
            raise ValueError(f"{name} has NaN or infinite values (a diverged encoder?)")


def _check_threshold(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    result = float(value)
    if not (math.isfinite(result) and result >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {result}")
    return result


def _check_count(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {result}")
    return result


def active_units(mu: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Latent dimensions d with Cov_x(E_q[z_d | x]) > ``threshold`` (Burda et al. 2016).

    The covariance is the population variance over the N rows (divided by N),
    so one data point has no active units.

    Args:
        mu: [N, D] posterior means, one row per data point (N >= 1), floating point.
        threshold: Variance above which a dimension is active (finite, >= 0).

    Returns:
        The number of active dimensions, in [0, D].

    Raises:
        TypeError: ``mu`` is not a tensor or ``threshold`` not a real number.
        ValueError: ``mu`` is not 2-D floating point, is empty, or
            ``threshold`` is negative or not finite.
    """
    _check_posterior(mu, mu)
    threshold = _check_threshold("threshold", threshold)
    variance = mu.detach().to(torch.float64).var(dim=0, correction=0)
    return int((variance > threshold).sum())


def _log_normal_pairs(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mu_j, exp(logvar_j)) for every pair: z [S, D], mu/logvar [N, D] -> [S, N]."""
    diff = z.unsqueeze(1) - mu.unsqueeze(0)
    return -0.5 * (
        (diff * diff / logvar.exp().unsqueeze(0)).sum(-1)
        + logvar.sum(-1).unsqueeze(0)
        + mu.shape[1] * math.log(2 * math.pi)
    )


def mutual_information(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    *,
    samples_per_point: int = 1,
    generator: Optional[torch.Generator] = None,
) -> float:
    """I(x; z) under q(x, z) = q(z|x) p_data(x), in nats: the aggregate-posterior estimator.

    With the N data points given as p_data and the aggregate posterior
    ``q(z) = (1/N) sum_j q(z | x_j)``::

        I(x; z) = E_x E_{q(z|x)} [log q(z|x) - log q(z)]
                ~ 1/(N S) sum_i sum_s [log q(z_is | x_i) - logsumexp_j log q(z_is | x_j) + log N]

    with ``S = samples_per_point`` draws ``z_is ~ q(z | x_i)`` (Hoffman &
    Johnson 2016; the estimator of He et al. 2019's ``calc_mi``, except that
    the first term is evaluated at the same sample as the second instead of
    by the closed-form entropy, so that their noise cancels). Every term is at
    most log N, so the estimate lies in (-inf, log N]: with few data points it
    saturates near log N. Cost O(S N^2 D) time and O(N) memory beyond the
    inputs (the pairwise terms are computed in chunks).

    Args:
        mu: [N, D] means of q(z|x), one row per data point (N >= 1).
        logvar: [N, D] log-variances, same shape and device.
        samples_per_point: S >= 1, draws of z per data point.
        generator: Random generator on ``mu``'s device for the draws
            (default: torch's global generator).

    Returns:
        The estimate in nats (exactly 0 for N = 1).

    Raises:
        TypeError: A tensor argument is not a tensor, or ``samples_per_point``
            not an integer.
        ValueError: Shapes differ or are not [N, D], N = 0, or
            ``samples_per_point < 1``.
    """
    _check_posterior(mu, logvar)
    samples_per_point = _check_count("samples_per_point", samples_per_point, 1)
    mu = mu.detach().to(torch.float64)
    logvar = logvar.detach().to(torch.float64)
    n, d = mu.shape
    std = torch.exp(0.5 * logvar)
    chunk = max(1, _PAIRWISE_CHUNK // max(1, n * d))
    rows = torch.arange(n, device=mu.device)
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for _ in range(samples_per_point):
        noise = torch.randn(mu.shape, generator=generator, dtype=torch.float64, device=mu.device)
        z = mu + std * noise
        for start in range(0, n, chunk):
            log_pairs = _log_normal_pairs(z[start : start + chunk], mu, logvar)  # [S, N]
            own = rows[start : start + chunk]
            log_own = log_pairs[torch.arange(len(own), device=mu.device), own]
            log_aggregate = torch.logsumexp(log_pairs, dim=1) - math.log(n)
            total += (log_own - log_aggregate).sum()
    return float(total) / (n * samples_per_point)


class PosteriorSummary(TypedDict):
    """What :meth:`PosteriorStats.compute` returns (tensors are float64, on the inputs' device)."""

    n: int
    active_units: int
    mu_mean: torch.Tensor
    mu_variance: torch.Tensor
    mu_covariance: torch.Tensor
    kl_per_dim: torch.Tensor
    kl: float
    n_collapsed: int
    mutual_information: float
    mi_sample_size: int


class PosteriorStats:
    """Posterior statistics accumulated batch by batch over an evaluation set.

    Call :meth:`update` with each batch's ``mu`` and ``logvar``, then
    :meth:`compute`. Memory:

    * O(D^2), exact over all the data: the mean and covariance of
      ``E_q[z | x]`` (merged per batch with Chan et al.'s parallel update of
      the co-moment, in float64), hence the active units; and the KL per
      dimension (a float64 sum).
    * O(``mi_points`` * D): the mutual-information estimate needs the data
      points themselves (its aggregate posterior is a mixture over them), so
      a uniform random subsample of at most ``mi_points`` rows is kept
      (reservoir sampling, Vitter's algorithm R); I(x; z) is
      :func:`mutual_information` of that subsample, and is exact (equal to the
      estimate on all the data) while at most ``mi_points`` rows have been
      seen. A subsample of M points bounds the estimate by log M.

    Args:
        threshold: Active-unit threshold on Cov_x(E_q[z_d | x]).
        collapse_threshold: A dimension whose mean KL(q(z_d|x) || p(z_d)) is
            below this many nats counts as collapsed (``n_collapsed``); the
            default 0.01 nats is far below what a used dimension carries.
        mi_points: Rows kept for the mutual information (>= 1).
        samples_per_point: Draws of z per kept row in the MI estimate.
        seed: Seeds the subsample and the MI draws, so equal inputs give
            equal results.

    Raises:
        TypeError, ValueError: An argument of the wrong type or out of range
            (the message names it).
    """

    def __init__(
        self,
        threshold: float = ACTIVE_UNIT_THRESHOLD,
        collapse_threshold: float = COLLAPSE_THRESHOLD,
        *,
        mi_points: int = MI_POINTS,
        samples_per_point: int = 1,
        seed: int = 0,
    ) -> None:
        self.threshold = _check_threshold("threshold", threshold)
        self.collapse_threshold = _check_threshold("collapse_threshold", collapse_threshold)
        self.mi_points = _check_count("mi_points", mi_points, 1)
        self.samples_per_point = _check_count("samples_per_point", samples_per_point, 1)
        self.seed = _check_count("seed", seed, 0, 2**64 - 1)  # torch.Generator's range
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen (the next :meth:`update` starts afresh)."""
        self.n = 0
        self._mean: Optional[torch.Tensor] = None  # [D]
        self._comoment: Optional[torch.Tensor] = None  # [D, D], sum of outer deviations
        self._kl_sum: Optional[torch.Tensor] = None  # [D]
        self._kept_mu: Optional[torch.Tensor] = None  # [<= mi_points, D]
        self._kept_logvar: Optional[torch.Tensor] = None
        self._reservoir_rng = np.random.default_rng(self.seed)

    @torch.no_grad()
    def update(
        self,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        prior_mu: Optional[torch.Tensor] = None,
        prior_logvar: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one batch.

        Args:
            mu: [B, D] means of q(z|x) (B = 0 is allowed and changes nothing).
            logvar: [B, D] log-variances.
            prior_mu, prior_logvar: Parameters of a Gaussian prior p(z) for the
                KL, broadcastable to [B, D] (e.g. [D], or [B, D] for a
                conditional prior); each defaults to the standard normal's (0).

        Raises:
            TypeError, ValueError: Shapes, dtypes or devices that do not fit,
                or a D that differs from earlier batches.
        """
        _check_posterior(mu, logvar, allow_empty=True)
        mu = mu.detach().to(torch.float64)
        logvar = logvar.detach().to(torch.float64)
        priors = {"prior_mu": prior_mu, "prior_logvar": prior_logvar}
        for name, prior in priors.items():
            if prior is None:
                continue
            if not isinstance(prior, torch.Tensor) or not prior.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor or None")
            try:
                prior.expand(mu.shape)
            except RuntimeError:
                raise ValueError(
                    f"{name} of shape {tuple(prior.shape)} does not broadcast to mu's "
                    f"{tuple(mu.shape)}"
                ) from None
            priors[name] = prior.detach().to(device=mu.device, dtype=torch.float64)
        if self._mean is not None and mu.shape[1] != self._mean.shape[0]:
            raise ValueError(
                f"mu has D = {mu.shape[1]} latent dimensions but earlier batches had "
                f"{self._mean.shape[0]}"
            )
        batch = mu.shape[0]
        if batch == 0:
            return
        kl = kl_per_element(mu, logvar, priors["prior_mu"], priors["prior_logvar"])
        kl_sum = kl.sum(dim=0)
        batch_mean = mu.mean(dim=0)
        centred = mu - batch_mean
        batch_comoment = centred.T @ centred
        if self._mean is None or self._comoment is None or self._kl_sum is None:
            self._mean, self._comoment, self._kl_sum = batch_mean, batch_comoment, kl_sum
        else:
            # Chan, Golub & LeVeque: merge two (count, mean, co-moment) summaries.
            total = self.n + batch
            delta = batch_mean - self._mean
            self._mean = self._mean + delta * (batch / total)
            self._comoment = (
                self._comoment
                + batch_comoment
                + torch.outer(delta, delta) * (self.n * batch / total)
            )
            self._kl_sum = self._kl_sum + kl_sum
        self._keep(mu, logvar)
        self.n += batch

    def _keep(self, mu: torch.Tensor, logvar: torch.Tensor) -> None:
        """Reservoir sampling (algorithm R) of rows, one batch at a time.

        Row i of the stream (0-based) fills slot i while the reservoir is not
        full, and otherwise replaces slot r for r uniform in [0, i] when
        r < mi_points. Within a batch a later row wins a slot, as in the
        row-by-row algorithm.
        """
        if self._kept_mu is None or self._kept_logvar is None:
            self._kept_mu = mu.new_empty((0, mu.shape[1]))
            self._kept_logvar = logvar.new_empty((0, mu.shape[1]))
        free = self.mi_points - self._kept_mu.shape[0]
        if free > 0:
            self._kept_mu = torch.cat([self._kept_mu, mu[:free]])
            self._kept_logvar = torch.cat([self._kept_logvar, logvar[:free]])
        first = max(free, 0)
        if first >= mu.shape[0]:
            return
        stream_index = self.n + np.arange(first, mu.shape[0])
        slots = self._reservoir_rng.integers(0, stream_index + 1)
        rows = np.arange(first, mu.shape[0])
        chosen = slots < self.mi_points
        slots, rows = slots[chosen][::-1], rows[chosen][::-1]
        _, last = np.unique(slots, return_index=True)  # first in reversed order = last row
        slots_t = torch.from_numpy(slots[last].copy()).to(mu.device)
        rows_t = torch.from_numpy(rows[last].copy()).to(mu.device)
        self._kept_mu[slots_t] = mu[rows_t]
        self._kept_logvar[slots_t] = logvar[rows_t]

    def subsample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows ``(mu, logvar)``, each [min(n, mi_points), D] float64.

        Raises:
            ValueError: No data has been added.
        """
        if self._kept_mu is None or self._kept_logvar is None:
            raise ValueError("PosteriorStats has no data: call update() first")
        return self._kept_mu, self._kept_logvar

    def compute(self) -> PosteriorSummary:
        """The statistics of every row seen so far.

        Returns:
            A dict: ``n`` (rows seen); ``active_units`` (dimensions with
            ``mu_variance > threshold``); ``mu_mean`` [D], ``mu_variance``
            [D] and ``mu_covariance`` [D, D] of E_q[z|x] over the data
            (population, divided by n); ``kl_per_dim`` [D], the mean over the
            data of KL(q(z_d|x) || p(z_d)) in nats, and ``kl`` its sum;
            ``n_collapsed`` (dimensions with ``kl_per_dim <
            collapse_threshold``); ``mutual_information`` (nats, estimated on
            the subsample, see the class docstring) and ``mi_sample_size``
            (its size, ``min(n, mi_points)``).

        Raises:
            ValueError: No data has been added.
        """
        if self._mean is None or self._comoment is None or self._kl_sum is None:
            raise ValueError("PosteriorStats has no data: call update() first")
        mu_kept, logvar_kept = self.subsample()
        covariance = self._comoment / self.n
        variance = covariance.diagonal().clone()
        kl_per_dim = self._kl_sum / self.n
        device = mu_kept.device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        mutual_info = mutual_information(
            mu_kept, logvar_kept, samples_per_point=self.samples_per_point, generator=generator
        )
        return {
            "n": self.n,
            "active_units": int((variance > self.threshold).sum()),
            "mu_mean": self._mean.clone(),
            "mu_variance": variance,
            "mu_covariance": covariance,
            "kl_per_dim": kl_per_dim,
            "kl": float(kl_per_dim.sum()),
            "n_collapsed": int((kl_per_dim < self.collapse_threshold).sum()),
            "mutual_information": mutual_info,
            "mi_sample_size": int(mu_kept.shape[0]),
        }

    def __repr__(self) -> str:
        return (
            f"PosteriorStats(n={self.n}, threshold={self.threshold}, "
            f"collapse_threshold={self.collapse_threshold}, mi_points={self.mi_points})"
        )


# Streamed over the training batches: defined in its own module.
from klanneal._monitor import CollapseMonitor, CollapseWarning  # noqa: E402
