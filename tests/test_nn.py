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
        ({"likelihood": "gamma"}, ValueError, "likelihood must be one of"),
        ({"reduction": "none", "free_bits": 1.0}, ValueError, "free_bits_mode='batch'"),
        ({"free_bits": -1.0}, ValueError, "free_bits must be finite and >= 0"),
        ({"schedule": -0.5}, ValueError, "constant beta must be finite and >= 0"),
        ({"schedule": "cyclical"}, TypeError, "schedule must be a klanneal.schedules object"),
    ],
)
def test_bad_options_fail_at_construction(kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        ELBOLoss(**kwargs)


# ---- schedule mismatch on load_state_dict -------------------------------------------


def test_schedule_mismatch_names_the_fields_and_what_to_do():
    # Regression: the error was 'Unexpected key(s) in state_dict: "_extra_state:
    # ELBOLoss state saved with different schedules ({... 'params': [2.0, ...]'.
    from klanneal.schedules import Cyclical

    saved = ELBOLoss(Cyclical(1000, 4))
    saved.step()
    with pytest.raises(RuntimeError) as info:
        ELBOLoss(Cyclical(2000, 4)).load_state_dict(saved.state_dict())
    message = str(info.value)
    assert "schedule.total_steps: checkpoint 1000, this loss 2000" in message
    assert "strict=False" in message and "construct the ELBOLoss" in message
    assert "Unexpected key" not in message and "params" not in message


def test_schedule_mismatch_in_a_model_strict_and_not():
    from klanneal.schedules import Capacity, Cyclical, Monotonic

    def model(schedule, capacity):
        model = torch.nn.Module()
        model.decoder = torch.nn.Linear(2, 3)
        model.criterion = ELBOLoss(schedule, capacity=capacity)
        return model

    old = model(Cyclical(1000, 4, shape="cosine"), Capacity(5.0, 10))
    old.criterion.set_step(7)
    state = old.state_dict()
    with pytest.raises(RuntimeError, match="criterion: the checkpoint was saved") as info:
        model(Monotonic(10), 2.0).load_state_dict(state)
    message = str(info.value)
    assert "schedule: checkpoint Cyclical(total_steps=1000, n_cycles=4" in message
    assert "this loss Monotonic(warmup_steps=10, start=0.0, stop=1.0)" in message
    assert "capacity: checkpoint Capacity(c_max=5.0, warmup_steps=10), this loss 2.0" in message
    new = model(Cyclical(1000, 2, shape="cosine"), Capacity(5.0, 10))
    with pytest.warns(UserWarning, match="schedule.n_cycles: checkpoint 4, this loss 2") as record:
        result = new.load_state_dict(state, strict=False)
    assert "kept this loss's schedules" in str(record[0].message)
    assert record[0].filename == __file__  # points at the load_state_dict call
    assert result.unexpected_keys == [] and result.missing_keys == []
    assert int(new.criterion.current_step) == 7
    assert new.criterion.schedule == Cyclical(1000, 2, shape="cosine")


def test_checkpoints_of_the_params_format_still_load():
    # Before field names were saved, a closed-form schedule was saved as
    # {"type", "params": to_params()}.
    from klanneal.schedules import Capacity, Constant, Cyclical, Monotonic

    schedules = [Cyclical(1000, 4, ratio=0.25, shape="sigmoid", zero_ratio=0.5), Monotonic(10, 0.1),
                 Constant(0.5)]  # fmt: skip
    for schedule in schedules:
        legacy = {
            "current_step": torch.tensor(5),
            "_extra_state": {
                "schedule": {"type": type(schedule).__name__, "params": schedule.to_params()},
                "capacity": {"type": "Capacity", "params": Capacity(5.0, 10).to_params()},
            },
        }
        criterion = ELBOLoss(schedule, capacity=Capacity(5.0, 10))
        criterion.load_state_dict(legacy)
        assert int(criterion.current_step) == 5
    cyclical = Cyclical(1000, 4)
    legacy["_extra_state"]["schedule"] = {"type": "Cyclical", "params": cyclical.to_params()}
    with pytest.raises(RuntimeError, match="schedule.total_steps: checkpoint 1000, this loss 2000"):
        ELBOLoss(Cyclical(2000, 4), capacity=Capacity(5.0, 10)).load_state_dict(legacy)
    with pytest.raises(RuntimeError, match="capacity.c_max: checkpoint 5.0, this loss 6.0"):
        ELBOLoss(Cyclical(1000, 4), capacity=Capacity(6.0, 10)).load_state_dict(legacy)


def test_schedule_mismatch_under_another_loader_is_an_unexpected_key():
    # A loader other than nn.Module.load_state_dict (strict unknown): warned,
    # and the post-hook lists the real key as unexpected (fails strict only).
    from torch.nn.modules.module import _IncompatibleKeys

    from klanneal.schedules import Monotonic

    state = ELBOLoss(Monotonic(10)).state_dict()
    criterion = ELBOLoss(Monotonic(20))
    missing, unexpected, errors = [], [], []
    with pytest.warns(UserWarning, match="schedule.warmup_steps: checkpoint 10, this loss 20"):
        criterion._load_from_state_dict(state, "", {}, True, missing, unexpected, errors)
    ELBOLoss._report_schedule_mismatch(criterion, _IncompatibleKeys(missing, unexpected))
    assert errors == [] and unexpected == ["_extra_state"]


def test_adding_elbo_loss_to_a_model_loads_older_checkpoints():
    # The recipe of docs/elbo.md ("Training-loop change with ELBOLoss").
    from klanneal.schedules import Cyclical

    class VAE(torch.nn.Module):
        def __init__(self, criterion=None):
            super().__init__()
            self.decoder = torch.nn.Linear(2, 3)
            if criterion is not None:
                self.criterion = criterion

    old_checkpoint = VAE().state_dict()
    model = VAE(ELBOLoss(Cyclical(1000, 4)))
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(old_checkpoint)
    state = dict(old_checkpoint)
    state.update({f"criterion.{k}": v for k, v in model.criterion.state_dict().items()})
    model.load_state_dict(state)
    model.criterion.set_step(250)
    assert model.criterion.beta == Cyclical(1000, 4)(250)
    torch.testing.assert_close(model.decoder.weight, old_checkpoint["decoder.weight"])
