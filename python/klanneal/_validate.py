"""Argument checks of klanneal.elbo_loss.

Shape, dtype and device checks run in Python before dispatch (at trace time
under torch.compile). Checks that need tensor values (class ids in [0, V),
bernoulli targets in [0, 1], a tensor beta or step) run where the values
are: `check_values` is called by the op's implementation (or before the
reference fallback), so they work under torch.compile too.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NoReturn, Optional, Union, cast

import torch
from typing_extensions import TypeGuard

from klanneal.likelihoods import FAMILIES, NAMES
from klanneal.schedules import Capacity, Schedule

LIKELIHOODS = NAMES  # the table of klanneal.likelihoods
REDUCTIONS = ("batchmean", "sum", "none")
FREE_BITS_MODES = ("batch", "sample")
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_schedule(beta: Any) -> TypeGuard[Schedule]:
    """A klanneal.schedules object (evaluated at `step`)."""
    return isinstance(beta, Schedule)


def is_integer(dtype: torch.dtype) -> bool:
    """An integer dtype (not bool, floating point or complex)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def as_step(step: Any) -> int:
    """A Python or numpy integer step as an int (bools and floats are rejected)."""
    if type(step) is int:
        return step
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an int or a 0-d integer tensor, got {type(step).__name__}")
    return int(step)


def check_beta_value(value: float, where: str) -> float:
    """A beta that reaches the kernels must be a finite, non-negative weight."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"beta must be finite and >= 0, got {value} ({where})")
    return value


def check_scheduled_beta(value: float, schedule: Any, step: int) -> float:
    """check_beta_value for `schedule`'s value at `step` (described only on failure:
    a schedule's repr costs more than the rest of the call)."""
    if not (math.isfinite(value) and value >= 0):
        check_beta_value(value, f"{schedule!r} at step {step}")
    return value


