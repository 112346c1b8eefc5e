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
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        **{"enable_checkpointing": False, "limit_val_batches": 0, **kwargs},
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
