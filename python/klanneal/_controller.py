"""``KLController``: beta set by feedback on the KL (ControlVAE's non-linear PI controller).

Shao et al., *ControlVAE: Controllable Variational Autoencoder* (ICML 2020),
Section 3 and Algorithm 1, and the authors' code (HuajieShao/ControlVAE-ICML2020,
``Language_modeling/Text_gen_PTB/PID.py`` and ``vae_train.py``). The
controller is a :class:`klanneal.schedules.Schedule` evaluated in PyTorch:
``elbo_loss`` / ``ELBOLoss`` read its current beta like any schedule's value,
and ``ELBOLoss`` feeds it the KL of every training call.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import numpy.typing as npt
import torch

from klanneal._closed_form import Constant, Schedule
from klanneal._host_schedules import (
    FromArray,
    HostSchedule,
    LinearWarmup,
    Logistic,
    nonnegative,
    schedule_bounds,
)
from klanneal._schedule_args import StepsLike, _as_int
from klanneal._sizing import schedule_length

__all__ = ["KLController", "controller_kl"]

# A set point given as a closed-form schedule is tabulated up to its end (a
# FromArray, evaluated on the device without a host sync): at most this many steps.
_MAX_TABLE = 2**24


class KLController(HostSchedule):
    r"""ControlVAE's non-linear PI controller: beta from the KL it is fed.

    Shao et al. (ICML 2020), Eq. (3) and Algorithm 1. At update t, with the
    batch KL :math:`\hat v(t)` and the set point :math:`v(t)` (``target_kl``)::

        e(t)    = v(t) - v_hat(t)                          # > 0: KL below target
        P(t)    = kp / (1 + exp(e(t)))                     # in (0, kp)
        I(t)    = I(t-1) - ki * e(t)                       # unless held (anti-windup)
        b~(t)   = P(t) + I(t) + beta_min
        beta(t) = min(max(b~(t), beta_min), beta_max)

    with ``I(0) = 0`` and ``beta(0) = beta_init`` (the paper's ``beta(0) = 0``
    for ``beta_min = 0``). A KL above the target (e < 0) raises beta, one
    below lowers it; the P term is bounded by ``kp``, so the integral does
    most of the work.

    **Default gains**: ``kp = 0.01``, ``ki = 1e-4``, the gains of the authors'
    language-model script (``vae_train.py``: ``--Kp 0.01 --Ki -0.0001``, their
    Ki carrying the sign that the paper writes in the formula); their
    disentangling script uses ``ki = 1e-3``. Small gains move beta slowly
    (``ki * |e|`` per update): larger ones settle faster and may oscillate.

    **Anti-windup.** Algorithm 1 holds the integral while the previous output
    lies outside ``[beta_min, beta_max]``. Read with the clamped beta that
    never happens; read with the unclamped ``b~(t-1)`` (as the authors'
    disentangling code does) the integral can lock: once ``I > beta_max -
    beta_min``, ``P >= 0`` keeps ``b~`` above ``beta_max`` and beta stays at
    ``beta_max`` whatever the KL. Here (conditional integration) the integral
    is held only when ``b~(t-1)`` is outside the bounds *and* integrating
    would push it further out (above ``beta_max`` with ``e < 0``, below
    ``beta_min`` with ``e > 0``), so it can always unwind. Inside the bounds
    the two agree step for step (tests/test_controller.py, against a
    transcription of Algorithm 1 and of the authors' ``PIDControl.pid``).

    **Set point.** ``target_kl`` is a float or a schedule of the step (the
    authors' dSprites script ramps it: 0.5 nats, +0.15 every 5000
    iterations, up to 18), evaluated at the number of updates so far (0 at
    the first). A closed-form one (``Constant``, ``Monotonic``, ``Cyclical``,
    ``Capacity``, ``Offset``) is tabulated up to its end (at most 2**24
    steps), so that it too is read on the device.

    **Use.** ``ctrl.beta`` is the current beta (a 0-d float64 tensor);
    ``ctrl.update(kl)`` takes the batch KL (a 0-d tensor: the KL term per
    example, ``out.kl`` under ``reduction="batchmean"``) and moves beta,
    entirely in tensor ops on the KL's device (the state moves there at the
    first update): no host sync, traceable by ``torch.compile``, and the
    state is updated in place so that a CUDA graph can capture the update
    (tests/test_controller.py, on a GPU). As the schedule
    of :class:`klanneal.nn.ELBOLoss` it is fed the loss's own detached KL
    after every call in training mode (under gradient accumulation, every
    micro-batch); ``elbo_loss(..., beta=ctrl, step=...)`` reads it without
    updating it. A non-finite KL is ignored (the state is kept). Under
    data-parallel training each process's controller follows its own
    batches' KL (for one beta, ``elbo_loss`` and ``update`` with the
    all-reduced KL). Calling it (``ctrl(step)``) returns the current beta as
    a float at any step (a sync on GPU); it has no values at other steps
    (``values`` and ``offset`` raise).

    Args:
        target_kl: the set point in nats per example: a float >= 0 or a
            klanneal.schedules object with values >= 0 (not a KLController).
        kp: proportional gain, finite and >= 0.
        ki: integral gain, finite and >= 0.
        beta_min: lower bound of beta (and the offset of the P and I terms),
            finite and >= 0.
        beta_max: upper bound of beta, finite and >= beta_min.
        beta_init: beta before the first update (default ``beta_min``), in
            ``[beta_min, beta_max]``.

    Raises:
        TypeError: a gain or bound not a real number, or ``target_kl`` neither
            a real number nor a schedule (or a KLController).
        ValueError: a negative or non-finite value, ``beta_max < beta_min``,
            ``beta_init`` outside the bounds, a set-point schedule with
            negative values or too long to tabulate.

    Example::

        ctrl = KLController(target_kl=3.0)
        criterion = klanneal.nn.ELBOLoss(ctrl)   # updates ctrl after each training call
        out = criterion(logits, tokens, mu, logvar)
    """

    _fields = ("target_kl", "kp", "ki", "beta_min", "beta_max", "beta_init")

    def __init__(
        self,
        target_kl: Union[float, Schedule],
        *,
        kp: float = 0.01,
        ki: float = 1e-4,
        beta_min: float = 0.0,
        beta_max: float = 1.0,
        beta_init: Optional[float] = None,
    ) -> None:
        self._configure(target_kl, kp, ki, beta_min, beta_max, beta_init)
        self._reset_state(torch.device("cpu"))

    def _configure(
        self,
        target_kl: Any,
        kp: Any,
        ki: Any,
        beta_min: Any,
        beta_max: Any,
        beta_init: Any,
    ) -> None:
        self.kp = nonnegative("kp", kp)
        self.ki = nonnegative("ki", ki)
        self.beta_min = nonnegative("beta_min", beta_min)
        self.beta_max = nonnegative("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"beta_max must be >= beta_min, got beta_max={self.beta_max}, "
                f"beta_min={self.beta_min}"
            )
        init = self.beta_min if beta_init is None else nonnegative("beta_init", beta_init)
        if not self.beta_min <= init <= self.beta_max:
            raise ValueError(
                f"beta_init must be in [beta_min, beta_max] = [{self.beta_min}, "
                f"{self.beta_max}], got {init}"
            )
        self.beta_init = init
        self.target_kl = _check_target(target_kl)
        self._target_table = _device_target(self.target_kl)

    def _reset_state(self, device: torch.device) -> None:
        # Shape [1], not 0-d: torch 2.13's torch.compile drops in-place
        # updates of a captured 0-d float64 CPU tensor.
        def scalar(value: float) -> torch.Tensor:
            return torch.full((1,), value, dtype=torch.float64, device=device)

        # I(t), the unclamped output b~(t) (read by the anti-windup), beta(t)
        # = clamp(b~(t)), and the number of updates (the set point's step).
        self._integral = scalar(0.0)
        self._raw = scalar(self.beta_init)
        self._beta = scalar(self.beta_init)
        self._step = torch.zeros((), dtype=torch.int64, device=device)

    # ---- the controller ---------------------------------------------------------------

    @property
    def beta(self) -> torch.Tensor:
        """The current beta: a 0-d float64 tensor on the state's device (a copy)."""
        return self._beta.reshape(()).clone()

    @property
    def updates(self) -> torch.Tensor:
        """The number of updates so far (a 0-d int64 tensor; the set point's step)."""
        return self._step.clone()

    def update(self, kl: Union[torch.Tensor, float]) -> None:
        """Moves beta by one PI step from the batch KL (see the class docstring).

        Args:
            kl: 0-d floating-point tensor (any device; detached here) or a
                real number: the KL term per example of the batch just
                computed with the current beta.

        Raises:
            TypeError: ``kl`` is not a floating-point tensor or a real number.
            ValueError: ``kl`` is a tensor with more than zero dimensions.
        """
        measured = _as_kl(kl, self._beta.device)
        if measured.device != self._beta.device:
            self._move_to(measured.device)
        error = self._target_at(self._step) - measured
        p_term = self.kp / (1.0 + torch.exp(error))
        raw_prev, integral_prev = self._raw, self._integral
        hold = ((raw_prev > self.beta_max) & (error < 0)) | (
            (raw_prev < self.beta_min) & (error > 0)
        )
        integral = torch.where(hold, integral_prev, integral_prev - self.ki * error)
        raw = p_term + integral + self.beta_min
        finite = torch.isfinite(measured)
        # In place: a CUDA graph replays into these very tensors.
        self._integral.copy_(torch.where(finite, integral, integral_prev))
        self._raw.copy_(torch.where(finite, raw, raw_prev))
        self._beta.copy_(self._raw.clamp(self.beta_min, self.beta_max))
        self._step.add_(1)

    def _target_at(self, step: torch.Tensor) -> Union[float, torch.Tensor]:
        table = self._target_table
        if table is None:
            return float(self.target_kl)  # type: ignore[arg-type]  # a float set point
        return table._at(step)

    def _move_to(self, device: torch.device) -> None:
        for name in ("_integral", "_raw", "_beta", "_step"):
            setattr(self, name, getattr(self, name).to(device))

    # ---- the Schedule protocol ----------------------------------------------------------

    def _value(self, step: int) -> float:
        return float(self._beta)

    def _values(self, steps: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
        raise self._no_values()

    def values(self, n_or_steps: StepsLike) -> Any:
        """Refused: beta depends on the KL fed so far, not on the step.

        Raises:
            TypeError: always.
        """
        raise self._no_values()

    def offset(self, steps: int = 1) -> Schedule:
        """Refused: a controller has no value at another step.

        Raises:
            TypeError: always.
        """
        raise self._no_values()

    @staticmethod
    def _no_values() -> TypeError:
        return TypeError(
            "a KLController's beta depends on the KL it has been fed, not on the step: it has "
            "no values at other steps (read ctrl.beta, or ctrl(step) for the current one)"
        )

    def _at(self, step: torch.Tensor) -> torch.Tensor:
        # A copy: the op may keep the beta it is given, and update() writes
        # the state in place.
        return self._beta.to(step.device).reshape(()).clone()

    def bounds(self) -> tuple[float, float]:
        return self.beta_min, self.beta_max

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self, running: bool = True) -> dict[str, Any]:
        """Plain-Python state: the constructor's arguments (a set-point
        schedule as its ``state_dict()``) and, with ``running``, the running
        state ``{"integral", "raw", "updates"}`` (reads the tensors: a sync
        on GPU). Floats are the float64 state's exact values, so a loaded
        controller continues bit for bit.
        """
        target = self.target_kl
        state: dict[str, Any] = {
            "type": "KLController",
            "target_kl": target.state_dict() if isinstance(target, Schedule) else target,
            "kp": self.kp,
            "ki": self.ki,
            "beta_min": self.beta_min,
            "beta_max": self.beta_max,
            "beta_init": self.beta_init,
        }
        if running:
            state["state"] = {
                "integral": float(self._integral),
                "raw": float(self._raw),
                "updates": int(self._step),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict`: the arguments (validated again) and
        the running state (without one: the state before the first update).
        The state tensors are written in place, on their device.

        Raises:
            ValueError: not a dict, another schedule type, missing or unknown
                keys, or an invalid value (named).
            TypeError: a value of the wrong type (named).
        """
        if not isinstance(state_dict, dict):
            raise ValueError(
                "state_dict must be a dict (from KLController.state_dict), got "
                f"{type(state_dict).__name__}"
            )
        state = dict(state_dict)
        kind = state.pop("type", None)
        if kind != "KLController":
            raise ValueError(f"state_dict is for a {kind!r} schedule, not 'KLController'")
        running = state.pop("state", None)
        missing = [name for name in self._fields if name not in state]
        unknown = sorted(set(state) - set(self._fields))
        if missing or unknown:
            raise ValueError(f"state_dict: missing keys {missing}, unknown keys {unknown}")
        restored = _running_state(running)  # checked before anything changes
        target = state["target_kl"]
        if isinstance(target, dict):
            target = _load_target(self.target_kl, target)
        self._configure(
            target, state["kp"], state["ki"], state["beta_min"], state["beta_max"],
            state["beta_init"],
        )  # fmt: skip
        integral, raw, updates = (0.0, self.beta_init, 0) if restored is None else restored
        # In place: a CUDA graph that captured update() keeps these tensors.
        self._integral.fill_(integral)
        self._raw.fill_(raw)
        self._beta.fill_(min(max(raw, self.beta_min), self.beta_max))
        self._step.fill_(updates)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        # The arguments only: reading the running state would sync the device.
        return (
            f"KLController(target_kl={self.target_kl!r}, kp={self.kp!r}, ki={self.ki!r}, "
            f"beta_min={self.beta_min!r}, beta_max={self.beta_max!r}, "
            f"beta_init={self.beta_init!r})"
        )


def controller_kl(kl: torch.Tensor, reduction: str, batch_size: int) -> torch.Tensor:
    """The KL per example, detached, from an ELBOOutput's ``kl`` under ``reduction``:
    itself under "batchmean", divided by the batch size under "sum", its mean
    under "none" (a [B] vector)."""
    kl = kl.detach()
    if reduction == "sum":
        return kl / batch_size
    if reduction == "none":
        return kl.mean()
    return kl


# ---- checks ---------------------------------------------------------------------------------


def _check_target(target: Any) -> Union[float, Schedule]:
    if isinstance(target, KLController):
        raise TypeError("target_kl: a KLController's beta is not a KL set point")
    if isinstance(target, Schedule):
        low, high = schedule_bounds(target)
        if not (0 <= low and high < math.inf):
            raise ValueError(
                f"target_kl: {target!r} takes values in [{low}, {high}]; a KL set point must "
                "be finite and >= 0"
            )
        return target
    if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)):
        raise TypeError(
            "target_kl must be a real number or a klanneal.schedules object, got "
            f"{type(target).__name__}"
        )
    return nonnegative("target_kl", target)


def _device_target(target: Union[float, Schedule]) -> Optional[HostSchedule]:
    """The set point as a schedule evaluated by torch ops at a step tensor
    (None for a float): as it is when it is one (FromArray, Logistic,
    LinearWarmup), otherwise tabulated up to its end."""
    if not isinstance(target, Schedule):
        return None
    if isinstance(target, (FromArray, Logistic, LinearWarmup)):
        return target
    if isinstance(target, Constant):
        return FromArray([target.beta])
    end = schedule_length(target)
    if end is None or end > _MAX_TABLE:
        raise ValueError(
            f"target_kl: {target!r} has no end within {_MAX_TABLE} steps to tabulate; pass a "
            "FromArray of its values (or a float)"
        )
    return FromArray(np.asarray(target.values(end + 1), dtype=np.float64))


def _load_target(current: Any, saved: dict[str, Any]) -> Schedule:
    """A set-point schedule from its saved state: loaded into the current one
    when it has that type (a FromArray checks it is the same table), else rebuilt."""
    if isinstance(current, Schedule) and saved.get("type") == type(current).__name__:
        current.load_state_dict(saved)
        return current
    return Schedule.from_state_dict(saved)


def _running_state(running: Any) -> Optional[tuple[float, float, int]]:
    """(integral, raw, updates) of a saved running state (None when absent)."""
    if running is None:
        return None
    if not isinstance(running, dict) or set(running) != {"integral", "raw", "updates"}:
        keys = sorted(running) if isinstance(running, dict) else type(running).__name__
        raise ValueError(
            f"state_dict['state'] must be a dict with keys ['integral', 'raw', 'updates'], got "
            f"{keys}"
        )
    values = []
    for name in ("integral", "raw"):
        value = running[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"state_dict['state'][{name!r}] must be a float, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"state_dict['state'][{name!r}] must be finite, got {value!r}")
        values.append(float(value))
    updates = _as_int("state_dict['state']['updates']", running["updates"], 0, 2**62)
    return values[0], values[1], updates


def _as_kl(kl: Any, device: torch.device) -> torch.Tensor:
    """The batch KL as a 0-d float64 tensor (metadata checks only: no sync)."""
    if isinstance(kl, torch.Tensor):
        if not kl.dtype.is_floating_point:
            raise TypeError(f"kl must be a floating-point tensor, got dtype {kl.dtype}")
        if kl.dim() != 0:
            raise ValueError(
                f"kl must be a 0-d tensor (the batch's KL per example), got shape {tuple(kl.shape)}"
            )
        return kl.detach().to(torch.float64)
    if isinstance(kl, bool) or not isinstance(kl, (int, float, np.integer, np.floating)):
        raise TypeError(f"kl must be a 0-d tensor or a real number, got {type(kl).__name__}")
    return torch.tensor(float(kl), dtype=torch.float64, device=device)
