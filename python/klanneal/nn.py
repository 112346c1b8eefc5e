"""klanneal.nn.ELBOLoss: the fused ELBO loss as an nn.Module with a step counter."""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import nn

from klanneal import _validate
from klanneal.elbo import elbo_loss
from klanneal.reference import ELBOOutput
from klanneal.schedules import Schedule

__all__ = ["ELBOLoss"]


class ELBOLoss(nn.Module):
    """Negative ELBO with a KL weight that follows a schedule.

    The training step is held in an int64 buffer (``current_step``), so it
    moves with ``.to(device)`` and is saved in the model's state_dict; the
    schedule is evaluated from that tensor inside the op, so under
    torch.compile a changing step causes no recompiles. Call ``step()`` once
    per optimizer step::

        criterion = ELBOLoss(schedule=klanneal.schedules.Cyclical(...))
        ...
        out = criterion(logits, tokens, mu, logvar)
        out.loss.backward()
        optimizer.step()
        criterion.step()

    Args:
        schedule: a klanneal.schedules object, or a float for a constant beta.
        likelihood, reduction, free_bits, free_bits_mode, ignore_index,
            gaussian_var, inplace, validate: as in ``klanneal.elbo_loss``.

    Raises:
        TypeError, ValueError: an invalid option (checked here, at construction).
    """

    current_step: torch.Tensor

    def __init__(
        self,
        schedule: Union[float, Schedule] = 1.0,
        *,
        likelihood: str = "categorical",
        reduction: str = "batchmean",
        free_bits: float = 0.0,
        free_bits_mode: str = "batch",
        ignore_index: int = -100,
        gaussian_var: float = 1.0,
        inplace: bool = False,
        validate: bool = True,
    ) -> None:
        super().__init__()
        _validate.check_options(
            likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var
        )
        if not _validate.is_schedule(schedule):
            if isinstance(schedule, bool) or not isinstance(schedule, (int, float)):
                raise TypeError(
                    "schedule must be a klanneal.schedules object or a float, got "
                    f"{type(schedule).__name__}"
                )
            if not (math.isfinite(schedule) and schedule >= 0):
                raise ValueError(
                    f"schedule: a constant beta must be finite and >= 0, got {schedule}"
                )
            schedule = float(schedule)
        self.schedule = schedule
        self.likelihood = likelihood
        self.reduction = reduction
        self.free_bits = float(free_bits)
        self.free_bits_mode = free_bits_mode
        self.ignore_index = ignore_index
        self.gaussian_var = float(gaussian_var)
        self.inplace = inplace
        self.validate = validate
        self.register_buffer("current_step", torch.zeros((), dtype=torch.int64))

    def forward(
        self,
        recon_input: torch.Tensor,
        target: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
    ) -> ELBOOutput:
        """Loss at the current step; see ``klanneal.elbo_loss`` for shapes and the result."""
        scheduled = _validate.is_schedule(self.schedule)
        return elbo_loss(
            recon_input,
            target,
            mu,
            logvar,
            self.schedule,
            step=self.current_step if scheduled else None,
            likelihood=self.likelihood,
            reduction=self.reduction,
            free_bits=self.free_bits,
            free_bits_mode=self.free_bits_mode,
            ignore_index=self.ignore_index,
            gaussian_var=self.gaussian_var,
            inplace=self.inplace,
            validate=self.validate,
        )

    @torch.no_grad()
    def step(self) -> None:
        """Advances the schedule by one step (call once per optimizer step)."""
        self.current_step.add_(1)

    @property
    def beta(self) -> float:
        """The KL weight at the current step (reads the step buffer: a sync on GPU)."""
        if _validate.is_schedule(self.schedule):
            return float(self.schedule(int(self.current_step)))
        return float(self.schedule)  # type: ignore[arg-type]  # a real number

    def extra_repr(self) -> str:
        return (
            f"schedule={self.schedule!r}, likelihood={self.likelihood!r}, "
            f"reduction={self.reduction!r}, free_bits={self.free_bits}, "
            f"free_bits_mode={self.free_bits_mode!r}, inplace={self.inplace}"
        )