def check_schedule_range(schedule: Schedule, name: str = "beta") -> None:
    """Every value of `schedule` lies between its start and stop: both must be >= 0.

    Run before the schedule is evaluated inside the op (a step tensor), where
    a negative beta could only be caught after the fact.
    """
    from klanneal._host_schedules import schedule_bounds

    start, stop = schedule_bounds(schedule)
    # Comparisons, not math.isfinite: symbolic under torch.compile(dynamic=True).
    if not (0 <= start < math.inf and 0 <= stop < math.inf):
        raise ValueError(
            f"{name}: {schedule!r} takes values in [{min(start, stop)}, {max(start, stop)}]; "
            "a KL weight must be >= 0 (check its start and stop)"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {options}; got {value!r}")


def check_flag(name: str, value: Any) -> bool:
    """A bool option (inplace, validate): a Python or numpy bool, as a bool.

    Anything else is refused by name: a truthy string such as "False" from a
    config file would switch the option on (inplace: overwrite the logits).
    """
    if type(value) is bool:
        return value
    kind = type(value)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {kind.__name__} {value!r}")


def as_float(value: Any) -> float:
    """float(value) for a real number, also while torch.compile traces: there
    automatic dynamic makes a Python number that changes between calls
    symbolic, which float() cannot trace and torch.sym_float can."""
    if type(value) is float:
        return value
    if torch.compiler.is_compiling():
        return torch.sym_float(value)  # type: ignore[no-untyped-call,no-any-return]
    return float(value)


def _check_real(name: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = cast(Any, value)  # a float, int or numpy number (or symbolic, traced)
    # Comparisons, not math.isfinite: under torch.compile the number may be
    # symbolic (as_float), which comparisons guard on (NaN fails both).
    if not ((value > 0 if positive else value >= 0) and value < math.inf):
        bound = "> 0" if positive else ">= 0"
        if torch.compiler.is_compiling():
            # Without the value: Dynamo cannot format a symbolic one (and
            # reports the raise as an "Observed exception" naming this one).
            raise ValueError(f"{name} must be finite and {bound}")
        raise ValueError(f"{name} must be finite and {bound}, got {float(value)}")
    return as_float(value)


def check_options(
    likelihood: Any,
    reduction: Any,
    free_bits: Any,
    free_bits_mode: Any,
    ignore_index: Any,
    gaussian_var: Any,
    *,
    with_params: bool = False,
) -> None:
    """Checks the non-tensor options (also used by klanneal.nn.ELBOLoss).

    with_params: the likelihood came as a klanneal.likelihoods object, which
    carries the parameters a family such as the negative binomial needs (its
    name alone does not)."""
    _check_choice("likelihood", likelihood, LIKELIHOODS)
    needs = FAMILIES[likelihood].params
    if needs and needs != ("gaussian_var",) and not with_params:
        raise ValueError(
            f"likelihood={likelihood!r} needs its {', '.join(needs)}: pass a "
            "klanneal.likelihoods object (e.g. NegativeBinomial(theta)) instead of the name"
        )
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("free_bits_mode", free_bits_mode, FREE_BITS_MODES)
    free_bits = _check_real("free_bits", free_bits, positive=False)
    _check_real("gaussian_var", gaussian_var, positive=True)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not INT64_MIN <= int(ignore_index) <= INT64_MAX:
        raise ValueError(
            f"ignore_index must fit in int64 (the class ids' dtype), got {int(ignore_index)}"
        )
    if reduction == "none" and free_bits > 0 and free_bits_mode == "batch":
        raise ValueError(
            "reduction='none' is not allowed with free_bits_mode='batch' (free bits on the "
            "batch-mean KL is a batch-level objective); use free_bits_mode='sample' or "
            "another reduction"
        )


def check_strided(**tensors: Optional[torch.Tensor]) -> None:
    """Dense (strided) tensors only: the kernels read raw memory, and a sparse
    tensor failed deep inside with "unsupported memory format option"."""
    for name, t in tensors.items():
        if t is not None and t.layout != torch.strided:
            raise TypeError(
                f"{name} must be a dense (strided) tensor, got layout {t.layout}; "
                "convert it with .to_dense()"
            )


def _check_is_tensor(**tensors: Any) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_tensor_args(
    recon_input: Any,
    target: Any,
    mu: Any,
    logvar: Any,
    beta: Any,
    step: Any,
    likelihood: str,
    capacity: Any = None,
) -> None:
    """The tensor arguments, beta, step and capacity of elbo_loss (the options
    already checked by check_options): raises naming the first bad one.

    On the path of every call: the common case is a few attribute reads.
    """
    Tensor = torch.Tensor
    if not (
        isinstance(recon_input, Tensor)
        and isinstance(target, Tensor)
        and isinstance(mu, Tensor)
        and isinstance(logvar, Tensor)
    ):
        _check_is_tensor(recon_input=recon_input, target=target, mu=mu, logvar=logvar)
    strided = torch.strided
    if not (
        recon_input.layout is strided
        and target.layout is strided
        and mu.layout is strided
        and logvar.layout is strided
    ):
        check_strided(recon_input=recon_input, target=target, mu=mu, logvar=logvar)
    # is_cpu first: each .device read builds a torch.device.
    if not (recon_input.is_cpu and target.is_cpu and mu.is_cpu and logvar.is_cpu):
        device = mu.device
        if recon_input.device != device or target.device != device or logvar.device != device:
            raise ValueError(
                "recon_input, target, mu and logvar must be on one device, got "
                f"{recon_input.device}, {target.device}, {mu.device}, {logvar.device}"
            )
    mu_dtype, floats = mu.dtype, FLOAT_DTYPES
    if not (recon_input.dtype in floats and mu_dtype in floats and logvar.dtype is mu_dtype):
        _check_float_latents(recon_input, mu, logvar)
    mu_shape = mu.shape
    if len(mu_shape) != 2 or logvar.shape != mu_shape:
        _check_latent_shapes(mu, logvar)
    recon_shape = recon_input.shape
    kind = _TARGET_KIND.get(likelihood) or FAMILIES[likelihood].target
    if kind == "class_ids":
        _check_class_ids_target(recon_shape, target)
    elif kind == "counts":
        _check_counts_args(recon_input, target)
    else:
        _check_elementwise_target(recon_shape, target, likelihood, kind)
    batch = mu_shape[0]
    if recon_shape[0] != batch:
        raise ValueError(f"recon_input has batch size {recon_shape[0]} but mu has {batch}")
    if batch == 0:
        raise ValueError("the batch is empty (B = 0)")

    if step is None and capacity is None:
        # The common calls: a float or a 0-d tensor beta, no schedule. The
        # general checks below raise the same errors for these, later.
        if type(beta) is float:
            if not (0 <= beta < math.inf):  # comparisons: symbolic under torch.compile
                _check_real("beta", beta, positive=False)
            return
        if type(beta) is Tensor:
            _check_beta_tensor(beta, mu)
            return
    _check_beta_step_capacity(beta, step, capacity, mu)


# Each family's target kind (klanneal.likelihoods' table), for the check on every call.
_TARGET_KIND = {name: family.target for name, family in FAMILIES.items()}


def _check_float_latents(recon_input: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> None:
    """Floating-point recon_input, mu and logvar, logvar in mu's dtype."""
    floats = FLOAT_DTYPES
    for name, t in (("recon_input", recon_input), ("mu", mu), ("logvar", logvar)):
        if t.dtype not in floats:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}")
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have the dtype of mu ({mu.dtype}), got {logvar.dtype}")


def _check_latent_shapes(mu: torch.Tensor, logvar: torch.Tensor) -> None:
    """mu [B, D] and logvar of its shape."""
    if mu.dim() != 2:
        raise ValueError(f"mu must be 2-D [B, D], got shape {tuple(mu.shape)}")
    if logvar.shape != mu.shape:
        raise ValueError(
            f"logvar must have the shape of mu {tuple(mu.shape)}, got {tuple(logvar.shape)}"
        )


def _check_class_ids_target(recon_shape: torch.Size, target: torch.Tensor) -> None:
    """Logits [B, ..., V] and integer class ids [B, ...] (likelihood 'categorical')."""
    if len(recon_shape) < 2:
        raise ValueError(
            "recon_input must be logits [B, ..., V] for likelihood='categorical', got "
            f"shape {tuple(recon_shape)}"
        )
    target_dtype = target.dtype
    if target_dtype.is_floating_point or target_dtype.is_complex or target_dtype == torch.bool:
        raise TypeError(
            "target must be an integer tensor of class ids for likelihood='categorical', "
            f"got {target_dtype}"
        )
    if target_dtype == torch.uint64:
        # Ids >= 2**63 would wrap to negative int64 (2**64 - 100 to -100, ignored).
        raise TypeError("target: uint64 class ids are not supported; pass int64 class ids")
    if target.shape != recon_shape[:-1]:
        raise ValueError(
            f"target must have shape recon_input.shape[:-1] = {tuple(recon_shape[:-1])}"
            f" for likelihood='categorical', got {tuple(target.shape)}"
        )
    if recon_shape[-1] == 0:
        raise ValueError("recon_input has an empty class dimension (V = 0)")


def _check_elementwise_target(
    recon_shape: torch.Size, target: torch.Tensor, likelihood: str, kind: str
) -> None:
    """A floating-point target of recon_input's shape (bernoulli, gaussian, mse)."""
    if len(recon_shape) < 1:
        raise ValueError("recon_input must have a batch dimension [B, ...], got a 0-d tensor")
    if target.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"target must be a floating-point tensor for likelihood={likelihood!r}, "
            f"got {target.dtype}"
        )
    if target.shape != recon_shape:
        raise ValueError(
            f"target must have the shape of recon_input {tuple(recon_shape)} for "
            f"likelihood={likelihood!r}, got {tuple(target.shape)}"
        )
    if kind == "probabilities" and target.requires_grad:
        raise ValueError(
            "target requires grad, but klanneal.elbo_loss gives bernoulli targets no "
            "gradient; detach it (or use klanneal.elbo_loss_ref)"
        )


def _check_beta_step_capacity(beta: Any, step: Any, capacity: Any, mu: torch.Tensor) -> None:
    """beta (a number, a 0-d tensor or a schedule), step (with a schedule only)
    and capacity, beyond the common calls that check_tensor_args settles itself."""
    check_not_capacity(beta, "beta")
    check_capacity(capacity)
    if is_schedule(beta) or is_schedule(capacity):
        if step is None:
            what = "beta" if is_schedule(beta) else "capacity"
            raise ValueError(f"step is required when {what} is a schedule")
        if isinstance(step, torch.Tensor):
            dtype = step.dtype
            if step.dim() != 0 or not is_integer(dtype) or dtype == torch.uint64:
                raise TypeError(
                    "step must be an int or a 0-d integer tensor (not bool or uint64: the "
                    f"op's step is int64), got a tensor of shape {tuple(step.shape)} and "
                    f"dtype {dtype}{_one_element_hint(step)}"
                )
            if not step.is_cpu and step.device != mu.device:
                raise ValueError(f"step is on {step.device} but the inputs are on {mu.device}")
        elif as_step(step) < 0:
            raise ValueError(f"step must be >= 0, got {as_step(step)}")
    elif step is not None:
        raise ValueError(
            "step is only used when beta or capacity is a schedule (klanneal.schedules)"
        )
    if isinstance(beta, torch.Tensor):
        _check_beta_tensor(beta, mu)
    elif isinstance(beta, numbers.Real) and not isinstance(beta, bool):  # type: ignore[unreachable]
        _check_real("beta", beta, positive=False)
    elif not is_schedule(beta):
        raise TypeError(
            "beta must be a float, a 0-d tensor or a klanneal.schedules object (with `step`), "
            f"got {type(beta).__name__}"
        )


def _check_beta_tensor(beta: torch.Tensor, mu: torch.Tensor) -> None:
    if beta.dim() != 0 or not beta.dtype.is_floating_point:
        raise TypeError(
            "beta must be a float, a 0-d floating-point tensor or a klanneal.schedules "
            f"object, got a tensor of shape {tuple(beta.shape)} and dtype {beta.dtype}"
            f"{_one_element_hint(beta)}"
        )
    if not beta.is_cpu and beta.device != mu.device:
        raise ValueError(f"beta is on {beta.device} but the inputs are on {mu.device}")


def _one_element_hint(t: torch.Tensor) -> str:
    """For a one-element tensor of another shape, such as [1]: how to pass it.
    Refused rather than read as 0-d, like the schedules' steps: a [1] beta
    broadcasts elbo_loss_ref's loss to [1]."""
    return " (for a one-element tensor, pass t.reshape(()))" if t.numel() == 1 else ""


def check_not_capacity(schedule: Any, name: str) -> None:
    """A Capacity is a target KL, not a KL weight: refuse it as beta."""
    if isinstance(schedule, Capacity):
        raise TypeError(
            f"{name}: {schedule!r} is a capacity (a target KL in nats), not a KL weight; "
            "pass it as capacity=... (the objective beta * |KL - C|), with beta the weight "
            "(gamma in Burgess et al. 2018)"
        )


def check_capacity(capacity: Any) -> None:
    """None, a real number >= 0 or a schedule (evaluated at step)."""
    if capacity is None:
        return
    if is_schedule(capacity):
        if not capacity._native:
            raise TypeError(
                f"capacity: {capacity!r} is evaluated in Python; a capacity must be a "
                "closed-form schedule (klanneal.schedules.Capacity) or a float"
            )
        start, stop = capacity.to_params()[2:4]
        if min(start, stop) < 0:
            raise ValueError(f"capacity: {capacity!r} takes negative values; C must be >= 0")
        return
    if isinstance(capacity, torch.Tensor):
        raise TypeError(
            "capacity must be a float or a klanneal.schedules object (a tensor capacity is "
            "not supported: use a schedule with a step tensor under torch.compile)"
        )
    _check_real("capacity", capacity, positive=False)


def check_prior(
    mu: torch.Tensor, prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor]
) -> None:
    """A learned prior: both tensors or neither, each like mu."""
    if prior_mu is None and prior_logvar is None:
        return
    if prior_mu is None or prior_logvar is None:
        missing = "prior_mu" if prior_mu is None else "prior_logvar"
        raise ValueError(f"prior_mu and prior_logvar go together: {missing} is missing")
    for name, t in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_strided(**{name: t})
        if t.shape != mu.shape:
            raise ValueError(
                f"{name} must have the shape of mu {tuple(mu.shape)}, got {tuple(t.shape)}"
            )
        if t.dtype != mu.dtype:
            raise TypeError(f"{name} must have the dtype of mu ({mu.dtype}), got {t.dtype}")
        if t.device != mu.device:
            raise ValueError(f"{name} is on {t.device} but mu is on {mu.device}")


