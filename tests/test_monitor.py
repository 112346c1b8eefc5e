"""klanneal.metrics.CollapseMonitor: KL per dimension, active units and collapse over training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import klanneal
import klanneal._monitor
from klanneal.metrics import CollapseMonitor, active_units


def _batches(n, b=16, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([2.0, 0.5, 0.05, 0.0])[:d]  # two active, two not
    for _ in range(n):
        mu = torch.randn(b, d, generator=g) * scales
        logvar = torch.randn(b, d, generator=g) * 0.1 - 0.5
        kl = (-0.5 * (1 + logvar - mu**2 - logvar.exp())).mean(0)
        yield kl, mu


def test_the_thresholds_are_the_metrics_ones():
    assert klanneal._monitor._ACTIVE_UNIT_THRESHOLD == klanneal.metrics.ACTIVE_UNIT_THRESHOLD
    assert klanneal._monitor._COLLAPSE_THRESHOLD == klanneal.metrics.COLLAPSE_THRESHOLD


def test_the_kl_per_dimension_is_the_stated_moving_average():
    # Transcription of the docstring: m_n = m_{n-1} + w_n (x_n - m_{n-1}),
    # w_n = max(1 / n, 1 - decay): the mean of the first 1/(1 - decay), then an EMA.
    decay, batches = 0.9, list(_batches(40))
    monitor = CollapseMonitor(decay=decay)
    expected = np.zeros(4)
    for n, (kl, mu) in enumerate(batches, 1):
        monitor.update(kl, mu)
        expected = expected + max(1.0 / n, 1.0 - decay) * (kl.double().numpy() - expected)
        np.testing.assert_allclose(monitor.kl_per_dim.numpy(), expected, rtol=1e-12)
    assert float(monitor.kl) == pytest.approx(expected.sum(), rel=1e-12)
    assert monitor.kl_per_dim.dtype == torch.float64 and monitor.updates == 40


def test_active_units_of_one_batch_are_burdas():
    # decay = 0: the last batch alone, Cov_x(E_q[z|x]) over its rows > 0.01.
    for kl, mu in _batches(5, seed=1):
        monitor = CollapseMonitor(decay=0.0)
        monitor.update(kl, mu)
        assert int(monitor.active_units) == active_units(mu) == 2


def test_active_units_pool_the_batches_while_the_average_is_a_plain_mean():
    # With 1 / n >= 1 - decay for every update the averages are plain means,
    # so the pooled variance is the variance over all the rows seen.
    batches = list(_batches(8, b=5, seed=2))
    monitor = CollapseMonitor(decay=0.99)
    for kl, mu in batches:
        monitor.update(kl, mu)
    rows = torch.cat([mu for _, mu in batches])
    assert int(monitor.active_units) == active_units(rows)
    variance = rows.double().var(0, correction=0)
    assert variance[2] < 0.01 < variance[1]  # the threshold separates them


def test_without_mu_the_active_units_are_the_dimensions_with_kl():
    monitor = CollapseMonitor()
    monitor.update(torch.tensor([0.5, 0.011, 0.009, 0.0]))
    assert int(monitor.active_units) == 2 and monitor.uses_mu is False


def test_collapse_needs_patience_consecutive_updates_and_clears():
    monitor = CollapseMonitor(decay=0.0, patience=3)
    dead, alive = torch.zeros(4), torch.tensor([1.0, 0.0, 0.0, 0.0])
    for expected in (False, False, True, True):
        monitor.update(dead)
        assert bool(monitor.collapsed) is expected
    summary = monitor.summary()
    assert summary["steps_without_active_units"] == summary["steps_with_low_kl"] == 4
    assert summary["reason"] == (
        "no active unit for the last 4 batches; the KL per example (EMA 0 nats) below "
        "0.04 for the last 4 batches"
    )
    monitor.update(alive)  # both conditions stop holding: the counters restart
    assert not bool(monitor.collapsed) and monitor.summary()["reason"] is None
    monitor.update(dead)
    monitor.update(dead)
    assert not bool(monitor.collapsed)
    monitor.reset_counters()
    assert monitor.summary()["steps_without_active_units"] == 0


def test_the_kl_threshold_default_and_override():
    # Default: collapse_threshold (0.01 nats) per dimension; an explicit one in nats.
    low = torch.tensor([0.5, 0.5, 0.0, 0.0])  # 1 nat in all, two units active
    monitor = CollapseMonitor(decay=0.0, patience=1, kl_threshold=2.0)
    monitor.update(low)
    summary = monitor.summary()
    assert summary["collapsed"] and summary["steps_without_active_units"] == 0
    assert summary["kl_threshold"] == 2.0
    default = CollapseMonitor(patience=1)
    default.update(low)
    assert default.summary()["kl_threshold"] == pytest.approx(0.04)
    assert not default.summary()["collapsed"]


def test_reset_forgets_everything():
    monitor = CollapseMonitor()
    monitor.update(torch.ones(3), torch.randn(4, 3))
    monitor.reset()
    assert monitor.updates == 0 and monitor.uses_mu is None
    monitor.update(torch.ones(5))  # another D, now without mu
    assert monitor.kl_per_dim.shape == (5,)


def test_the_op_outputs_feed_it():
    g = torch.Generator().manual_seed(3)
    logits, target = torch.randn(8, 6, generator=g), torch.randint(0, 6, (8,), generator=g)
    mu, logvar = torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g)
    out = klanneal.elbo_loss(logits, target, mu, logvar, 0.5)
    monitor = CollapseMonitor()
    monitor.update(out.kl_per_dim, mu)
    assert float(monitor.kl) == pytest.approx(float(out.kl), rel=1e-6)


@pytest.mark.cuda
def test_on_cuda_an_update_does_not_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monitor = CollapseMonitor(patience=2)
    batches = [(kl.cuda(), mu.cuda()) for kl, mu in _batches(4)]
    monitor.update(*batches[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kl, mu in batches[1:]:
            monitor.update(kl, mu)
            monitor.collapsed  # noqa: B018 - a tensor: reading the flag's value is what syncs
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(monitor.active_units) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"decay": 1.0}, ValueError, "decay must be in [0, 1)"),
        ({"decay": -0.1}, ValueError, "decay must be finite and >= 0"),
        ({"decay": "0.9"}, TypeError, "decay must be a real number"),
        ({"patience": 0}, ValueError, "patience must be >= 1"),
        ({"patience": 2.0}, TypeError, "patience must be an integer"),
        ({"kl_threshold": float("nan")}, ValueError, "kl_threshold must be finite and >= 0"),
        ({"active_threshold": True}, TypeError, "active_threshold must be a real number"),
    ],
)
def test_bad_arguments_raise(kwargs, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)):
        CollapseMonitor(**kwargs)


def test_bad_updates_raise():
    monitor = CollapseMonitor()
    with pytest.raises(RuntimeError, match="no batch yet"):
        monitor.summary()
    with pytest.raises(TypeError, match="kl_per_dim must be a floating-point tensor"):
        monitor.update([0.1, 0.2])
    with pytest.raises(ValueError, match=re.escape("kl_per_dim must be 1-D [D]")):
        monitor.update(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="mu must be a floating-point tensor"):
        monitor.update(torch.zeros(3), torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=re.escape("mu must be [B, D] with B >= 1 and D = 3")):
        monitor.update(torch.zeros(3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mu is on meta but kl_per_dim is on cpu"):
        monitor.update(torch.zeros(3), torch.zeros(4, 3, device="meta"))
    monitor.update(torch.zeros(3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="the monitor has seen D=3"):
        monitor.update(torch.zeros(4))
    with pytest.raises(ValueError, match="pass mu always or never"):
        monitor.update(torch.zeros(3))
