"""A Lightning callback that anneals beta, logs the ELBO terms and posterior diagnostics.

Needs ``lightning`` (``pip install 'klanneal[lightning]'``), the ``lightning``
distribution's ``lightning.pytorch`` (not the older ``pytorch_lightning``
package, whose Trainer does not accept its callbacks).

Example::

    import lightning.pytorch as pl
    import klanneal
    from klanneal.integrations.lightning import KLAnnealing

    class VAE(pl.LightningModule):
        def __init__(self):
            super().__init__()
            ...
            self.criterion = klanneal.nn.ELBOLoss(klanneal.schedules.Cyclical(10_000))

        def training_step(self, batch, batch_idx):
            logits, mu, logvar = self(batch)
            out = self.criterion(logits, batch, mu, logvar)
            return {"loss": out.loss, "elbo": out}   # "elbo": recon and KL get logged

        def validation_step(self, batch, batch_idx):
            logits, mu, logvar = self(batch)
            return {"mu": mu, "logvar": logvar}      # PosteriorStats at validation end

    trainer = pl.Trainer(callbacks=[KLAnnealing("criterion")], accumulate_grad_batches=4)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

from klanneal._controller import KLController
from klanneal._host_schedules import is_value_table
from klanneal._sizing import ScheduleLengthWarning, length_mismatch, planned_steps
from klanneal.metrics import CollapseMonitor, CollapseWarning, PosteriorStats, PosteriorSummary
from klanneal.nn import ELBOLoss
from klanneal.reference import ELBOOutput
from klanneal.schedules import BetaScheduler, Cyclical

__all__ = ["KLAnnealing", "planned_steps"]

Target = Union[ELBOLoss, BetaScheduler]


class KLAnnealing(Callback):
    """Steps a KL schedule once per optimizer step and logs what to watch for KL vanishing.

    **Stepping.** ``target`` (an :class:`klanneal.nn.ELBOLoss`, a
    :class:`klanneal.schedules.BetaScheduler`, or the name of an attribute of
    the LightningModule holding one) advances by one step for every
    optimizer step, i.e. every time ``trainer.global_step`` increases: with
    ``accumulate_grad_batches=k`` once per k batches, as the learning rate.
    Do not also call ``target.step()`` yourself. The schedule's step is the
    number of optimizer steps taken, so the batches of optimizer step s are
    weighted by ``schedule(s)``.

    **Logging** (``prefix`` + name, through ``LightningModule.log``):

    * ``beta``: every training batch, the beta that batch's loss used (for
      a :class:`klanneal.schedules.KLController`, its 0-d tensor: no sync).
    * ``recon``, ``kl``: every training batch, when ``training_step`` returns
      a dict with the batch's :class:`klanneal.ELBOOutput` under ``"elbo"``
      (``return {"loss": out.loss, "elbo": out}``); ``kl`` is before free bits.
    * ``active_units``: every such batch, the :class:`klanneal.metrics.CollapseMonitor`'s
      EMA estimate (from ``kl_per_dim``, and from the posterior means when
      ``training_step`` also returns ``"mu"``), a tensor: no sync.
    * every ``trainer.log_every_n_steps`` such batches: the monitor's KL per
      dimension, as a histogram ``kl_per_dim`` on loggers whose
      ``experiment`` has ``add_histogram`` (TensorBoard) and, with
      ``log_kl_per_dim=True``, as ``kl_dim_<d>`` scalars; and the collapse
      check (reads the monitor: a sync, at those batches only).
    * at the end of each validation epoch (not the sanity check), when
      ``validation_step`` returns a dict with ``"mu"`` and ``"logvar"``
      ([B, D] parameters of q(z|x); optionally ``"prior_mu"`` and
      ``"prior_logvar"``, see :meth:`klanneal.metrics.PosteriorStats.update`):
      ``val_active_units``, ``val_mutual_information``, ``val_kl`` and
      ``val_n_collapsed`` of a :class:`klanneal.metrics.PosteriorStats` over
      the whole validation set, and with ``log_kl_per_dim=True``
      ``val_kl_dim_<d>`` for each dimension. The full summary is kept in
      :attr:`posterior_summary`. Under data-parallel training every process
      computes the statistics of its own shard.

    **Collapse.** When the monitor flags a collapse (no active unit, or the
    KL per example below its threshold, for ``patience`` batches) the
    callback warns once (:class:`klanneal.metrics.CollapseWarning`). With
    ``restart_on_collapse=True`` and a :class:`~klanneal.schedules.Cyclical`
    schedule it also moves the target back to the first step of the current
    cycle, so beta ramps again from ``start`` (our extension, not the
    paper's; off by default): each restart delays the rest of the schedule
    (the last cycle may not end within the run) and needs ``patience`` more
    collapsed batches before the next; :attr:`cycle_restarts` counts them.

    **Schedule length.** At train start the schedule's length is compared
    with the optimizer steps the trainer plans
    (``trainer.estimated_stepping_batches``, see
    :func:`planned_steps`): a :class:`klanneal.schedules.ScheduleLengthWarning`
    says when a cyclical schedule spans another number of steps (its cycles
    do not fit, or end early), a ramp ends after the run (beta never
    reaches its final value) or a table has another length.
    ``Cyclical.for_trainer(self.trainer, n_cycles=4)`` in
    ``configure_optimizers`` sizes one from the trainer.

    **A controller.** An ELBOLoss whose schedule is a
    :class:`klanneal.schedules.KLController` updates it itself; a
    BetaScheduler's KLController is updated here, after each training batch,
    with the batch's ``elbo.kl_per_dim.sum()`` (its KL per example).

    **Resuming.** The callback's ``state_dict`` (saved in Lightning
    checkpoints) holds the target's step (and a BetaScheduler's schedule), so
    ``trainer.fit(..., ckpt_path=...)`` continues the beta sequence exactly.

    Args:
        target: What to step (see above); a list or 1-D array of beta per
            step is stepped as ``BetaScheduler(FromArray(values))``.
        prefix: Prepended to every logged name.
        log_kl_per_dim: Also log the validation KL of every latent dimension.
        stats: Configures the validation statistics (threshold, mi_points,
            ...); default ``PosteriorStats()``. It is reset at the start of
            every validation epoch.
        monitor: The training-time :class:`~klanneal.metrics.CollapseMonitor`
            (True: ``CollapseMonitor()``; False: none).
        restart_on_collapse: Restart the current cycle of a Cyclical
            schedule when the monitor flags a collapse (see above).

    Raises:
        TypeError: ``target`` is neither an ELBOLoss, a BetaScheduler nor a
            string (or, at fit start, the named attribute is neither),
            ``stats`` is not a PosteriorStats, ``monitor`` neither a
            CollapseMonitor nor a bool, or (at fit start) a
            ``restart_on_collapse`` target whose schedule is not a Cyclical.
        ValueError: ``restart_on_collapse`` without a monitor.
    """

    def __init__(
        self,
        target: Union[Target, str],
        *,
        prefix: str = "klanneal/",
        log_kl_per_dim: bool = False,
        stats: Optional[PosteriorStats] = None,
        monitor: Union[CollapseMonitor, bool] = True,
        restart_on_collapse: bool = False,
    ) -> None:
        super().__init__()
        if is_value_table(target):  # beta per step: stepped as a BetaScheduler
            target = BetaScheduler(target)  # type: ignore[arg-type]
        if not isinstance(target, (ELBOLoss, BetaScheduler, str)):
            raise TypeError(
                "target must be a klanneal.nn.ELBOLoss, a klanneal.schedules.BetaScheduler or "
                f"the name of a LightningModule attribute holding one, got {type(target).__name__}"
            )
        if stats is not None and not isinstance(stats, PosteriorStats):
            raise TypeError(f"stats must be a klanneal.metrics.PosteriorStats, got {type(stats)}")
        if not isinstance(monitor, (CollapseMonitor, bool)):
            raise TypeError(
                f"monitor must be a klanneal.metrics.CollapseMonitor or a bool, got "
                f"{type(monitor).__name__}"
            )
        if restart_on_collapse and monitor is False:
            raise ValueError("restart_on_collapse needs the collapse monitor (monitor=True)")
        self._target_name = target if isinstance(target, str) else None
        self._target: Optional[Target] = None if isinstance(target, str) else target
        self.prefix = prefix
        self.log_kl_per_dim = log_kl_per_dim
        self.stats = PosteriorStats() if stats is None else stats
        self.posterior_summary: Optional[PosteriorSummary] = None
        self.monitor: Optional[CollapseMonitor] = (
            CollapseMonitor() if monitor is True else monitor or None
        )
        self.restart_on_collapse = restart_on_collapse
        self.cycle_restarts = 0
        self._warned_collapse = False
        self._monitored_batches = 0
        self._batch_beta: Union[None, float, torch.Tensor] = None
        # trainer.global_step when the target was last advanced; None until
        # the first fit starts (or a checkpoint is loaded).
        self._global_step: Optional[int] = None
        # A checkpoint was loaded since the last fit started: a fit without
        # one counts from its Trainer's own global_step (another Trainer's,
        # when the callback is reused, starts at 0).
        self._loaded = False
        # A checkpoint's state, loaded before a target named by attribute was
        # resolved (Lightning loads callback states before on_fit_start).
        self._pending_state: Optional[dict[str, Any]] = None

    # ---- the target ---------------------------------------------------------------

    def target(self, pl_module: Optional[LightningModule] = None) -> Target:
        """The ELBOLoss or BetaScheduler this callback steps.

        Raises:
            TypeError: A named attribute that is neither.
            RuntimeError: A target named by attribute, not resolved yet and no
                module given.
        """
        if self._target is not None:
            return self._target
        if pl_module is None:
            raise RuntimeError(
                f"target {self._target_name!r} is looked up on the LightningModule at fit start"
            )
        resolved = getattr(pl_module, str(self._target_name), None)
        if not isinstance(resolved, (ELBOLoss, BetaScheduler)):
            raise TypeError(
                f"target: LightningModule attribute {self._target_name!r} must be a "
                "klanneal.nn.ELBOLoss or klanneal.schedules.BetaScheduler, got "
                f"{type(resolved).__name__}"
            )
        self._target = resolved
        return resolved

    def _step_of(self, target: Target) -> int:
        if isinstance(target, ELBOLoss):
            return int(target.current_step)
        return target.last_step

    def _beta_of(self, target: Target) -> Union[float, torch.Tensor]:
        if isinstance(target, ELBOLoss) and isinstance(target.schedule, KLController):
            return target.schedule.beta  # a tensor: logged without a sync
        return float(target.beta)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # An ELBOLoss updates its KLController inside the batch's forward:
        # the beta the batch uses is the one before it.
        self._batch_beta = self._beta_of(self.target(pl_module))

    # ---- hooks ------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self.target(pl_module)
        if self.restart_on_collapse and not isinstance(target.schedule, Cyclical):
            raise TypeError(
                "restart_on_collapse restarts the cycle of a klanneal.schedules.Cyclical; the "
                f"target's schedule is {target.schedule!r}"
            )
        if self._pending_state is not None:
            self._restore(target, self._pending_state)
            self._pending_state = None
        if self._global_step is None or not self._loaded:
            # Lightning restores trainer.global_step after on_fit_start: a
            # loaded checkpoint's global_step stands.
            self._global_step = trainer.global_step
        self._loaded = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        schedule = self.target(pl_module).schedule
        try:
            planned = planned_steps(trainer)
        except ValueError:  # an open-ended run: no length to compare with
            return
        problem = length_mismatch(schedule, planned)
        if problem is not None:
            warnings.warn(
                f"KLAnnealing: the schedule {schedule!r} does not fit the run: {problem}. Size "
                "it from the trainer (Cyclical.for_trainer(self.trainer, ...) in "
                "configure_optimizers, or total_steps=trainer.estimated_stepping_batches)",
                ScheduleLengthWarning,
                stacklevel=2,
            )

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        target = self.target(pl_module)
        # The optimizer step (if this batch ended an accumulation window) has
        # already run, but the target has not moved: this is the batch's beta.
        beta = self._batch_beta if self._batch_beta is not None else self._beta_of(target)
        self._batch_beta = None
        pl_module.log(f"{self.prefix}beta", beta, on_step=True, batch_size=1)
        elbo = outputs.get("elbo") if isinstance(outputs, Mapping) else None
        monitored = False
        if isinstance(elbo, ELBOOutput):
            for name in ("recon", "kl"):
                value = getattr(elbo, name).detach()
                pl_module.log(
                    f"{self.prefix}{name}", value.float().mean(), on_step=True, batch_size=1
                )
            monitored = self._feed(target, elbo, outputs)
        if self._global_step is None:
            self._global_step = trainer.global_step
        for _ in range(trainer.global_step - self._global_step):
            target.step()
        self._global_step = trainer.global_step
        if monitored:
            assert self.monitor is not None
            units = self.monitor.active_units.float()
            pl_module.log(f"{self.prefix}active_units", units, on_step=True, batch_size=1)
            self._monitored_batches += 1
            if self._monitored_batches % max(1, getattr(trainer, "log_every_n_steps", 50)) == 0:
                self._inspect(trainer, pl_module, target)

    def _feed(self, target: Target, elbo: ELBOOutput, outputs: Mapping[str, Any]) -> bool:
        """A BetaScheduler's KLController and the monitor get the batch (True: monitored)."""
        if isinstance(target, BetaScheduler) and isinstance(target.schedule, KLController):
            target.schedule.update(elbo.kl_per_dim.detach().sum())
        if self.monitor is None:
            return False
        mu = outputs.get("mu")
        self.monitor.update(elbo.kl_per_dim, mu if isinstance(mu, torch.Tensor) else None)
        return True

    def _inspect(self, trainer: Trainer, pl_module: LightningModule, target: Target) -> None:
        """The KL per dimension to the loggers, and the collapse check (a sync)."""
        assert self.monitor is not None
        kl_per_dim = self.monitor.kl_per_dim
        for logger in trainer.loggers:
            add_histogram = getattr(getattr(logger, "experiment", None), "add_histogram", None)
            if callable(add_histogram):
                add_histogram(f"{self.prefix}kl_per_dim", kl_per_dim.cpu(), trainer.global_step)
        if self.log_kl_per_dim:
            for d, value in enumerate(kl_per_dim.tolist()):
                pl_module.log(f"{self.prefix}kl_dim_{d}", value, on_step=True, batch_size=1)
        summary = self.monitor.summary()
        if not summary["collapsed"]:
            return
        if not self._warned_collapse:
            self._warned_collapse = True
            advice = (
                "restarting the current cycle (restart_on_collapse)"
                if self.restart_on_collapse
                else "consider restart_on_collapse=True with a Cyclical schedule, a "
                "klanneal.schedules.KLController, or free bits"
            )
            warnings.warn(
                f"KLAnnealing: posterior collapse at step {trainer.global_step}: "
                f"{summary['reason']} (beta {float(self._beta_of(target)):.4g}); {advice} "
                "(warned once)",
                CollapseWarning,
                stacklevel=2,
            )
        if self.restart_on_collapse:
            self._restart_cycle(target)
            self.monitor.reset_counters()

    def _restart_cycle(self, target: Target) -> None:
        """Moves the target to the first step of its Cyclical schedule's current cycle."""
        schedule = target.schedule
        assert isinstance(schedule, Cyclical)
        total, cycles = schedule.total_steps, schedule.n_cycles
        cycle = min(self._step_of(target) * cycles // total, cycles - 1)
        first = -((-cycle * total) // cycles)  # ceil(cycle * total / cycles), as Cyclical counts
        if isinstance(target, ELBOLoss):
            target.set_step(first)
        else:
            target.last_step, target.beta = first, schedule(first)
        self.cycle_restarts += 1

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.stats.reset()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(outputs, Mapping):
            return
        if "mu" in outputs and "logvar" in outputs:
            self.stats.update(
                outputs["mu"],
                outputs["logvar"],
                outputs.get("prior_mu"),
                outputs.get("prior_logvar"),
            )

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.stats.n == 0:
            return
        summary = self.stats.compute()
        self.posterior_summary = summary
        scalars = {
            "val_active_units": float(summary["active_units"]),
            "val_mutual_information": summary["mutual_information"],
            "val_kl": summary["kl"],
            "val_n_collapsed": float(summary["n_collapsed"]),
        }
        if self.log_kl_per_dim:
            for d, value in enumerate(summary["kl_per_dim"].tolist()):
                scalars[f"val_kl_dim_{d}"] = value
        for name, value in scalars.items():
            pl_module.log(f"{self.prefix}{name}", value, on_epoch=True, batch_size=1)

    # ---- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``{"global_step", "step"}``, plus ``"scheduler"`` for a BetaScheduler: plain Python."""
        if self._target is None:  # not resolved yet: what was loaded, if anything
            return dict(self._pending_state or {"global_step": self._global_step})
        state: dict[str, Any] = {
            "global_step": self._global_step,
            "step": self._step_of(self._target),
        }
        if isinstance(self._target, BetaScheduler):
            state["scheduler"] = self._target.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (for a target named by attribute, at fit start)."""
        self._global_step = state_dict.get("global_step")
        self._loaded = True
        if self._target is None:
            self._pending_state = dict(state_dict)
        else:
            self._restore(self._target, state_dict)

    def _restore(self, target: Target, state: dict[str, Any]) -> None:
        if "step" not in state:
            return
        if isinstance(target, BetaScheduler):
            if "scheduler" not in state:
                raise ValueError(
                    "KLAnnealing: the checkpoint's callback state was saved with an ELBOLoss "
                    "target (no 'scheduler' entry) and cannot restore a BetaScheduler; use "
                    "the same kind of target as when it was saved"
                )
            target.load_state_dict(state["scheduler"])
        else:
            target.set_step(int(state["step"]))
