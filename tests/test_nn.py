"""klanneal.nn.ELBOLoss: step buffer, schedule, state_dict, torch.compile."""

from __future__ import annotations

import pytest
import torch
from elbo_cases import LinearWarmup, assert_matches, make_inputs, run

from klanneal import elbo_loss, elbo_loss_ref
from klanneal.nn import ELBOLoss


def test_forward_follows_the_schedule_as_step_advances():
    schedule = LinearWarmup(0.0, 1.0, 4)
    criterion = ELBOLoss(schedule=schedule, free_bits=0.1, free_bits_mode="sample")
    inputs = make_inputs("categorical", 2, (3,), 13, 4)
    for step in range(6):
        assert int(criterion.current_step) == step
        assert criterion.beta == pytest.approx(schedule(step))
        got = run(criterion, inputs)
        assert got[0][4].item() == pytest.approx(schedule(step))
        want = run(elbo_loss_ref, inputs, beta=schedule, step=step, free_bits=0.1,
                   free_bits_mode="sample")  # fmt: skip
        assert_matches(got, want, torch.float32)
        criterion.step()


def test_constant_beta_and_options():
    criterion = ELBOLoss(0.25, likelihood="gaussian", reduction="sum", gaussian_var=2.0)
    inputs = make_inputs("gaussian", 3, (5,))
    kwargs = {"beta": 0.25, "likelihood": "gaussian", "reduction": "sum", "gaussian_var": 2.0}
    assert_matches(run(criterion, inputs), run(elbo_loss, inputs, **kwargs), torch.float32)
    assert criterion.beta == 0.25


def test_step_is_saved_in_the_state_dict():
    criterion = ELBOLoss(schedule=LinearWarmup())
    for _ in range(7):
        criterion.step()
    state = criterion.state_dict()
    assert int(state["current_step"]) == 7
    restored = ELBOLoss(schedule=LinearWarmup())
    restored.load_state_dict(state)
    assert int(restored.current_step) == 7
    assert restored.current_step.dtype == torch.int64


def test_compiled_module_does_not_recompile_as_step_advances():
    from torch._dynamo.utils import counters

    schedule = LinearWarmup(0.0, 1.0, 3)
    criterion = ELBOLoss(schedule=schedule)
    x, target, mu, logvar = make_inputs("categorical", 2, (3,), 11, 4)
    torch.compiler.reset()
    counters.clear()
    compiled = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    for step in range(5):
        leaf = x.clone().requires_grad_()
        out = compiled(leaf, target, mu, logvar)
        (2.5 * out.loss).backward()
        want = run(elbo_loss_ref, (x, target, mu, logvar), beta=schedule, step=step)
        torch.testing.assert_close(out.loss.detach(), want[0][0])
        torch.testing.assert_close(leaf.grad, want[1][0], rtol=5e-5, atol=2e-6)
        criterion.step()
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "kwargs,exc,fragment",
    [
        ({"likelihood": "poisson"}, ValueError, "likelihood must be one of"),
        ({"reduction": "none", "free_bits": 1.0}, ValueError, "free_bits_mode='batch'"),
        ({"free_bits": -1.0}, ValueError, "free_bits must be finite and >= 0"),
        ({"schedule": -0.5}, ValueError, "constant beta must be finite and >= 0"),
        ({"schedule": "cyclical"}, TypeError, "schedule must be a klanneal.schedules object"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        ELBOLoss(**kwargs)
