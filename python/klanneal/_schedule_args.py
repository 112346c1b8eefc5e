"""Argument checks and shared types of klanneal.schedules: counts, ratios, steps,
a Lightning trainer's planned steps, and the native extension's lookup."""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import numpy.typing as npt

from klanneal._env import native_disabled

if TYPE_CHECKING:
    import torch


#: Ramp shapes of ``Cyclical``, in the order of the C++ ``RampShape`` enum.
SHAPES = ("linear", "sigmoid", "cosine", "logistic")


_MAX_COUNT = 2**53  # n_iter, n_cycle: exact as float64, like Python's int/int


_MAX_STEP = 2**62  # steps beyond this are clamped: every schedule holds `stop` long before


StepsLike = Union[int, Sequence[int], "npt.NDArray[np.integer[Any]]", "torch.Tensor"]


FloatArray = npt.NDArray[np.float64]


def _loaded_native() -> ModuleType | None:
    """klanneal._C, or None when it failed to import or KLANNEAL_DISABLE_NATIVE is set."""
    from klanneal import _C

    if _C is None or native_disabled():
        return None
    return _C


def _native(function: str) -> ModuleType:
    native = _loaded_native()
    if native is None:
        raise ImportError(
            f"klanneal.schedules.{function} needs the compiled extension klanneal._C, which "
            "failed to import or is disabled by KLANNEAL_DISABLE_NATIVE; reinstall klanneal "
            "(`make install` or `pip install .`); the schedule objects (Cyclical, ...) work "
            "without it"
        )
    return native


def _as_int(name: str, value: Any, minimum: int, maximum: int = _MAX_COUNT) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        result = operator.index(value)
    except TypeError:
        if not isinstance(value, (float, np.floating)):
            raise TypeError(
                f"{name} must be an integer, got {type(value).__name__} {value!r}"
            ) from None
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"{name} must be a whole number, got {value!r}") from None
        result = int(value)
    if result < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {result}")
    if result > maximum:
        limit = f"2**{maximum.bit_length() - 1}" if maximum > 2**20 else str(maximum)
        raise ValueError(f"{name} must be <= {limit}, got {result}")
    return result


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"{name} must be finite, got {result}")
    return result


def _as_ratio(name: str, value: Any) -> float:
    result = _as_float(name, value)
    if not 0.0 < result <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {result}")
    return result


def _as_zero_ratio(name: str, value: Any) -> float:
    result = _as_float(name, value)
    if not 0.0 <= result < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {result}")
    return result


def _check_span(start: float, stop: float) -> None:
    if not math.isfinite(stop - start):
        raise ValueError(f"stop - start must be finite, got stop={stop}, start={start}")


def _check_ramp_length(n_iter: int, n_cycle: int, name: str, ratio: float) -> None:
    # The published code divides by period*ratio; ZeroDivisionError there.
    if n_iter > 0 and (n_iter / n_cycle) * ratio == 0.0:
        raise ValueError(
            f"{name}={ratio} is too small: (n_iter / n_cycle) * {name} underflows to 0"
        )


def _as_step(step: Any) -> int:
    if type(step) is not int:
        torch_module = sys.modules.get("torch")
        if torch_module is not None and isinstance(step, torch_module.Tensor):
            step = _tensor_step(step, torch_module)
        elif isinstance(step, bool):
            raise TypeError(f"step must be an integer, got {step!r}")
    try:
        result = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {type(step).__name__} {step!r}") from None
    if result < 0:
        raise ValueError(f"step must be >= 0, got {result}")
    return min(result, _MAX_STEP)


def _tensor_step(step: torch.Tensor, torch_module: Any) -> int:
    """A 0-d integer tensor step as an int (operator.index would also take a
    bool tensor as 1, a 1-element tensor of any shape, and fail on a uint64
    one above 2**63 - 1)."""
    dtype = step.dtype
    if step.dim() != 0 or dtype.is_floating_point or dtype.is_complex or dtype == torch_module.bool:
        raise TypeError(
            "step must be an integer or a 0-d integer tensor, got a tensor of shape "
            f"{tuple(step.shape)} and dtype {dtype}"
        )
    if step.is_meta:
        raise ValueError("step: a meta tensor has no value to evaluate the schedule at")
    return int(step.item())


def planned_steps(trainer: Any) -> int:
    """The optimizer steps a Lightning ``trainer`` plans for the whole fit
    (``trainer.estimated_stepping_batches``: ``max_steps``, or the epochs'
    batches divided by ``accumulate_grad_batches``). Available once the
    trainer is fitting a module (``configure_optimizers`` and later hooks).

    Raises:
        TypeError: ``trainer`` has no ``estimated_stepping_batches``.
        ValueError: the trainer plans no finite number of steps (``max_steps=-1``
            with ``max_epochs=-1``), or none.
    """
    if not hasattr(type(trainer), "estimated_stepping_batches"):
        raise TypeError(
            "trainer must be a Lightning Trainer (with estimated_stepping_batches), got "
            f"{type(trainer).__name__}"
        )
    planned = trainer.estimated_stepping_batches
    if not (isinstance(planned, (int, float)) and math.isfinite(planned) and planned >= 1):
        raise ValueError(
            f"the trainer plans {planned} optimizer steps: set max_steps or max_epochs to "
            "size a schedule from it"
        )
    return int(planned)
