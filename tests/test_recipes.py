"""klanneal.recipes.fu2019 against a transcription of the authors' released loops.

The two loops below are transcribed from haofuml/cyclical_annealing,
language_model/train_text_cyc_ptb.py and train_text_bl_ptb.py (the beta and
learning-rate lines of their epoch and batch loops, defaults cycle=10,
warmup=5 (cyclical) / 10 (monotonic), num_epochs=40), recording what each
batch sees.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import klanneal
from klanneal import recipes
from klanneal.schedules import FromArray


def authors_cyclical(n_batches, num_epochs=40, cycle=10, warmup=5, lr=0.001):
    betas, lrs = [], []
    beta = 0.1 if warmup else 1.0
    epoch = 0
    while epoch < num_epochs:
        epoch += 1
        tmp = float((epoch - 1) % cycle) / cycle
        cur_lr = lr * 0.5 * (1 + np.cos(tmp * np.pi))
        if (epoch - 1) % cycle == 0:
            beta = 0.1
        for _ in range(n_batches):
            if warmup > 0:
                beta = min(1, beta + 1.0 / (warmup * n_batches))
            betas.append(beta)
            lrs.append(cur_lr)
    return betas, lrs


def authors_monotonic(n_batches, num_epochs=40, warmup=10, lr=0.001):
    betas, lrs = [], []
    beta = 0.1 if warmup else 1.0
    epoch = 0
    while epoch < num_epochs:
        epoch += 1
        for _ in range(n_batches):
            if warmup > 0:
                beta = min(1, beta + 1.0 / (warmup * n_batches))
            betas.append(beta)
            lrs.append(lr)
    return betas, lrs


AUTHORS = {"cyclical": authors_cyclical, "monotonic": authors_monotonic}


def recipe_sequence(recipe, lr=0.001):
    """beta and the learning rate each training step sees, through the public API:
    an optimizer stepped with the recipe's scheduler, ELBOLoss stepped alongside."""
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = recipe.lr_scheduler(optimizer)
    criterion = klanneal.nn.ELBOLoss(recipe.beta)
    betas, lrs = [], []
    for _ in range(recipe.total_steps):
        betas.append(criterion.beta)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        criterion.step()
    return betas, lrs