def check_free_bits_group(group: Any) -> Any:
    """None, "world" or a torch.distributed ProcessGroup; the group (None: none)."""
    if group is None:
        return None
    import torch.distributed as dist

    if isinstance(group, str):
        if group != "world":
            raise ValueError(
                f"free_bits_group must be None, 'world' or a ProcessGroup; got {group!r}"
            )
    elif not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            "free_bits_group must be None, 'world' or a torch.distributed ProcessGroup, got "
            f"{type(group).__name__}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "free_bits_group needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group)"
        )
    return group


def check_values(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    likelihood: str,
    ignore_index: int,
    beta: Optional[torch.Tensor],
    step: Optional[torch.Tensor],
    *,
    check_target: bool = True,
) -> None:
    """Value checks (they read the tensors; on a GPU they synchronise).

    With check_target=False the class ids / bernoulli targets are left to the
    caller: the CPU kernel checks them in its own pass over the data and the
    caller reports a bad one with `raise_invalid_target`. Meta tensors hold no
    values: theirs are not checked (shapes are, before).
    """
    if torch._C._are_functorch_transforms_active():
        # Under torch.func.vmap a branch on a batched tensor's values fails:
        # the checks read the values under the transforms' wrappers (every
        # example of vmap's batch). V comes from recon_input's logical shape.
        target, beta, step = (
            unwrap_functorch(target),
            unwrap_functorch(beta),
            unwrap_functorch(step),
        )
    check_target = check_target and not target.is_meta
    kind = FAMILIES[likelihood].target
    if check_target and kind == "class_ids":
        vocab = recon_input.shape[-1]
        bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
        if bool(bad.any()):
            raise_invalid_target(recon_input, target, likelihood, ignore_index, bad)
    elif check_target and kind == "probabilities":
        bad = ~((target >= 0) & (target <= 1))
        if bool(bad.any()):
            raise_invalid_target(recon_input, target, likelihood, ignore_index, bad)
    if beta is not None and not beta.is_meta:
        # detach: a learnable beta, read without a requires-grad warning;
        # min: several values under vmap only (NaN first: min propagates it).
        values = beta.detach()
        value = float(values if values.numel() == 1 else values.min())
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"beta must be finite and >= 0, got {value}")
    if step is not None and not step.is_meta:
        first = int(step if step.numel() == 1 else step.min())
        if first < 0:
            raise ValueError(f"step must be >= 0, got {first}")


