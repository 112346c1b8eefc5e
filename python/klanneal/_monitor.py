"""``CollapseMonitor``: posterior collapse watched over the training batches.

``klanneal.metrics.PosteriorStats`` measures a posterior over a whole
evaluation set; this monitor follows training itself, batch by batch, from
what the fused op already returns (``out.kl_per_dim``) and, optionally, the
posterior means. Every update is a few tensor ops on the batch's device with
no host sync; reading a flag or a count (``summary()``, ``bool(collapsed)``)
is one.
"""

from __future__ import annotations

import numbers
from typing import Any, Optional

import torch

from klanneal.metrics import _check_threshold  # metrics imports this module last

__all__ = ["CollapseMonitor", "CollapseWarning"]

# The thresholds of klanneal.metrics (defined there; repeated here to avoid
# an import cycle, and checked equal by the tests).
_ACTIVE_UNIT_THRESHOLD = 0.01
_COLLAPSE_THRESHOLD = 0.01


class CollapseWarning(UserWarning):
    """The posterior collapsed during training (a :class:`CollapseMonitor` flag)."""


class CollapseMonitor:
    """KL per dimension, active units and a collapse flag, streamed over training batches.

    Call :meth:`update` once per training batch with the op's ``kl_per_dim``
    (and, optionally, the batch's posterior means ``mu``)::

        monitor = CollapseMonitor()
        out = klanneal.elbo_loss(logits, tokens, mu, logvar, beta)
        monitor.update(out.kl_per_dim, mu)
        ...
        if step % 100 == 0 and bool(monitor.collapsed):   # a sync, when you look
            print(monitor.summary())

    What it keeps (float64, on the batch's device), as exponential moving
    averages over the batches with weight ``max(1 / n, 1 - decay)`` for the
    n-th update (the plain mean of the first ``1 / (1 - decay)`` batches,
    then an EMA over about that many):

    * ``kl_per_dim`` [D]: the batch-mean KL of each latent dimension (nats);
      ``kl`` its sum, the KL per example.
    * ``active_units``: an **EMA estimate** of Burda et al.'s active units,
      the dimensions d with ``Cov_x(E_q[z_d | x]) > active_threshold``. With
      ``mu`` the covariance is ``EMA(mean_b mu_d^2) - EMA(mean_b mu_d)^2``,
      the posterior means' variance pooled over the recent batches (it also
      counts the encoder's drift over that window, which the covariance
      over a fixed model would not); without ``mu``, the dimensions whose
      EMA KL exceeds ``collapse_threshold`` nats (a proxy: a dimension whose
      posterior is the prior for every x has KL 0). The mode is fixed by the
      first update.
    * ``collapsed``: no active unit for ``patience`` consecutive updates, or
      the EMA KL per example below ``kl_threshold`` for ``patience``
      consecutive updates.

    Args:
        decay: EMA decay in [0, 1) (0: the last batch only).
        patience: consecutive updates a collapse condition must hold, >= 1.
        kl_threshold: nats per example; default ``collapse_threshold * D``
            (every dimension below ``collapse_threshold`` on average).
        active_threshold: variance above which a dimension is active
            (klanneal.metrics.ACTIVE_UNIT_THRESHOLD, 0.01).
        collapse_threshold: nats; without ``mu``, a dimension with a smaller
            EMA KL is inactive (klanneal.metrics.COLLAPSE_THRESHOLD, 0.01).

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range.
    """

    def __init__(
        self,
        *,
        decay: float = 0.98,
        patience: int = 200,
        kl_threshold: Optional[float] = None,
        active_threshold: float = _ACTIVE_UNIT_THRESHOLD,
        collapse_threshold: float = _COLLAPSE_THRESHOLD,
    ) -> None:
        self.decay = _check_threshold("decay", decay)
        if not self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        self.patience = _count("patience", patience)
        self.kl_threshold = (
            None if kl_threshold is None else _check_threshold("kl_threshold", kl_threshold)
        )
        self.active_threshold = _check_threshold("active_threshold", active_threshold)
        self.collapse_threshold = _check_threshold("collapse_threshold", collapse_threshold)
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen (the next update starts afresh)."""
        self.updates = 0
        self.uses_mu: Optional[bool] = None
        self._kl: Optional[torch.Tensor] = None  # [D] EMA of kl_per_dim
        self._mean: Optional[torch.Tensor] = None  # [D] EMA of mean_b mu
        self._square: Optional[torch.Tensor] = None  # [D] EMA of mean_b mu^2
        self._active: Optional[torch.Tensor] = None  # 0-d int64
        self._without_active: Optional[torch.Tensor] = None  # 0-d int64, consecutive updates
        self._low_kl: Optional[torch.Tensor] = None  # 0-d int64, consecutive updates

    def reset_counters(self) -> None:
        """Restarts the two collapse counters (e.g. after acting on a collapse)."""
        if self._without_active is not None and self._low_kl is not None:
            self._without_active.zero_()
            self._low_kl.zero_()

    @torch.no_grad()
    def update(self, kl_per_dim: torch.Tensor, mu: Optional[torch.Tensor] = None) -> None:
        """Adds one training batch.

        Args:
            kl_per_dim: [D] batch-mean KL per latent dimension (``out.kl_per_dim``).
            mu: optional [B, D] posterior means of the batch, on the same device.

        Raises:
            TypeError: not floating-point tensors.
            ValueError: wrong shapes, another D or device than before, ``mu``
                missing (or given) when the first update had it (or not).
        """
        kl = self._checked(kl_per_dim, mu)
        if self._kl is None:
            self._start(kl)
            self.uses_mu = mu is not None
        assert self._kl is not None and self._active is not None
        weight = max(1.0 / (self.updates + 1), 1.0 - self.decay)
        self._kl.lerp_(kl, weight)
        if mu is not None:
            assert self._mean is not None and self._square is not None
            means = mu.detach().to(torch.float64)
            self._mean.lerp_(means.mean(0), weight)
            self._square.lerp_((means * means).mean(0), weight)
            variance = self._square - self._mean * self._mean
            self._active.copy_((variance > self.active_threshold).sum())
        else:
            self._active.copy_((self._kl > self.collapse_threshold).sum())
        threshold = self._kl_threshold()
        assert self._without_active is not None and self._low_kl is not None
        # n + 1 while the condition holds, 0 once it does not: in place, no sync.
        self._without_active.add_(1).mul_(self._active == 0)
        self._low_kl.add_(1).mul_(self._kl.sum() < threshold)
        self.updates += 1

    def _checked(self, kl_per_dim: Any, mu: Any) -> torch.Tensor:
        if not isinstance(kl_per_dim, torch.Tensor) or not kl_per_dim.dtype.is_floating_point:
            raise TypeError(
                f"kl_per_dim must be a floating-point tensor, got {type(kl_per_dim).__name__}"
            )
        if kl_per_dim.dim() != 1:
            raise ValueError(f"kl_per_dim must be 1-D [D], got shape {tuple(kl_per_dim.shape)}")
        dims = kl_per_dim.shape[0]
        if self._kl is not None and (
            self._kl.shape[0] != dims or self._kl.device != kl_per_dim.device
        ):
            raise ValueError(
                f"kl_per_dim has D={dims} on {kl_per_dim.device}; the monitor has seen "
                f"D={self._kl.shape[0]} on {self._kl.device} (reset() it for another model)"
            )
        if mu is not None:
            if not isinstance(mu, torch.Tensor) or not mu.dtype.is_floating_point:
                raise TypeError(f"mu must be a floating-point tensor, got {type(mu).__name__}")
            if mu.dim() != 2 or mu.shape[1] != dims or mu.shape[0] == 0:
                raise ValueError(
                    f"mu must be [B, D] with B >= 1 and D = {dims} (kl_per_dim's), got shape "
                    f"{tuple(mu.shape)}"
                )
            if mu.device != kl_per_dim.device:
                raise ValueError(f"mu is on {mu.device} but kl_per_dim is on {kl_per_dim.device}")
        if self.uses_mu is not None and self.uses_mu != (mu is not None):
            first = "with" if self.uses_mu else "without"
            raise ValueError(
                f"the first update came {first} mu: its active units are estimated "
                f"{'from the means' if self.uses_mu else 'from the KL'}; pass mu always or never"
            )
        return kl_per_dim.detach().to(torch.float64)

    def _start(self, kl: torch.Tensor) -> None:
        def counter() -> torch.Tensor:
            return torch.zeros((), dtype=torch.int64, device=kl.device)

        self._kl = torch.zeros_like(kl)
        self._mean, self._square = torch.zeros_like(kl), torch.zeros_like(kl)
        self._active, self._without_active, self._low_kl = counter(), counter(), counter()

    def _started(self) -> None:
        if self._kl is None:
            raise RuntimeError("CollapseMonitor: no batch yet (call update() first)")

    def _kl_threshold(self) -> float:
        if self.kl_threshold is not None:
            return self.kl_threshold
        assert self._kl is not None
        return self.collapse_threshold * self._kl.shape[0]

    # ---- results (0-d tensors: no sync until read) -------------------------------------------

    @property
    def kl_per_dim(self) -> torch.Tensor:
        """[D] EMA of the batch-mean KL per dimension (float64).

        Raises:
            RuntimeError: no update yet (likewise for the other results).
        """
        self._started()
        assert self._kl is not None
        return self._kl.clone()

    @property
    def kl(self) -> torch.Tensor:
        """0-d EMA of the KL per example (the sum over dimensions)."""
        self._started()
        assert self._kl is not None
        return self._kl.sum()

    @property
    def active_units(self) -> torch.Tensor:
        """0-d int64: the EMA estimate of the active units (see the class docstring)."""
        self._started()
        assert self._active is not None
        return self._active.clone()

    @property
    def collapsed(self) -> torch.Tensor:
        """0-d bool: a collapse condition has held for ``patience`` updates."""
        self._started()
        assert self._without_active is not None and self._low_kl is not None
        return (self._without_active >= self.patience) | (self._low_kl >= self.patience)

    def summary(self) -> dict[str, Any]:
        """The results as Python numbers (a sync on GPU): ``kl``, ``kl_per_dim``
        (a list), ``active_units``, ``collapsed``, ``steps_without_active_units``,
        ``steps_with_low_kl``, ``kl_threshold``, ``updates`` and ``reason``
        (why it is collapsed, or None)."""
        self._started()
        assert self._kl is not None and self._without_active is not None
        assert self._low_kl is not None
        without, low = int(self._without_active), int(self._low_kl)
        kl, threshold = float(self._kl.sum()), self._kl_threshold()
        reasons = []
        if without >= self.patience:
            reasons.append(f"no active unit for the last {without} batches")
        if low >= self.patience:
            reasons.append(
                f"the KL per example (EMA {kl:.4g} nats) below {threshold:.4g} for the last "
                f"{low} batches"
            )
        return {
            "kl": kl,
            "kl_per_dim": self._kl.tolist(),
            "active_units": int(self.active_units),
            "collapsed": bool(reasons),
            "steps_without_active_units": without,
            "steps_with_low_kl": low,
            "kl_threshold": threshold,
            "updates": self.updates,
            "reason": "; ".join(reasons) or None,
        }

    def __repr__(self) -> str:
        return (
            f"CollapseMonitor(decay={self.decay}, patience={self.patience}, "
            f"kl_threshold={self.kl_threshold}, active_threshold={self.active_threshold}, "
            f"collapse_threshold={self.collapse_threshold}, updates={self.updates})"
        )


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