@pytest.mark.parametrize("schedule", ["cyclical", "monotonic"])
@pytest.mark.parametrize("n_batches", [1, 7, 1314])
def test_fu2019_equals_the_authors_loops_at_40_epochs(schedule, n_batches):
    recipe = recipes.fu2019(n_batches, 40, schedule)
    want_beta, want_lr = AUTHORS[schedule](n_batches)
    assert recipe.total_steps == len(want_beta) == 40 * n_batches
    beta = recipe.beta.values(recipe.total_steps)
    np.testing.assert_allclose(beta, want_beta, rtol=0, atol=1e-12)
    # Every step, through ELBOLoss and the LR scheduler as a training loop uses them.
    if n_batches < 100:
        got_beta, got_lr = recipe_sequence(recipe)
        np.testing.assert_allclose(got_beta, want_beta, rtol=0, atol=1e-12)
        assert got_lr == [float(v) for v in want_lr]  # the same floats
    else:
        factors = [recipe.lr_factor(s) for s in range(0, recipe.total_steps, 97)]
        want = [float(want_lr[s]) / 0.001 for s in range(0, recipe.total_steps, 97)]
        np.testing.assert_allclose(factors, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("schedule", ["cyclical", "monotonic"])
@pytest.mark.parametrize("n_batches", [8, 16, 1312])
def test_fu2019_at_5_epochs_is_the_authors_loop_in_units_of_cycles(schedule, n_batches):
    # 5 epochs of n_batches (a multiple of 8): 40 tenths of a cycle of n_batches / 8
    # steps each, i.e. the authors' 40-epoch loop with n_batches / 8 batches per epoch.
    recipe = recipes.fu2019(n_batches, 5, schedule)
    want_beta, want_lr = AUTHORS[schedule](n_batches // 8)
    assert recipe.total_steps == len(want_beta)
    np.testing.assert_allclose(recipe.beta.values(recipe.total_steps), want_beta, atol=1e-12)
    if n_batches <= 16:
        assert recipe_sequence(recipe)[1] == [float(v) for v in want_lr]


def test_fu2019_shape_at_a_budget_that_does_not_divide():
    # PTB in batches of 32: 1314 batches an epoch, 5 epochs = 6570 steps, cycles
    # of 1642.5 steps.
    recipe = recipes.fu2019(1314, 5, "cyclical")
    beta = recipe.beta.values(recipe.total_steps)
    starts = [0] + [s for s in range(1, 6570) if beta[s] < beta[s - 1]]
    assert starts == [0, 1643, 3285, 4928]  # ceil(c * 6570 / 4)
    for c, start in enumerate(starts):
        assert beta[start] == pytest.approx(0.1 + 0.9 / (0.45 * 1642.5), abs=1e-15)
        end = starts[c + 1] if c + 1 < 4 else 6570
        ramp = int(np.argmax(beta[start:end] == 1.0))
        assert ramp + 1 == pytest.approx(0.45 * 1642.5, abs=1)  # 45% of the cycle
        assert np.all(np.diff(beta[start : start + ramp + 1]) > 0)
        assert np.all(beta[start + ramp : end] == 1.0)
    # Ten learning-rate levels per cycle, each held over a tenth of it.
    factors = np.array([recipe.lr_factor(s) for s in range(6570)])
    levels = [0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(10)]
    for c, start in enumerate(starts):
        end = starts[c + 1] if c + 1 < 4 else 6570
        seen = sorted(set(factors[start:end].tolist()), reverse=True)
        assert seen == pytest.approx(levels, rel=1e-15)
    assert factors.min() == pytest.approx(0.0245, abs=1e-4) and factors.min() > 0
    mono = recipes.fu2019(1314, 5, "monotonic").beta.values(6570)
    reach = int(np.argmax(mono == 1.0))
    assert reach + 1 == pytest.approx(0.225 * 6570, abs=1)  # 22.5% of the run
    assert mono[0] == pytest.approx(0.1 + 0.9 / (0.225 * 6570))


def test_fu2019_holds_its_last_values_past_the_end_and_resumes():
    recipe = recipes.fu2019(10, 4, "cyclical")
    assert recipe.beta(10**9) == recipe.beta(39) == 1.0
    assert recipe.lr_factor(10**9) == recipe.lr_factor(39)
    param = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([param], lr=0.5)
    straight = recipe.lr_scheduler(optimizer)
    for _ in range(17):
        optimizer.step()
        straight.step()
    state = straight.state_dict()
    optimizer2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=0.5)
    resumed = recipe.lr_scheduler(optimizer2)
    resumed.load_state_dict(state)
    for _ in range(5):
        optimizer.step()
        straight.step()
        optimizer2.step()
        resumed.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


# Inductor's first import runs torch.jit.script(_method) in torch's own modules.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fu2019_beta_is_a_schedule_for_elbo_loss_elboloss_and_compile():
    recipe = recipes.fu2019(25, 2, "cyclical")
    assert isinstance(recipe.beta, FromArray) and recipe.n_cycles == 4
    torch.manual_seed(0)
    x, t = torch.randn(3, 4, 6), torch.randint(0, 6, (3, 4))
    mu, logvar = torch.randn(3, 2), torch.randn(3, 2)
    for step in (0, 12, 13, 49, 500):
        want = klanneal.elbo_loss(x, t, mu, logvar, recipe.beta(step)).loss
        for s in (step, torch.tensor(step)):
            got = klanneal.elbo_loss(x, t, mu, logvar, recipe.beta, step=s).loss
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    compiled = torch.compile(
        lambda s: klanneal.elbo_loss(x, t, mu, logvar, recipe.beta, step=s).loss, fullgraph=True
    )
    for step in (3, 30):
        want = klanneal.elbo_loss(x, t, mu, logvar, recipe.beta(step)).loss
        torch.testing.assert_close(compiled(torch.tensor(step)), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((0,), ValueError, "steps_per_epoch must be >= 1"),
        ((1.5,), ValueError, "steps_per_epoch must be a whole number"),
        ((10, 0), ValueError, "epochs must be finite and > 0"),
        ((10, float("nan")), ValueError, "epochs must be finite and > 0"),
        ((10, "40"), TypeError, "epochs must be a number"),
        ((10, 40, "linear"), ValueError, "schedule must be one of"),
        ((1, 3), ValueError, "at least 4 steps"),
    ],
)
def test_fu2019_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        recipes.fu2019(*args)