def _check_counts_args(recon_input: torch.Tensor, target: torch.Tensor) -> None:
    """A count family's mean [B, ...] and counts of its shape (any real dtype)."""
    if recon_input.dim() < 1:
        raise ValueError("recon_input must have a batch dimension [B, ...], got a 0-d tensor")
    dtype = target.dtype
    if dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"target must hold counts (a float or integer tensor), got {dtype}")
    if target.shape != recon_input.shape:
        raise ValueError(
            f"target must have the shape of recon_input {tuple(recon_input.shape)} (the "
            f"counts of each mean), got {tuple(target.shape)}"
        )
    if target.requires_grad:
        raise ValueError("target requires grad, but counts get no gradient; detach it")


def unwrap_functorch(t: Any) -> Any:
    """The tensor under t's torch.func wrappers (vmap's batched tensor holds
    every example's values), or t itself when it has none."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    while isinstance(t, torch.Tensor) and wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def raise_invalid_target(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    likelihood: str,
    ignore_index: int,
    where: Union[int, torch.Tensor],
) -> NoReturn:
    """Raises the ValueError for an invalid class id or bernoulli target.

    Args:
        recon_input: the op's recon_input (categorical: gives V).
        target: the op's target.
        likelihood: "categorical" or "bernoulli".
        ignore_index: the categorical ignore_index.
        where: the flat index of the first invalid target, or a boolean
            mask of the invalid ones (the first in flat order is reported).
    """
    flat = target.reshape(-1)
    first = flat[where] if isinstance(where, int) else target[where].reshape(-1)[0]
    if likelihood == "categorical":
        raise ValueError(
            f"target: class ids must lie in [0, {recon_input.shape[-1]}) or equal ignore_index="
            f"{ignore_index}; found {int(first)}"
        )
    raise ValueError(f"target: bernoulli targets must lie in [0, 1]; found {float(first)}")
