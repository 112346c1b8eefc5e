"""klanneal.integrations.lightning.KLAnnealing: stepping, accumulation, logging, resume."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.loggers import Logger  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import klanneal  # noqa: E402
from klanneal.integrations.lightning import KLAnnealing  # noqa: E402
from klanneal.metrics import PosteriorStats  # noqa: E402
from klanneal.schedules import BetaScheduler, Cyclical, Monotonic  # noqa: E402

pytestmark = [
    # A tiny CPU run: Lightning's advice (dataloader workers, logging
    # intervals, a validation_step without validation data) does not apply.
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    # Lightning 2.6 on torch 2.13 uses a deprecated torch pytree API.
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated"),
    # Most tests size their schedules apart from the trainer's steps on
    # purpose; the length warnings have tests of their own (pytest.warns).
    pytest.mark.filterwarnings("ignore::klanneal.schedules.ScheduleLengthWarning"),
]

D, X = 3, 5


class RecordingLogger(Logger):
    """Keeps every (step, name, value) Lightning writes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.records += [(step, name, float(value)) for name, value in metrics.items()]

    def series(self, name: str) -> list[tuple[int, float]]:
        return [(step, value) for step, key, value in self.records if key == name]


class TinyVAE(pl.LightningModule):
    """A linear Gaussian VAE; `beta_source` is "criterion" (an ELBOLoss) or "scheduler"."""

    def __init__(self, beta_source: str, schedule) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = torch.nn.Linear(X, 2 * D, dtype=torch.float64)
        self.decoder = torch.nn.Linear(D, X, dtype=torch.float64)
        self.beta_source = beta_source
        if beta_source == "criterion":
            self.criterion = klanneal.nn.ELBOLoss(schedule, likelihood="mse")
        else:
            self.scheduler = BetaScheduler(schedule)
        self.betas_used: list[float] = []

    def _forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decoder(z), mu, logvar

    def training_step(self, batch, batch_idx):
        (x,) = batch
        recon, mu, logvar = self._forward(x)
        if self.beta_source == "criterion":
            out = self.criterion(recon, x, mu, logvar)
        else:
            out = klanneal.elbo_loss(recon, x, mu, logvar, self.scheduler.beta, likelihood="mse")
        self.betas_used.append(float(out.beta))
        return {"loss": out.loss, "elbo": out}

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        _, mu, logvar = self._forward(x)
        return {"mu": mu, "logvar": logvar}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _data(n: int = 64, batch_size: int = 4) -> DataLoader:
    x = torch.randn(n, X, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return DataLoader(TensorDataset(x), batch_size=batch_size)


def _trainer(max_steps: int, logger=None, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger if logger is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{
            "enable_checkpointing": False,
            "limit_val_batches": 0,
            "log_every_n_steps": 1,
            **kwargs,
        },
    )


SCHEDULE = Cyclical(total_steps=8, n_cycles=2, ratio=0.5)  # 0, .5, 1, 1, 0, .5, 1, 1, 1, ...


@pytest.mark.parametrize("target", ["criterion", "scheduler"])
def test_steps_once_per_optimizer_step_with_gradient_accumulation(target):
    model, logger = TinyVAE(target, SCHEDULE), RecordingLogger()
    callback = KLAnnealing(target)
    trainer = _trainer(6, logger, callbacks=[callback], accumulate_grad_batches=3)
    trainer.fit(model, _data(n=72))  # 18 batches: 6 whole accumulation windows
    assert trainer.global_step == 6
    # Three batches per optimizer step, each weighted by schedule(step).
    assert model.betas_used == [SCHEDULE(k) for k in range(6) for _ in range(3)]
    assert logger.series("klanneal/beta") == [(k, SCHEDULE(k)) for k in range(6)]
    beta_target = model.criterion if target == "criterion" else model.scheduler
    assert beta_target.beta == SCHEDULE(6)
    recon, kl = logger.series("klanneal/recon"), logger.series("klanneal/kl")
    assert [step for step, _ in recon] == [step for step, _ in kl] == list(range(6))
    assert all(value > 0 for _, value in recon + kl)


@pytest.mark.parametrize("target", ["criterion", "scheduler"])
def test_resume_from_a_checkpoint_continues_the_beta_sequence(target, tmp_path):
    schedule = Monotonic(warmup_steps=10)
    full = TinyVAE(target, schedule)
    _trainer(9, callbacks=[KLAnnealing(target)], accumulate_grad_batches=2).fit(full, _data())

    first = TinyVAE(target, schedule)
    trainer = _trainer(4, callbacks=[KLAnnealing(target)], accumulate_grad_batches=2)
    trainer.fit(first, _data())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = TinyVAE(target, schedule)  # fresh model and beta state at step 0
    callback = KLAnnealing(target)
    trainer = _trainer(9, callbacks=[callback], accumulate_grad_batches=2)
    trainer.fit(resumed, _data(), ckpt_path=ckpt)
    assert first.betas_used + resumed.betas_used == full.betas_used
    assert callback.state_dict()["step"] == 9
    if target == "scheduler":
        assert callback.state_dict()["scheduler"]["last_step"] == 9


def test_the_callback_state_holds_the_scheduler_step():
    scheduler = BetaScheduler(SCHEDULE)
    callback = KLAnnealing(scheduler)
    model = TinyVAE("scheduler", SCHEDULE)
    model.scheduler = scheduler
    _trainer(5, callbacks=[callback]).fit(model, _data())
    state = callback.state_dict()
    assert state == {"global_step": 5, "step": 5, "scheduler": scheduler.state_dict()}
    other = BetaScheduler(SCHEDULE)
    KLAnnealing(other).load_state_dict(state)
    assert other.last_step == 5 and other.beta == SCHEDULE(5)


def test_validation_logs_posterior_stats_of_the_whole_validation_set():
    model, logger = TinyVAE("criterion", SCHEDULE), RecordingLogger()
    callback = KLAnnealing("criterion", log_kl_per_dim=True, stats=PosteriorStats(mi_points=16))
    val = _data(n=37, batch_size=5)
    trainer = _trainer(8, logger, callbacks=[callback], limit_val_batches=1.0, val_check_interval=4)
    trainer.fit(model, _data(), val)
    summary = callback.posterior_summary
    assert summary is not None and summary["n"] == 37 and summary["mi_sample_size"] == 16
    # Recompute from the final model on the same data (the last validation ran at step 8).
    torch.manual_seed(0)
    with torch.no_grad():
        mu, logvar = model.encoder(val.dataset.tensors[0]).chunk(2, dim=1)
    torch.testing.assert_close(
        summary["kl_per_dim"], (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean(0)
    )
    assert summary["active_units"] == klanneal.metrics.active_units(mu)
    logged = dict((name, value) for _, name, value in logger.records)
    assert logged["klanneal/val_active_units"] == summary["active_units"]
    assert logged["klanneal/val_mutual_information"] == pytest.approx(summary["mutual_information"])
    assert logged["klanneal/val_kl"] == pytest.approx(summary["kl"])
    assert logged["klanneal/val_n_collapsed"] == summary["n_collapsed"]
    for d in range(D):
        assert logged[f"klanneal/val_kl_dim_{d}"] == pytest.approx(float(summary["kl_per_dim"][d]))
    assert len(logger.series("klanneal/val_kl")) == 2  # steps 4 and 8, not the sanity check


def test_bad_targets_raise():
    with pytest.raises(TypeError, match="target must be a klanneal.nn.ELBOLoss"):
        KLAnnealing(SCHEDULE)
    with pytest.raises(TypeError, match="stats must be a klanneal.metrics.PosteriorStats"):
        KLAnnealing("criterion", stats={})
    model = TinyVAE("criterion", SCHEDULE)
    with pytest.raises(TypeError, match="attribute 'encoder' must be a klanneal.nn.ELBOLoss"):
        _trainer(1, callbacks=[KLAnnealing("encoder")]).fit(model, _data())
    with pytest.raises(RuntimeError, match="looked up on the LightningModule at fit start"):
        KLAnnealing("criterion").target()


@pytest.mark.parametrize("target", ["criterion", "scheduler"])
def test_a_callback_reused_by_a_new_trainer_steps_every_optimizer_step(target):
    # Regression: the second Trainer counted from the first one's last
    # global_step, so its first optimizer step did not advance the target.
    model, callback = TinyVAE(target, SCHEDULE), KLAnnealing(target)
    _trainer(5, callbacks=[callback]).fit(model, _data())
    _trainer(5, callbacks=[callback]).fit(model, _data())
    beta_target = model.criterion if target == "criterion" else model.scheduler
    assert callback.state_dict()["step"] == 10
    assert model.betas_used == [SCHEDULE(k) for k in range(10)]
    assert beta_target.beta == SCHEDULE(10)


def test_a_checkpoint_of_another_kind_of_target_raises_clearly():
    # Was a KeyError on state["scheduler"].
    state = {"global_step": 5, "step": 5}  # what an ELBOLoss target saves
    with pytest.raises(ValueError, match="saved with an ELBOLoss target"):
        KLAnnealing(BetaScheduler(SCHEDULE)).load_state_dict(state)


@pytest.mark.parametrize("target", ["criterion", "scheduler"])
def test_an_array_schedule_steps_like_any_other(target):
    # The authors' beta sequence as an array (FromArray), offset by one step
    # (incremented before use), stepped by the callback.
    values = klanneal.schedules.frange_cycle_linear(12, 0.1, 1.0, 2, 0.45)
    schedule = klanneal.schedules.FromArray(values).offset(1)
    model, logger = TinyVAE(target, schedule), RecordingLogger()
    _trainer(6, logger, callbacks=[KLAnnealing(target)]).fit(model, _data(n=24))
    assert model.betas_used == pytest.approx(values[1:7].tolist(), rel=1e-7)
    assert KLAnnealing(values.tolist()).target().schedule == klanneal.schedules.FromArray(values)


# ---- a KL controller, the collapse monitor, schedules sized from the trainer ----------------


class DeterministicVAE(TinyVAE):
    """TinyVAE with z = mu: its KLs, and so a controller's betas, depend only on
    the weights and the data (a resumed run repeats them exactly)."""

    def _forward(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return self.decoder(mu), mu, logvar


def _controller():
    return klanneal.schedules.KLController(0.3, kp=0.2, ki=0.05)


def _same_batches() -> DataLoader:
    # Every batch the same rows: Lightning restarts a resumed epoch's
    # dataloader from its start, which then changes nothing.
    x = torch.randn(4, X, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    return DataLoader(TensorDataset(x.repeat(8, 1)), batch_size=4)


def test_a_controller_in_the_loss_is_fed_every_batch_and_resumes_bit_for_bit(tmp_path):
    full, logger = DeterministicVAE("criterion", _controller()), RecordingLogger()
    _trainer(8, logger, callbacks=[KLAnnealing("criterion")]).fit(full, _same_batches())
    assert int(full.criterion.schedule.updates) == 8
    assert len(set(full.betas_used)) > 4  # beta follows the KL
    logged = [value for _, value in logger.series("klanneal/beta")]
    assert logged == pytest.approx(full.betas_used, rel=1e-6)

    first = DeterministicVAE("criterion", _controller())
    trainer = _trainer(4, callbacks=[KLAnnealing("criterion")])
    trainer.fit(first, _same_batches())
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = DeterministicVAE("criterion", _controller())  # a fresh controller
    trainer = _trainer(8, callbacks=[KLAnnealing("criterion")])
    trainer.fit(resumed, _same_batches(), ckpt_path=ckpt)
    assert first.betas_used + resumed.betas_used == full.betas_used  # bit for bit


def test_a_beta_scheduler_controller_is_fed_the_kl_by_the_callback():
    ctrl = _controller()
    model = DeterministicVAE("scheduler", ctrl)
    _trainer(6, callbacks=[KLAnnealing("scheduler")], accumulate_grad_batches=2).fit(model, _data())
    assert int(ctrl.updates) == 12  # every batch, not every optimizer step
    assert model.scheduler.beta == float(ctrl.beta) > 0.0
    # The beta changes only at optimizer steps: each accumulation window's two batches agree.
    assert model.betas_used[0::2] == model.betas_used[1::2]


class HistogramLogger(RecordingLogger):
    """A logger whose experiment takes histograms, as TensorBoard's SummaryWriter does."""

    def __init__(self) -> None:
        super().__init__()
        self.histograms: list[tuple[str, list[float], int]] = []

    @property
    def experiment(self):
        logger = self

        class Experiment:
            def add_histogram(self, tag, values, step):
                logger.histograms.append((tag, values.tolist(), step))

        return Experiment()


def test_the_monitor_logs_active_units_and_kl_per_dimension_histograms():
    model, logger = TinyVAE("criterion", SCHEDULE), HistogramLogger()
    callback = KLAnnealing("criterion", log_kl_per_dim=True)
    _trainer(6, logger, callbacks=[callback], log_every_n_steps=2).fit(model, _data())
    # Written at Lightning's logging interval, after steps 2, 4 and 6.
    assert [step for step, _ in logger.series("klanneal/active_units")] == [1, 3, 5]
    assert all(0 <= value <= D for _, value in logger.series("klanneal/active_units"))
    assert [(tag, step) for tag, _, step in logger.histograms] == [
        ("klanneal/kl_per_dim", 2), ("klanneal/kl_per_dim", 4), ("klanneal/kl_per_dim", 6),
    ]  # fmt: skip
    assert logger.histograms[-1][1] == pytest.approx(callback.monitor.kl_per_dim.tolist())
    assert len(logger.series("klanneal/kl_dim_0")) == 3


def test_a_collapse_warns_once():
    # A threshold no KL reaches: collapsed from the first check on.
    monitor = klanneal.metrics.CollapseMonitor(patience=2, kl_threshold=1e9)
    model = TinyVAE("criterion", SCHEDULE)
    with pytest.warns(klanneal.metrics.CollapseWarning) as record:
        _trainer(6, callbacks=[KLAnnealing("criterion", monitor=monitor)]).fit(model, _data())
    messages = [str(w.message) for w in record if w.category is klanneal.metrics.CollapseWarning]
    assert len(messages) == 1
    assert "posterior collapse at step 2: the KL per example" in messages[0]
    assert "restart_on_collapse=True" in messages[0]


@pytest.mark.parametrize("target", ["criterion", "scheduler"])
@pytest.mark.filterwarnings("ignore::klanneal.metrics.CollapseWarning")
def test_restart_on_collapse_restarts_the_current_cycle(target):
    monitor = klanneal.metrics.CollapseMonitor(patience=3, kl_threshold=1e9)
    callback = KLAnnealing(target, monitor=monitor, restart_on_collapse=True)
    model = TinyVAE(target, SCHEDULE)  # cycles of 4 steps: 0, .5, 1, 1
    _trainer(8, callbacks=[callback]).fit(model, _data())
    # Collapsed after every third batch: back to the first step of the cycle.
    assert model.betas_used == [SCHEDULE(k) for k in (0, 1, 2, 0, 1, 2, 0, 1)]
    assert callback.cycle_restarts == 2


def test_restart_in_a_later_cycle_goes_to_that_cycles_first_step():
    monitor = klanneal.metrics.CollapseMonitor(patience=6, kl_threshold=1e9)
    callback = KLAnnealing("criterion", monitor=monitor, restart_on_collapse=True)
    model = TinyVAE("criterion", SCHEDULE)
    with pytest.warns(klanneal.metrics.CollapseWarning, match="restarting the current cycle"):
        _trainer(8, callbacks=[callback]).fit(model, _data())
    # After 6 batches (step 6, in the cycle starting at step 4): back to step 4.
    assert model.betas_used == [SCHEDULE(k) for k in (0, 1, 2, 3, 4, 5, 4, 5)]


def test_monitor_options_are_checked():
    with pytest.raises(TypeError, match="monitor must be a klanneal.metrics.CollapseMonitor"):
        KLAnnealing("criterion", monitor="yes")
    with pytest.raises(ValueError, match="restart_on_collapse needs the collapse monitor"):
        KLAnnealing("criterion", monitor=False, restart_on_collapse=True)
    model = TinyVAE("criterion", Monotonic(warmup_steps=10))
    with pytest.raises(TypeError, match="restart_on_collapse restarts the cycle of a"):
        _trainer(1, callbacks=[KLAnnealing("criterion", restart_on_collapse=True)]).fit(
            model, _data()
        )
    # monitor=False: no monitor, nothing logged from it.
    model, logger = TinyVAE("criterion", SCHEDULE), RecordingLogger()
    _trainer(2, logger, callbacks=[KLAnnealing("criterion", monitor=False)]).fit(model, _data())
    assert logger.series("klanneal/active_units") == []


@pytest.mark.parametrize(
    ("schedule", "steps", "fragment"),
    [
        (SCHEDULE, 6, "only 1.50 of its 2 cycles fit in the 6 optimizer steps the trainer plans"),
        (SCHEDULE, 12, "its 2 cycles end at step 8 and beta holds stop=1.0 for the last 4 of"),
        (Monotonic(warmup_steps=10), 6, "beta would never reach its final value: it gets there"),
        (
            klanneal.schedules.FromArray([0.0, 0.5, 1.0]),
            6,
            "its table of 3 values is indexed by the 6 optimizer steps",
        ),
    ],
)
def test_a_schedule_that_does_not_fit_the_trainer_warns(schedule, steps, fragment):
    model = TinyVAE("criterion", schedule)
    with pytest.warns(klanneal.schedules.ScheduleLengthWarning) as record:
        _trainer(steps, callbacks=[KLAnnealing("criterion", monitor=False)]).fit(model, _data())
    messages = [str(w.message) for w in record if "KLAnnealing" in str(w.message)]
    assert len(messages) == 1 and fragment in messages[0]
    assert "Cyclical.for_trainer" in messages[0]


class SizedVAE(TinyVAE):
    """Sizes its cyclical schedule from the trainer when the fit starts."""

    def configure_optimizers(self):
        self.criterion.schedule = Cyclical.for_trainer(self.trainer, n_cycles=2, ratio=0.5)
        return super().configure_optimizers()


def test_for_trainer_sizes_the_schedule_to_the_planned_optimizer_steps():
    import warnings

    model = SizedVAE("criterion", 1.0)
    trainer = _trainer(-1, max_epochs=2, accumulate_grad_batches=2)
    trainer.callbacks.append(KLAnnealing("criterion", monitor=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", klanneal.schedules.ScheduleLengthWarning)
        trainer.fit(model, _data())  # 2 epochs of 16 batches, 2 per optimizer step
    assert model.criterion.schedule.total_steps == trainer.global_step == 16
    assert model.betas_used[::2] == [Cyclical(16, 2, 0.5)(k) for k in range(16)]
