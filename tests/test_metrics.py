"""klanneal.metrics: active units, I(x; z), streaming PosteriorStats vs the concatenated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from klanneal import metrics
from klanneal.metrics import PosteriorStats, active_units, mutual_information


def _posterior(n: int, d: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # Some dimensions used (means spread over the data), some collapsed.
    scale = torch.tensor([2.0, 0.5, 0.2, 1e-3] * d)[:d]
    mu = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    logvar = torch.randn(n, d, generator=g, dtype=torch.float64) * 0.3 - 1.0
    return mu.to(dtype), logvar.to(dtype)


def _batches(n: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes = [0, 1]
    while sum(sizes) < n:
        sizes.append(int(rng.integers(1, 40)))
    sizes[-1] -= sum(sizes) - n
    return sizes


def _stream(stats: PosteriorStats, mu, logvar, sizes, prior_mu=None, prior_logvar=None):
    start = 0
    for size in sizes:
        end = start + size
        pm = prior_mu[start:end] if prior_mu is not None and prior_mu.dim() == 2 else prior_mu
        pv = (
            prior_logvar[start:end]
            if prior_logvar is not None and prior_logvar.dim() == 2
            else prior_logvar
        )
        stats.update(mu[start:end], logvar[start:end], pm, pv)
        start = end
    assert start == mu.shape[0]


def _mi_direct(mu, logvar, noise):
    """The estimator written out with numpy, one data point at a time."""
    mu, logvar, noise = (t.numpy().astype(np.float64) for t in (mu, logvar, noise))
    n, d = mu.shape
    var = np.exp(logvar)
    z = mu + np.sqrt(var) * noise
    terms = []
    for i in range(n):
        log_q = -0.5 * (((z[i] - mu) ** 2 / var).sum(1) + logvar.sum(1) + d * np.log(2 * np.pi))
        peak = log_q.max()
        log_aggregate = peak + np.log(np.exp(log_q - peak).sum()) - np.log(n)
        terms.append(log_q[i] - log_aggregate)
    return float(np.mean(terms))


# ---- active_units ------------------------------------------------------------------


def test_active_units_counts_dimensions_by_variance_of_the_means():
    mu, _ = _posterior(500, 9)
    variance = [float(np.var(mu[:, k].numpy())) for k in range(9)]
    for threshold in (0.0, 1e-5, 0.01, 0.2, 10.0):
        assert active_units(mu, threshold) == sum(v > threshold for v in variance)
    assert active_units(mu) == 7  # scales 2, 0.5, 0.2 used; 1e-3 not
    assert active_units(mu.to(torch.float32)) == 7
    assert active_units(mu[:1]) == 0


# ---- mutual_information -----------------------------------------------------------


@pytest.mark.parametrize("n,d,chunk", [(1, 3, None), (37, 4, None), (60, 5, 700)])
def test_mutual_information_matches_a_direct_computation(n, d, chunk, monkeypatch):
    if chunk is not None:  # several chunks of rows, one odd-sized
        monkeypatch.setattr(metrics, "_PAIRWISE_CHUNK", chunk)
    mu, logvar = _posterior(n, d, seed=n)
    got = mutual_information(mu, logvar, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(mu.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert got == pytest.approx(_mi_direct(mu, logvar, noise), rel=1e-12, abs=1e-12)
    if n == 1:
        assert got == 0.0


def test_mutual_information_averages_several_samples_per_point():
    mu, logvar = _posterior(25, 3)
    got = mutual_information(
        mu, logvar, samples_per_point=3, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    draws = [torch.randn(mu.shape, generator=g, dtype=torch.float64) for _ in range(3)]
    want = np.mean([_mi_direct(mu, logvar, noise) for noise in draws])
    assert got == pytest.approx(want, rel=1e-12)


def test_mutual_information_limits():
    n = 64
    # A code that ignores x: every posterior the same, so I = 0 exactly.
    same = torch.full((n, 3), 0.7, dtype=torch.float64)
    assert mutual_information(same, same - 1.0) == pytest.approx(0.0, abs=1e-12)
    # Posteriors that never overlap identify x: I = log N, the estimator's bound.
    apart = torch.arange(n, dtype=torch.float64).unsqueeze(1) * 100.0
    assert mutual_information(apart, torch.full_like(apart, -4.0)) == pytest.approx(math.log(n))


def test_mutual_information_of_a_gaussian_code_is_half_log_one_plus_snr():
    # x -> mu(x) ~ N(0, s^2), q(z|x) = N(mu(x), sigma^2): I = 0.5 log(1 + s^2/sigma^2) per dim.
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3000, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0])
    logvar = torch.zeros_like(mu)
    want = 0.5 * math.log(2.0) + 0.5 * math.log(5.0)
    got = mutual_information(mu, logvar, samples_per_point=2, generator=g)
    assert got == pytest.approx(want, abs=0.05)


# ---- PosteriorStats --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_posterior_stats_match_the_concatenated_data(dtype):
    n, d = 413, 7
    mu, logvar = _posterior(n, d, dtype=dtype)
    stats = PosteriorStats(mi_points=1000, seed=4)
    _stream(stats, mu, logvar, _batches(n))
    got = stats.compute()
    mu64, logvar64 = mu.to(torch.float64), logvar.to(torch.float64)
    assert got["n"] == n and got["mi_sample_size"] == n
    torch.testing.assert_close(got["mu_mean"], mu64.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        got["mu_covariance"], torch.cov(mu64.T, correction=0), rtol=1e-10, atol=1e-14
    )
    torch.testing.assert_close(
        got["mu_variance"], mu64.var(0, correction=0), rtol=1e-10, atol=1e-14
    )
    assert got["active_units"] == active_units(mu64) == 6
    kl = -0.5 * (1 + logvar64 - mu64**2 - logvar64.exp())
    torch.testing.assert_close(got["kl_per_dim"], kl.mean(0), rtol=1e-12, atol=1e-14)
    assert got["kl"] == pytest.approx(float(kl.sum(1).mean()), rel=1e-12)
    assert got["n_collapsed"] == int((kl.mean(0) < 0.01).sum())
    # Every row kept, in order: the MI is the estimate on all the data.
    want_mi = mutual_information(mu64, logvar64, generator=torch.Generator().manual_seed(4))
    assert got["mutual_information"] == want_mi
    assert stats.compute()["mutual_information"] == want_mi  # compute() is repeatable


def test_collapsed_dimensions_are_those_below_the_kl_threshold():
    n = 200
    mu, logvar = _posterior(n, 4)
    mu[:, 3], logvar[:, 3] = 0.0, 0.0  # q = p exactly: KL 0
    stats = PosteriorStats(collapse_threshold=0.05)
    stats.update(mu, logvar)
    got = stats.compute()
    kl = got["kl_per_dim"]
    assert got["n_collapsed"] == int((kl < 0.05).sum())
    assert kl[3] == 0.0
    strict = PosteriorStats(collapse_threshold=0.0)
    strict.update(mu, logvar)
    assert strict.compute()["n_collapsed"] == 0  # KL >= 0: nothing strictly below 0


@pytest.mark.parametrize("per_example", [False, True])
def test_posterior_stats_kl_against_a_gaussian_prior(per_example):
    n, d = 150, 5
    mu, logvar = _posterior(n, d)
    g = torch.Generator().manual_seed(9)
    shape = (n, d) if per_example else (d,)
    prior_mu = torch.randn(shape, generator=g, dtype=torch.float64)
    prior_logvar = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    stats = PosteriorStats()
    _stream(stats, mu, logvar, _batches(n, seed=2), prior_mu, prior_logvar)
    want = kl_divergence(
        Normal(mu, (0.5 * logvar).exp()),
        Normal(prior_mu.expand(n, d), (0.5 * prior_logvar).exp().expand(n, d)),
    ).mean(0)
    torch.testing.assert_close(stats.compute()["kl_per_dim"], want, rtol=1e-10, atol=1e-12)
    # Only one of the two given: the other is the standard normal's.
    only_mu = PosteriorStats()
    only_mu.update(mu, logvar, prior_mu=prior_mu)
    want = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(prior_mu.expand(n, d), 1.0))
    torch.testing.assert_close(
        only_mu.compute()["kl_per_dim"], want.mean(0), rtol=1e-10, atol=1e-12
    )


def test_covariance_merge_is_stable_far_from_zero():
    g = torch.Generator().manual_seed(0)
    mu = 1e6 + torch.randn(1000, 3, generator=g, dtype=torch.float64) * 1e-2
    stats = PosteriorStats()
    _stream(stats, mu, torch.zeros_like(mu), _batches(1000, seed=5))
    torch.testing.assert_close(
        stats.compute()["mu_variance"], mu.var(0, correction=0), rtol=1e-6, atol=0
    )


def test_reservoir_keeps_a_uniform_subsample_of_distinct_rows():
    n, size, runs = 300, 60, 120
    mu = torch.arange(n, dtype=torch.float64).unsqueeze(1).repeat(1, 2)  # row i holds i
    logvar = -mu
    counts = np.zeros(n)
    for seed in range(runs):
        stats = PosteriorStats(mi_points=size, seed=seed)
        _stream(stats, mu, logvar, _batches(n, seed=seed))
        kept_mu, kept_logvar = stats.subsample()
        rows = kept_mu[:, 0].long().numpy()
        assert kept_mu.shape == (size, 2) and len(set(rows)) == size
        torch.testing.assert_close(kept_logvar, -kept_mu)  # (mu, logvar) stay paired
        counts[rows] += 1
        if seed == 0:
            got = stats.compute()
            assert got["n"] == n and got["mi_sample_size"] == size
            g = torch.Generator().manual_seed(0)
            assert got["mutual_information"] == mutual_information(
                kept_mu, kept_logvar, generator=g
            )
    # Each row is kept with probability size / n = 0.2, 24 times in 120 runs
    # on average (binomial sd 4.4); thirds of the stream must agree, so the
    # first rows (which fill the reservoir) are not favoured.
    thirds = counts.reshape(3, -1).mean(1)
    np.testing.assert_allclose(thirds, runs * size / n, rtol=0.06)
    assert counts.min() > 8 and counts.max() < 42


def test_reset_and_determinism():
    mu, logvar = _posterior(300, 3)
    a, b = PosteriorStats(mi_points=50, seed=7), PosteriorStats(mi_points=50, seed=7)
    _stream(a, mu, logvar, _batches(300))
    _stream(b, mu, logvar, _batches(300))
    assert a.compute()["mutual_information"] == b.compute()["mutual_information"]
    a.reset()
    assert a.n == 0
    with pytest.raises(ValueError, match="no data: call update"):
        a.compute()
    a.update(mu[:10], logvar[:10])
    assert a.compute()["n"] == 10


# ---- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,error,fragment",
    [
        (lambda: active_units([[1.0]]), TypeError, "mu must be a torch.Tensor"),
        (lambda: active_units(torch.zeros(3)), ValueError, "mu must be a 2-D floating-point"),
        (
            lambda: active_units(torch.zeros(3, 2, dtype=torch.int64)),
            ValueError,
            "dtype torch.int64",
        ),
        (lambda: active_units(torch.zeros(0, 2)), ValueError, "mu is empty"),
        (lambda: active_units(torch.zeros(3, 2), threshold=-1), ValueError, "threshold must be"),
        (
            lambda: active_units(torch.zeros(3, 2), threshold="x"),
            TypeError,
            "threshold must be a real",
        ),
        (
            lambda: mutual_information(torch.zeros(3, 2), torch.zeros(3, 3)),
            ValueError,
            "same shape",
        ),
        (
            lambda: mutual_information(torch.zeros(3, 2), None),
            TypeError,
            "logvar must be a torch.Tensor",
        ),
        (
            lambda: mutual_information(torch.zeros(3, 2), torch.zeros(3, 2), samples_per_point=0),
            ValueError,
            "samples_per_point must be >= 1",
        ),
        (
            lambda: mutual_information(torch.zeros(3, 2), torch.zeros(3, 2), samples_per_point=1.5),
            TypeError,
            "samples_per_point must be an integer",
        ),
        (lambda: PosteriorStats(mi_points=0), ValueError, "mi_points must be >= 1"),
        (lambda: PosteriorStats(collapse_threshold=math.nan), ValueError, "collapse_threshold"),
        (lambda: PosteriorStats(seed=-1), ValueError, "seed must be >= 0"),
        # Accepted, then compute() failed with torch's overflow error.
        (lambda: PosteriorStats(seed=2**64), ValueError, "seed must be <= 18446744073709551615"),
        # A NaN dimension counted as neither active nor collapsed.
        (
            lambda: active_units(torch.tensor([[0.0, float("nan")], [1.0, 2.0]])),
            ValueError,
            "mu has NaN or infinite values",
        ),
        (
            lambda: PosteriorStats().update(torch.zeros(4, 2), torch.full((4, 2), float("inf"))),
            ValueError,
            "logvar has NaN or infinite values",
        ),
        (
            lambda: mutual_information(torch.full((3, 2), float("nan")), torch.zeros(3, 2)),
            ValueError,
            "mu has NaN or infinite values",
        ),
        (lambda: PosteriorStats().compute(), ValueError, "no data"),
        (lambda: PosteriorStats().subsample(), ValueError, "no data"),
        (
            lambda: PosteriorStats().update(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3)),
            ValueError,
            "prior_mu of shape (3,) does not broadcast",
        ),
        (
            lambda: PosteriorStats().update(torch.zeros(4, 2), torch.zeros(4, 2), None, 1.0),
            TypeError,
            "prior_logvar must be a floating-point tensor",
        ),
    ],
)
def test_bad_arguments_raise(call, error, fragment):
    with pytest.raises(error) as info:
        call()
    assert fragment in str(info.value)


def test_a_batch_with_another_latent_size_is_rejected():
    stats = PosteriorStats()
    stats.update(torch.zeros(4, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="D = 3 latent dimensions but earlier batches had 2"):
        stats.update(torch.zeros(4, 3), torch.zeros(4, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_posterior_stats_on_cuda_match_the_cpu():
    mu, logvar = _posterior(500, 6)
    cpu, gpu = PosteriorStats(mi_points=100), PosteriorStats(mi_points=100)
    _stream(cpu, mu, logvar, _batches(500))
    _stream(gpu, mu.cuda(), logvar.cuda(), _batches(500))
    want, got = cpu.compute(), gpu.compute()
    assert got["kl_per_dim"].device.type == "cuda"
    torch.testing.assert_close(got["mu_covariance"].cpu(), want["mu_covariance"])
    torch.testing.assert_close(got["kl_per_dim"].cpu(), want["kl_per_dim"])
    assert got["active_units"] == want["active_units"]
    kept_cpu, kept_gpu = cpu.subsample()[0], gpu.subsample()[0]
    torch.testing.assert_close(kept_gpu.cpu(), kept_cpu)  # the same rows are kept
