"""Shared inputs and comparison helpers of the ELBO tests."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from klanneal.schedules import Monotonic


def LinearWarmup(start: float = 0.0, stop: float = 1.0, total_steps: int = 10) -> Monotonic:  # noqa: N802
    """Monotonic linear warm-up from `start` to `stop` over `total_steps` (a klanneal schedule)."""
    return Monotonic(warmup_steps=total_steps, start=start, stop=stop)


def make_inputs(
    likelihood: str,
    batch: int = 3,
    middle: tuple[int, ...] = (4,),
    vocab: int = 7,
    latent: int = 5,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """recon_input, target, mu, logvar with a few ignored positions / exact 0-1 targets."""
    gen = torch.Generator().manual_seed(seed)
    if likelihood == "categorical":
        x = 2 * torch.randn(batch, *middle, vocab, generator=gen, dtype=torch.float64)
        target = torch.randint(0, vocab, (batch, *middle), generator=gen)
        flat = target.view(-1)
        flat[:: max(1, flat.numel() // 3)] = ignore_index
        if flat.numel() > 1:
            flat[1] = vocab - 1
    else:
        x = torch.randn(batch, *middle, generator=gen, dtype=torch.float64)
        if likelihood == "bernoulli":
            target = torch.rand(batch, *middle, generator=gen, dtype=torch.float64)
            target.view(-1)[::3] = 1.0
            target.view(-1)[1::3] = 0.0
        else:
            target = torch.randn(batch, *middle, generator=gen, dtype=torch.float64)
        target = target.to(dtype)
    mu = torch.randn(batch, latent, generator=gen, dtype=torch.float64)
    logvar = 0.5 * torch.randn(batch, latent, generator=gen, dtype=torch.float64)
    return x.to(dtype), target, mu.to(dtype), logvar.to(dtype)


def run(
    fn: Callable,
    inputs: tuple[torch.Tensor, ...],
    upstream: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[tuple[torch.Tensor, ...], tuple[Optional[torch.Tensor], ...]]:
    """Runs fn on fresh leaves; backward of (loss * upstream).sum(), upstream != 1.

    Returns the five outputs and the gradients of recon_input, mu, logvar.
    """
    x, target, mu, logvar = (t.detach().clone() for t in inputs)
    leaves = [x.requires_grad_(), mu.requires_grad_(), logvar.requires_grad_()]
    out = fn(x, target, mu, logvar, **kwargs)
    if upstream is None:
        upstream = torch.full_like(out.loss, 2.5)
    (out.loss * upstream).sum().backward()
    return tuple(t.detach() for t in out), tuple(leaf.grad for leaf in leaves)


def tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 5e-5, "atol": 2e-6}


def assert_matches(got, want, dtype: torch.dtype) -> None:
    """Outputs and gradients of two runs agree within the dtype's tolerance."""
    (out_a, grads_a), (out_b, grads_b) = got, want
    tol = tolerances(dtype)
    for name, a, b in zip(("loss", "recon", "kl", "kl_per_dim", "beta"), out_a, out_b):
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in zip(("grad recon_input", "grad mu", "grad logvar"), grads_a, grads_b):
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def pack_options(
    schedule, beta_value, likelihood, reduction, free_bits, free_bits_mode, ignore_index,
    gaussian_var, validate, need_grad_recon, need_grad_mu, need_grad_logvar,
) -> tuple[list[float], list[int]]:  # fmt: skip
    """The op's `floats` and `ints` from positional options (test shorthand for ElboOptions)."""
    from klanneal._ops import ElboOptions

    options = ElboOptions(
        likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
    )
    return options.pack(
        beta_value=beta_value, schedule=schedule, need_grad_recon=need_grad_recon,
        need_grad_mu=need_grad_mu, need_grad_logvar=need_grad_logvar,
    )  # fmt: skip


def packed_call(params: dict) -> tuple[list, list, list, list]:
    """The (sizes, ptrs, floats, ints) of a dict keyed by ElboParams field names.

    For tests that build raw calls of the bindings; the slot names come from
    _C.elbo_layout(). `schedule` is the list of 8 floats.
    """
    from klanneal._ops import LAYOUT

    flat = dict(params)
    schedule = flat.pop("schedule", [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    for name, value in zip(LAYOUT["floats"][3:], schedule):
        flat[name] = value
    capacity = flat.pop("capacity", [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    for name, value in zip(LAYOUT["floats"][11:], capacity):
        flat[name] = value
    for name in ("prior_mu", "prior_logvar", "global_kl_per_dim", "kl_weight", "grad_prior_mu",
                 "grad_prior_logvar", "has_capacity"):  # fmt: skip
        flat.setdefault(name, 0)
    flat.setdefault("need_grad_prior_mu", int(bool(flat["grad_prior_mu"])))
    flat.setdefault("need_grad_prior_logvar", int(bool(flat["grad_prior_logvar"])))
    flat.setdefault("out_dtype", LAYOUT["dtype"].index("float64"))
    flat.setdefault("validate", 0)
    flat.setdefault("need_grad_recon", int(bool(flat.get("grad_recon", 0))))
    flat.setdefault("need_grad_mu", int(bool(flat.get("grad_mu", 0))))
    flat.setdefault("need_grad_logvar", int(bool(flat.get("grad_logvar", 0))))
    missing = [n for kind in ("sizes", "ptrs", "floats", "ints") for n in LAYOUT[kind]
               if n not in flat]  # fmt: skip
    if missing:
        raise KeyError(f"packed_call: missing {missing}")
    return tuple([flat[n] for n in LAYOUT[kind]] for kind in ("sizes", "ptrs", "floats", "ints"))


def check_retained_backwards(loss: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> None:
    """Three backwards through a retained graph (upstream 1, 3, 1): the first
    one's results, which may be the op's saved gradients themselves, are
    left alone by the later ones, which get the right values."""
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(3.0 * loss, inputs, retain_graph=True)
    third = torch.autograd.grad(loss, inputs)
    for g, k, s, t in zip(first, kept, second, third):
        assert torch.equal(g, k)
        torch.testing.assert_close(s, 3.0 * k)
        assert torch.equal(t, k)
