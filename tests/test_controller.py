"""klanneal.schedules.KLController: ControlVAE's PI controller (Shao et al., ICML 2020).

Checked against transcriptions of the paper's Algorithm 1 and of the
authors' language-model controller, on a synthetic plant with a known
KL(beta) response, for resuming, and inside ELBOLoss / elbo_loss.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

import klanneal
from klanneal.nn import ELBOLoss, LinearELBOLoss
from klanneal.schedules import (
    BetaScheduler,
    Capacity,
    Constant,
    Cyclical,
    FromArray,
    KLController,
    LinearWarmup,
    Logistic,
    Monotonic,
)

# ---- transcriptions of the published equations ---------------------------------------------


def algorithm_1(kls, target, kp, ki, beta_min=0.0, beta_max=1.0, beta_0=0.0):
    """Shao et al. (2020), Algorithm 1, step by step:

        I(0) = 0, beta(0) = 0
        for t = 1..N:  e(t) = v_kl - v_hat(t);  P(t) = Kp / (1 + exp(e(t)))
                       if beta_min <= beta(t-1) <= beta_max: I(t) = I(t-1) - Ki e(t)
                       else: I(t) = I(t-1)                              # anti-windup
                       beta(t) = P(t) + I(t) + beta_min, then clipped to [beta_min, beta_max]

    with beta(t-1) in the anti-windup test read as the output before the
    clipping (read after it, the test always passes). ``target(t)`` is the
    set point at the t-th update (0-based); ``beta_0`` is beta(0). Returns
    beta(1..N)."""
    integral, previous, betas = 0.0, beta_0, []
    for t, kl in enumerate(kls):
        error = target(t) - kl
        p_term = kp / (1.0 + math.exp(error))
        if beta_min <= previous <= beta_max:
            integral = integral - ki * error
        previous = p_term + integral + beta_min
        betas.append(min(max(previous, beta_min), beta_max))
    return betas


def authors_text_controller(kls, exp_kl, kp=0.01, ki_signed=-0.0001):
    """The controller of the authors' PTB script (Language_modeling/Text_gen_PTB,
    ``PIDControl.pid`` as ``vae_train.py`` calls it), rewritten: P = Kp / (1 +
    exp(e)), I += Ki e with their signed Ki (-1e-4), W = P + I clipped to
    [0, 1]. Its anti-windup test (W < 0 and W > 1) can never hold, so the
    integral always integrates."""
    integral, betas = 0.0, []
    for kl in kls:
        error = exp_kl - kl
        integral = integral + ki_signed * error
        output = kp * (1.0 / (1.0 + math.exp(error))) + integral
        betas.append(min(max(output, 0.0), 1.0))
    return betas


def _run(ctrl, kls):
    betas = []
    for kl in kls:
        ctrl.update(torch.tensor(kl, dtype=torch.float64))
        betas.append(float(ctrl.beta))
    return betas


def _kls(n, low, high, seed=0):
    return np.random.default_rng(seed).uniform(low, high, n).tolist()


# ---- the equations ------------------------------------------------------------------------


def test_defaults_are_the_authors_language_model_gains():
    ctrl = KLController(3.0)
    assert (ctrl.kp, ctrl.ki, ctrl.beta_min, ctrl.beta_max, ctrl.beta_init) == (
        0.01, 1e-4, 0.0, 1.0, 0.0,
    )  # fmt: skip
    assert float(ctrl.beta) == 0.0 and int(ctrl.updates) == 0


@pytest.mark.parametrize(("kp", "ki"), [(0.01, 1e-4), (0.01, 1e-3), (0.3, 2e-3)])
def test_matches_algorithm_1_and_the_authors_code_inside_the_bounds(kp, ki):
    # KLs mostly above the set point: beta grows but stays strictly inside
    # [0, 1], where the paper, the authors' code and ours must agree at every step.
    kls = _kls(300, 2.5, 5.0)
    ours = _run(KLController(3.0, kp=kp, ki=ki), kls)
    paper = algorithm_1(kls, lambda t: 3.0, kp, ki)
    authors = authors_text_controller(kls, 3.0, kp, -ki)
    assert 0.0 < min(ours) and max(ours) < 1.0
    np.testing.assert_allclose(ours, paper, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours, authors, rtol=1e-12, atol=1e-15)


def test_matches_algorithm_1_with_beta_min_and_a_ramping_set_point():
    # The disentangling setting: beta_min = 1, beta_max = 3, the set point
    # stepping up by 0.15 every 50 updates (the paper: every 5000) to 1.4.
    steps = np.arange(600)
    ramp = np.minimum(0.5 + 0.15 * ((steps + 1) // 50), 1.4)
    kls = _kls(600, 1.2, 3.0, seed=1)  # mostly above: beta off its lower bound
    ctrl = KLController(FromArray(ramp), kp=0.01, ki=1e-3, beta_min=1.0, beta_max=3.0)
    ours = _run(ctrl, kls)
    # beta(0) = beta_min (the algorithm's beta(0) = 0 is below this beta_min:
    # read literally, the first update would hold the integral).
    paper = algorithm_1(kls, lambda t: ramp[t], 0.01, 1e-3, beta_min=1.0, beta_max=3.0, beta_0=1.0)
    np.testing.assert_allclose(ours, paper, rtol=1e-12, atol=1e-15)


def test_saturation_that_winds_further_is_held_as_in_algorithm_1():
    # KL far above the set point: beta hits beta_max and the integral stops
    # there (both rules hold it: integrating would wind it further).
    kls = [50.0] * 30 + _kls(30, 20.0, 40.0)
    ctrl = KLController(1.0, kp=0.01, ki=0.01)
    ours = _run(ctrl, kls)
    assert ours == algorithm_1(kls, lambda t: 1.0, 0.01, 0.01)
    assert ours[-1] == 1.0
    assert ctrl.state_dict()["state"]["integral"] < 1.0 + 0.01 * 49  # held near the bound


def test_the_integral_unwinds_where_algorithm_1_would_lock_at_beta_max():
    # One large error winds the integral past beta_max - beta_min in one
    # update; the previous output was in bounds, so Algorithm 1 integrates.
    # From then on P >= 0 keeps its output above beta_max: it holds the
    # integral for good and beta stays 1 although the KL has fallen far below
    # the set point. Ours integrates when that brings the output back.
    kls = [21.0] + [0.0] * 300
    paper = algorithm_1(kls, lambda t: 1.0, 0.01, 0.1)
    ours = _run(KLController(1.0, kp=0.01, ki=0.1), kls)
    assert paper[1:] == [1.0] * 300  # locked
    assert ours[0] == 1.0 and ours[-1] == 0.0
    assert next(t for t, beta in enumerate(ours) if beta < 1.0) <= 25


def test_anti_windup_bounds_the_integral_where_the_authors_code_winds_up():
    # 2000 updates with the KL above the set point and beta at its bound,
    # then the KL falls below it: ours leaves the bound at once; the authors'
    # text controller, whose integral kept growing, needs about as long again.
    kls = [5.0] * 2000 + [1.0] * 4000
    ours = _run(KLController(3.0, kp=0.01, ki=1e-3), kls)
    authors = authors_text_controller(kls, 3.0, 0.01, -1e-3)
    assert ours[1999] == authors[1999] == 1.0

    def leaves(betas):
        return next(t for t in range(2000, len(betas)) if betas[t] < 1.0) - 2000

    assert leaves(ours) <= 5
    assert leaves(authors) > 1000


# ---- a synthetic plant --------------------------------------------------------------------------

# The KL a model settles to under a weight beta, KL*(beta) = 10 exp(-4 beta)
# nats (monotone decreasing: 10 at beta = 0, 3 at beta = ln(10/3)/4 = 0.301),
# approached with a lag: KL <- KL + 0.05 (KL*(beta) - KL) per update.


def _plant(ctrl, steps, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    kl, kls = 10.0, []
    for _ in range(steps):
        kl += 0.05 * (10.0 * math.exp(-4.0 * float(ctrl.beta)) - kl)
        ctrl.update(torch.tensor(kl + noise * rng.standard_normal(), dtype=torch.float64))
        kls.append(kl)
    return np.array(kls)


def test_on_a_plant_the_kl_settles_within_5_percent_without_oscillating():
    kls = _plant(KLController(3.0), 4000)  # the paper's gains
    # Within 5% from step 2300 on, and never below the target by more than
    # 1% (an overdamped approach from above: no oscillation around it).
    assert np.all(np.abs(kls[2300:] / 3.0 - 1.0) <= 0.05)
    assert kls.min() >= 3.0 * 0.99
    assert abs(kls[-1] / 3.0 - 1.0) <= 0.01
    # The disentangling gains (ki = 1e-3): within 5% from step 200, the same bound.
    fast = _plant(KLController(3.0, ki=1e-3), 1000)
    assert np.all(np.abs(fast[200:] / 3.0 - 1.0) <= 0.05) and fast.min() >= 3.0 * 0.99


def test_on_a_plant_with_noisy_kl_measurements_the_kl_holds_its_target():
    # Batch KLs with a standard deviation of 0.5 nats around the model's KL.
    kls = _plant(KLController(3.0), 6000, noise=0.5)
    tail = kls[-2000:]
    assert abs(tail.mean() / 3.0 - 1.0) <= 0.05
    assert tail.max() - tail.min() <= 0.05 * 3.0  # peak to peak within 5% of the target


def test_a_ramping_set_point_is_tracked():
    ctrl = KLController(Monotonic(3000, start=6.0, stop=3.0), ki=1e-3)
    kls = _plant(ctrl, 4000)
    assert abs(kls[1500] / 4.5 - 1.0) <= 0.05  # half way down the ramp
    assert abs(kls[-1] / 3.0 - 1.0) <= 0.01


@pytest.mark.parametrize(
    "target",
    [
        Constant(2.0),
        Monotonic(10, start=0.5, stop=2.0),
        Cyclical(20, 2, 0.5, start=1.0, stop=2.0, shape="cosine"),
        Capacity(2.0, 10),
        Monotonic(10, start=0.5, stop=2.0).offset(3),
        LinearWarmup(7.5),
        Logistic(0.5, 5),
        FromArray(np.linspace(0.5, 2.0, 12)),
    ],
)
def test_a_set_point_schedule_is_read_at_the_update_count(target):
    kls = _kls(40, 2.5, 5.0, seed=2)  # above every set point: beta off its lower bound
    values = [target(t) for t in range(40)]
    ours = _run(KLController(target, ki=0.01), kls)
    paper = algorithm_1(kls, lambda t: values[t], 0.01, 0.01)
    np.testing.assert_allclose(ours, paper, rtol=1e-12, atol=1e-15)


def test_a_non_finite_kl_is_ignored():
    ctrl = KLController(3.0, ki=0.01)
    ctrl.update(torch.tensor(5.0))
    before = ctrl.state_dict()["state"]
    ctrl.update(torch.tensor(float("nan")))
    ctrl.update(torch.tensor(float("inf")))
    after = ctrl.state_dict()["state"]
    assert after == {**before, "updates": before["updates"] + 2}


def test_update_takes_any_floating_dtype_and_numbers_and_detaches():
    a, b, c = KLController(3.0), KLController(3.0), KLController(3.0)
    a.update(torch.tensor(2.5, dtype=torch.float32, requires_grad=True))
    b.update(2.5)
    c.update(np.float32(2.5))
    assert float(a.beta) == float(b.beta) == float(c.beta)
    assert not a.beta.requires_grad and a.beta.dtype == torch.float64


def test_beta_is_a_copy_and_calling_gives_the_current_value():
    ctrl = KLController(3.0, ki=0.01)
    beta = ctrl.beta
    ctrl.update(torch.tensor(10.0))
    assert float(beta) == 0.0 and float(ctrl.beta) > 0.0
    assert ctrl(0) == ctrl(10**6) == float(ctrl.beta)
    assert ctrl.bounds() == (0.0, 1.0)


# ---- state -------------------------------------------------------------------------------------


def test_resume_mid_run_continues_bit_for_bit():
    kls = _kls(200, 0.0, 6.0, seed=3)
    target = Monotonic(100, start=1.0, stop=3.0)
    straight = _run(KLController(target, kp=0.2, ki=3e-3), kls)

    first = KLController(Monotonic(100, start=1.0, stop=3.0), kp=0.2, ki=3e-3)
    head = _run(first, kls[:90])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = KLController(0.0)  # other arguments: all of them are restored
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed == first and repr(resumed) == repr(first)
    assert head + _run(resumed, kls[90:]) == straight  # bit for bit


def test_a_state_dict_without_the_running_state_restarts_the_controller():
    ctrl = KLController(3.0)
    ctrl.update(10.0)
    ctrl.load_state_dict(KLController(2.0, kp=0.5).state_dict(running=False))
    assert ctrl.target_kl == 2.0 and ctrl.kp == 0.5
    assert float(ctrl.beta) == 0.0 and int(ctrl.updates) == 0


def test_a_table_set_point_is_checked_on_load():
    ctrl = KLController(FromArray([1.0, 2.0]))
    saved = KLController(FromArray([1.0, 3.0])).state_dict()
    with pytest.raises(ValueError, match="another table"):
        ctrl.load_state_dict(saved)


# ---- inside the loss -------------------------------------------------------------------------


def _batch(seed, n=6, d=3, v=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 5, v, generator=g, requires_grad=True)
    target = torch.randint(0, v, (n, 5), generator=g)
    mu = (2 * torch.randn(n, d, generator=g)).requires_grad_()
    logvar = torch.randn(n, d, generator=g).requires_grad_()
    return logits, target, mu, logvar


def test_elbo_loss_feeds_the_controller_its_own_kl_after_each_training_call():
    criterion = ELBOLoss(KLController(0.5, kp=0.1, ki=0.01))
    mirror = KLController(0.5, kp=0.1, ki=0.01)
    for k in range(5):
        beta_before = float(mirror.beta)
        out = criterion(*_batch(k))
        out.loss.backward()
        criterion.step()
        # The call used the beta before the update, then fed out.kl.
        assert float(out.beta) == pytest.approx(beta_before, rel=1e-6, abs=1e-12)
        mirror.update(out.kl)
        assert float(criterion.schedule.beta) == float(mirror.beta)
    criterion.eval()
    with torch.no_grad():
        criterion(*_batch(9))
    assert int(criterion.schedule.updates) == 5  # evaluation calls feed nothing
    assert criterion.beta == float(mirror.beta)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_other_reductions_feed_the_kl_per_example(reduction):
    batchmean = ELBOLoss(KLController(0.5, ki=0.01))
    other = ELBOLoss(KLController(0.5, ki=0.01), reduction=reduction)
    for k in range(3):
        batchmean(*_batch(k))
        other(*_batch(k))
    np.testing.assert_allclose(
        float(other.schedule.beta), float(batchmean.schedule.beta), rtol=1e-6
    )


def test_linear_elbo_loss_feeds_the_controller():
    layer = torch.nn.Linear(4, 7)
    criterion = LinearELBOLoss(layer, KLController(0.5, ki=0.01))
    _, target, mu, logvar = _batch(0)
    criterion(torch.randn(6, 5, 4), target, mu, logvar)
    assert int(criterion.schedule.updates) == 1


def test_elbo_loss_function_reads_the_controller_without_updating_it():
    ctrl = KLController(0.5, ki=0.01)
    ctrl.update(3.0)
    out = klanneal.elbo_loss(*_batch(0), ctrl, step=7)
    assert float(out.beta) == pytest.approx(float(ctrl.beta), rel=1e-6)
    out = klanneal.elbo_loss(*_batch(0), ctrl, step=torch.tensor(7))
    assert float(out.beta) == pytest.approx(float(ctrl.beta), rel=1e-6)
    assert int(ctrl.updates) == 1


def test_the_loss_state_dict_resumes_the_controller_bit_for_bit():
    def make():
        return ELBOLoss(KLController(0.5, kp=0.1, ki=0.01))

    def train(criterion, seeds):
        betas = []
        for k in seeds:
            betas.append(float(criterion(*_batch(k)).beta))
            criterion.step()
        return betas

    straight = train(make(), range(8))
    first = make()
    head = train(first, range(4))
    state = first.state_dict()
    assert state["_extra_state"]["controller"]["updates"] == 4
    resumed = make()
    resumed.load_state_dict(state)
    assert int(resumed.current_step) == 4 and resumed.schedule == first.schedule
    assert head + train(resumed, range(4, 8)) == straight


def test_a_checkpoint_of_another_controller_names_the_difference():
    saved = ELBOLoss(KLController(0.5)).state_dict()
    with pytest.raises(RuntimeError, match=r"schedule\.target_kl: checkpoint 0\.5, this loss 2\.0"):
        ELBOLoss(KLController(2.0)).load_state_dict(saved)


def test_a_beta_scheduler_steps_a_controller_as_its_current_beta():
    ctrl = KLController(0.5, ki=0.01)
    scheduler = BetaScheduler(ctrl)
    ctrl.update(4.0)
    scheduler.step()
    assert scheduler.beta == float(ctrl.beta) > 0.0
    restored = BetaScheduler(KLController(0.5, ki=0.01))
    restored.load_state_dict(scheduler.state_dict())
    assert restored.beta == scheduler.beta and restored.schedule == ctrl


def test_elbo_loss_with_a_controller_compiles_without_graph_breaks_or_recompiles():
    # The op, the beta read from the controller and its update in one graph;
    # a new beta each step is a new input value, not a recompile.
    eager = ELBOLoss(KLController(0.5, kp=0.1, ki=0.01))
    compiled = ELBOLoss(KLController(0.5, kp=0.1, ki=0.01))
    torch._dynamo.reset()
    forward = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for k in range(4):
            expected, got = eager(*_batch(k)), forward(*_batch(k))
            expected.loss.backward()
            got.loss.backward()
            eager.step()
            compiled.step()
            assert float(got.beta) == float(expected.beta)
            assert float(compiled.schedule.beta) == pytest.approx(
                float(eager.schedule.beta), rel=1e-12
            )
    assert int(compiled.schedule.updates) == 4 and float(compiled.schedule.beta) > 0.0


@pytest.mark.cuda
def test_on_cuda_the_state_moves_to_the_kl_and_updates_without_a_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctrl, mirror = KLController(2.0, ki=0.01), KLController(2.0, ki=0.01)
    kls = torch.tensor(_kls(20, 0.0, 5.0, seed=5), device="cuda")
    ctrl.update(kls[0])
    assert ctrl.beta.device.type == "cuda"
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kl in kls[1:]:
            ctrl.update(kl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _run(mirror, kls.tolist())
    assert float(ctrl.beta) == pytest.approx(float(mirror.beta), rel=1e-12)
    # Captured in a CUDA graph, each replay is one update of the same state.
    graph_ctrl = KLController(2.0, ki=0.01)
    static_kl = kls[0].clone()
    graph_ctrl.update(static_kl)  # moves the state to the GPU before the capture
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        graph_ctrl.update(static_kl)
    # Back to the start, in place (the graph keeps the state's tensors).
    graph_ctrl.load_state_dict(KLController(2.0, ki=0.01).state_dict())
    for kl in kls:
        static_kl.copy_(kl)
        graph.replay()
    torch.cuda.synchronize()
    assert float(graph_ctrl.beta) == pytest.approx(float(mirror.beta), rel=1e-12)


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"target_kl": "3"}, TypeError, "target_kl must be a real number or a klanneal"),
        ({"target_kl": -1.0}, ValueError, "target_kl must be finite and >= 0"),
        ({"target_kl": KLController(1.0)}, TypeError, "not a KL set point"),
        ({"target_kl": Monotonic(10, start=-1.0)}, ValueError, "a KL set point must be finite"),
        ({"target_kl": Logistic().offset(1)}, ValueError, "has no end within"),
        ({"target_kl": Cyclical(2**25)}, ValueError, "has no end within"),
        ({"kp": -0.1}, ValueError, "kp must be finite and >= 0"),
        ({"kp": "0.1"}, TypeError, "kp must be a real number"),
        ({"ki": float("nan")}, ValueError, "ki must be finite and >= 0"),
        ({"beta_min": 2.0}, ValueError, "beta_max must be >= beta_min"),
        ({"beta_init": 1.5}, ValueError, "beta_init must be in [beta_min, beta_max]"),
        ({"beta_max": True}, TypeError, "beta_max must be a real number"),
    ],
)
def test_bad_arguments_raise(kwargs, error, fragment):
    kwargs = {"target_kl": 3.0, **kwargs}
    with pytest.raises(error, match=_escaped(fragment)):
        KLController(**kwargs)


@pytest.mark.parametrize(
    ("kl", "error", "fragment"),
    [
        ("1.0", TypeError, "kl must be a 0-d tensor or a real number"),
        (torch.tensor(1), TypeError, "kl must be a floating-point tensor"),
        (torch.tensor([1.0, 2.0]), ValueError, "kl must be a 0-d tensor"),
    ],
)
def test_bad_kl_raises(kl, error, fragment):
    with pytest.raises(error, match=fragment):
        KLController(3.0).update(kl)


def test_values_and_offsets_are_refused():
    ctrl = KLController(3.0)
    for call in (lambda: ctrl.values(10), lambda: ctrl.values([1, 2]), lambda: ctrl.offset(1)):
        with pytest.raises(TypeError, match="no values at other steps"):
            call()


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        (lambda s: [], ValueError, "state_dict must be a dict"),
        (lambda s: {**s, "type": "Cyclical"}, ValueError, "is for a 'Cyclical' schedule"),
        (lambda s: {k: v for k, v in s.items() if k != "kp"}, ValueError, "missing keys ['kp']"),
        (lambda s: {**s, "gain": 1}, ValueError, "unknown keys ['gain']"),
        (lambda s: {**s, "state": {"raw": 0.0}}, ValueError, "must be a dict with keys"),
        (
            lambda s: {**s, "state": {**s["state"], "raw": float("inf")}},
            ValueError,
            "state_dict['state']['raw'] must be finite",
        ),
        (
            lambda s: {**s, "state": {**s["state"], "integral": "0"}},
            TypeError,
            "state_dict['state']['integral'] must be a float",
        ),
        (
            lambda s: {**s, "state": {**s["state"], "updates": -1}},
            ValueError,
            "state_dict['state']['updates'] must be >= 0",
        ),
        (lambda s: {**s, "ki": -1.0}, ValueError, "ki must be finite and >= 0"),
    ],
)
def test_bad_state_dicts_raise(change, error, fragment):
    saved = KLController(3.0).state_dict()
    with pytest.raises(error, match=_escaped(fragment)):
        KLController(3.0).load_state_dict(change(saved))


def _escaped(fragment: str) -> str:
    import re

    return re.escape(fragment)
