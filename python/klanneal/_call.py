"""One klanneal.elbo_loss call, described once: :class:`ElboCall`.

``elbo_call`` turns the public arguments (of ``elbo_loss``, ``nn.ELBOLoss``
and the KL term of ``linear_elbo_loss``) into an ElboCall. It runs every
check once, in one order; resolves beta and the capacity into one type,
:class:`Weight` (a constant, a 0-d tensor, or schedule parameters at the
call's step tensor: the C++ ``KlWeight`` in csrc/include/klanneal/elbo.h);
works out which gradients are wanted; and picks the path:

  eager      the native kernel called directly, the loss attached by a plain
             autograd.Function (_eager.py)
  traced     the registered op and its registered autograd (torch.compile)
  inplace    the inplace op: recon_input's buffer becomes its gradient
  reference  elbo_loss_ref, plain PyTorch and autograd: devices without a
             kernel, torch.func transforms, forward-mode AD, and likelihood
             or KL families registered as reference-only

``ElboCall.run`` executes it. docs/architecture.md follows one call through.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from klanneal import _validate, kl_terms
from klanneal._count_op import count_recon, native_count_kernel
from klanneal._count_ref import check_count_values
from klanneal._eager import eager_elbo, eager_need, eager_plan, elbo_loss_inplace, elbo_loss_traced
from klanneal._host_schedules import FromArray, HostSchedule, resolve_host_beta
from klanneal._kernels import native_available
from klanneal._layout import (
    FULL_PRECISION,
    ElboOptions,
    OpInputs,
    elbo_options,
    result_dtype,
)
from klanneal.likelihoods import FAMILIES, Likelihood
from klanneal.likelihoods import resolve as resolve_likelihood
from klanneal.reference import ELBOOutput, elbo_loss_ref

EAGER, TRACED, INPLACE, REFERENCE, COUNTS = "eager", "traced", "inplace", "reference", "counts"

_Tensor = torch.Tensor


class Weight(NamedTuple):
    """beta or the capacity as the kernel takes it (the C++ ``KlWeight``):
    ``tensor`` (a 0-d float64 tensor on the inputs' device) if set, else
    ``schedule`` (ScheduleParams, evaluated at the call's step tensor) if
    set, else ``value``."""

    value: float = 0.0
    tensor: Optional[torch.Tensor] = None
    schedule: Optional[tuple[float, ...]] = None


class ElboCall:
    """A checked elbo_loss call: its path and everything that path needs.

    path: EAGER, TRACED, INPLACE or REFERENCE; options: the scalar options;
    op: the op's inputs (OpInputs: contiguous tensors, beta's tensor, the
    step tensor, the packed floats and ints); plan: the eager path's
    EagerPlan; reference: elbo_loss_ref's keyword arguments (REFERENCE).
    """

    __slots__ = ("path", "options", "op", "plan", "reference")

    def __init__(
        self,
        path: str,
        options: ElboOptions,
        op: Optional[OpInputs] = None,
        plan: Any = None,
        reference: Optional[dict[str, Any]] = None,
    ) -> None:
        self.path, self.options, self.op = path, options, op
        self.plan, self.reference = plan, reference

    def run(self) -> ELBOOutput:
        """Runs the call: loss, recon, kl, kl_per_dim, beta (elbo_loss's result)."""
        op = self.op
        if self.path is EAGER:
            return ELBOOutput(*eager_elbo(self.plan, self.options, op))  # type: ignore[arg-type]
        if self.path is REFERENCE:
            return _run_reference(self.options, self.reference)  # type: ignore[arg-type]
        if self.path is COUNTS:
            return _run_counts(self.options, self.reference)  # type: ignore[arg-type]
        assert op is not None
        outs = (elbo_loss_inplace if self.path is INPLACE else elbo_loss_traced)(*op)
        dtype = result_dtype(op.recon_input.dtype, op.mu.dtype)
        return ELBOOutput(
            outs.loss.to(dtype),
            outs.recon.detach().to(dtype),
            outs.kl.detach().to(dtype),
            outs.kl_per_dim.detach().to(dtype),
            outs.beta.detach().to(dtype),
        )


def elbo_call(
    recon_input: Any, target: Any, mu: Any, logvar: Any, beta: Any, step: Any,
    likelihood: Any, reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any,
    gaussian_var: Any, prior_mu: Any, prior_logvar: Any, capacity: Any, free_bits_group: Any,
    inplace: Any, validate: Any, prior: Any = None,
) -> ElboCall:  # fmt: skip
    """The ElboCall of elbo_loss's arguments (their meaning: its docstring).

    Every check runs here, in this order: beta's form, the likelihood and
    options, inplace, the tensors with beta / step / capacity, the prior,
    the process group, inplace's target. Raises TypeError / ValueError
    naming the first bad argument.
    """
    # A tensor that escaped a finished torch.func transform (a dead wrapper,
    # without storage) is used as the tensor it wraps, as Function.apply does.
    recon_input, target, mu, logvar = (
        _UNWRAP_IF_DEAD(t) if isinstance(t, _Tensor) else t
        for t in (recon_input, target, mu, logvar)
    )
    if type(beta) is not float and type(beta) is not _Tensor:
        beta, step = _host_beta(beta, step, capacity, mu)
    family = likelihood
    compiling = torch.compiler.is_compiling()
    if type(likelihood) is str:
        options = elbo_options(
            likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
        )
    else:
        likelihood, gaussian_var = resolve_likelihood(likelihood, gaussian_var)
        options = _family_options(
            family, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
        )
    if inplace is not False:
        inplace = _validate.check_flag("inplace", inplace)
    _validate.check_tensor_args(recon_input, target, mu, logvar, beta, step, likelihood, capacity)
    kl_native = True
    if prior is not None or prior_mu is not None or prior_logvar is not None:
        term = kl_terms.resolve(prior, prior_mu, prior_logvar)  # the KL-term table's object
        term.check(mu)
        kl_native = term.native
        prior = None if kl_native else term  # a reference-only family goes whole
        prior_mu, prior_logvar = term.tensors().get("prior_mu"), term.tensors().get("prior_logvar")
    group = None if free_bits_group is None else _validate.check_free_bits_group(free_bits_group)
    if inplace and _overwrites_a_leaf(recon_input):
        raise ValueError(
            "inplace=True would overwrite recon_input, a leaf tensor that requires grad (or a "
            "view of one, whose storage it shares); use inplace=False"
        )
    transforms = not compiling and (_TRANSFORMS_ACTIVE() or _FORWARD_AD._current_level >= 0)
    if (
        not FAMILIES[likelihood].native
        or not kl_native
        or not native_available(None if recon_input.is_cpu else recon_input.device)
        or transforms  # reference_only(), with compiling read once
    ):
        reference = dict(
            recon_input=recon_input, target=target, mu=mu, logvar=logvar, beta=beta, step=step,
            likelihood=family if isinstance(family, Likelihood) else likelihood,
            prior_mu=prior_mu, prior_logvar=prior_logvar, capacity=capacity, free_bits_group=group,
        )  # fmt: skip
        if prior is not None:
            reference["prior"] = prior
        counts = FAMILIES[likelihood].target == "counts" and kl_native and not transforms
        return ElboCall(COUNTS if counts else REFERENCE, options, reference=reference)
    return _native_call(
        options, recon_input, target, mu, logvar, beta, step, prior_mu, prior_logvar, capacity,
        group, inplace, compiling,
    )  # fmt: skip


def kl_term_call(
    mu: Any, logvar: Any, beta: Any, step: Any, like: torch.Tensor, reduction: Any,
    free_bits: Any, free_bits_mode: Any, ignore_index: Any, prior_mu: Any, prior_logvar: Any,
    capacity: Any, free_bits_group: Any, validate: Any, prior: Any = None,
) -> ElboCall:  # fmt: skip
    """The ElboCall of the KL term alone, beta times KL under the reduction,
    with every check and option of elbo_loss's KL term (linear_elbo_loss's:
    its reconstruction is an op of its own). The fused kernel runs on a call
    without reconstruction elements (categorical logits [B, 0, 1] in like's
    dtype, B = like.shape[0]), for which it computes only the KL part."""
    batch = like.shape[0]
    no_recon = like.new_empty((batch, 0, 1)).detach()
    no_target = torch.empty((batch, 0), dtype=torch.int64, device=like.device)
    return elbo_call(
        no_recon, no_target, mu, logvar, beta, step, "categorical", reduction, free_bits,
        free_bits_mode, ignore_index, 1.0, prior_mu, prior_logvar, capacity, free_bits_group,
        False, validate, prior,
    )  # fmt: skip


def _native_call(
    options: ElboOptions, recon_input: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
    logvar: torch.Tensor, beta: Any, step: Any, prior_mu: Optional[torch.Tensor],
    prior_logvar: Optional[torch.Tensor], capacity: Any, group: Any, inplace: bool,
    compiling: bool,
) -> ElboCall:  # fmt: skip
    """The ElboCall of checked arguments on the fused kernel's path."""
    if options.likelihood != "categorical" and target.dtype != recon_input.dtype:
        # Promote, as torch's losses do: casting the target down to the
        # predictions' dtype loses it (an fp32 target 0.5004 is 0.5 in bf16).
        common = torch.promote_types(recon_input.dtype, target.dtype)
        recon_input, target = recon_input.to(common), target.to(common)
    step_tensor: Optional[torch.Tensor] = None
    if type(step) is _Tensor or isinstance(step, _Tensor):
        if not compiling and step.is_cpu and recon_input.is_cpu:
            step = _cpu_step(step)  # eager on the CPU: read as a number
        else:
            step_tensor = step.detach().to(device=recon_input.device, dtype=torch.int64).reshape(())
    elif compiling and type(step) is int:
        # A Python int step under torch.compile: a tensor inside the graph,
        # so that a new step is not a new constant (a recompile per step).
        step_tensor = torch.tensor(step, dtype=torch.int64)
    beta_weight = beta_as_weight(beta, step, step_tensor, options.validate, compiling, recon_input)
    capacity_weight = None if capacity is None else _capacity_weight(capacity, step, step_tensor)
    # is_grad_enabled() is False inside the op: the caller decides which
    # gradients the forward pass computes.
    if torch.is_grad_enabled():
        beta_tensor = beta_weight.tensor
        requires = (
            recon_input.requires_grad, target.requires_grad, mu.requires_grad,
            logvar.requires_grad, beta_tensor is not None and beta_tensor.requires_grad,
            prior_mu is not None and prior_mu.requires_grad,
            prior_logvar is not None and prior_logvar.requires_grad,
        )  # fmt: skip
    else:
        requires = _UNTRACKED
    plan = None
    if compiling:
        need = eager_need(requires)
    else:
        plan = eager_plan(requires, recon_input.dtype, mu.dtype, options.reduction)
        need = plan.asked
    floats, ints = options.packed(
        beta_weight, capacity_weight, step_tensor is not None, need, compiling
    )
    if options.likelihood == "categorical" and target.dtype != torch.int64:
        target = target.to(torch.int64)
    global_mean = None
    if group is not None:
        global_mean = _global_mean(options, mu, logvar, prior_mu, prior_logvar, group)
    if prior_mu is not None:
        prior_mu, prior_logvar = prior_mu.contiguous(), prior_logvar.contiguous()  # type: ignore[union-attr]
    op = _NEW_TUPLE(OpInputs, (
        recon_input.contiguous(), target.contiguous(), mu.contiguous(), logvar.contiguous(),
        beta_weight.tensor, step_tensor, floats, ints, prior_mu, prior_logvar, global_mean,
    ))  # fmt: skip
    # fp16/bf16 gradients are kept in fp32 until backward (loss scaling), so
    # they cannot be written over a half-precision recon_input: inplace is a
    # no-op for those dtypes.
    if inplace and need[0] and recon_input.dtype in FULL_PRECISION:
        if not compiling:
            _check_output_not_saved(op.recon_input)  # a copy if it was not contiguous
        return ElboCall(INPLACE, options, op)
    return ElboCall(TRACED if compiling else EAGER, options, op, plan)


_UNTRACKED = (False,) * 7
_UNWRAP_IF_DEAD = getattr(torch._C._functorch, "unwrap_if_dead", lambda t: t)
_NEW_TUPLE = tuple.__new__  # OpInputs(...) without its Python __new__ (per call)


def beta_as_weight(
    beta: Any, step: Any, step_tensor: Any, validate: bool, compiling: bool, like: torch.Tensor
) -> Weight:
    """beta (checked: a float, a 0-d tensor, a schedule or a real number) as
    the kernel takes it. Eager on the CPU, a CPU tensor that does not require
    grad is read as a number (cheaper than the float64 copy it would
    otherwise need); under torch.compile a number becomes a float64 tensor
    (a new value is an input, not a recompile). A schedule at an int step is
    evaluated here, at a step tensor inside the op."""
    if type(beta) is float and not compiling:
        return Weight(beta)
    if isinstance(beta, _Tensor):
        if not compiling and beta.is_cpu and like.is_cpu and not beta.requires_grad:
            value = beta.item()  # float(beta) is this, through Tensor.__float__
            if validate and not (value >= 0 and value < _INF):
                _validate.check_beta_value(value, "a beta tensor")
            return Weight(value)
        # Not detached: a beta that requires grad gets d loss / d beta through the op.
        return Weight(tensor=beta.to(device=like.device, dtype=torch.float64).reshape(()))
    if _validate.is_schedule(beta):
        if step_tensor is None:
            step_int = _validate.as_step(step)
            return Weight(_validate.check_scheduled_beta(float(beta(step_int)), beta, step_int))
        _validate.check_schedule_range(beta)
        return Weight(schedule=beta._params_tuple)
    if compiling and type(beta) in (float, int):
        # A Python number under torch.compile (beta = float(schedule(step)) in
        # a compiled step): a float64 tensor, so that a new value is an
        # input, not a recompile (check_tensor_args' comparisons guard its range).
        return Weight(tensor=torch.tensor(beta, dtype=torch.float64))
    return Weight(_validate.as_float(beta))  # a real number (check_tensor_args)


_INF = float("inf")


def _capacity_weight(capacity: Any, step: Any, step_tensor: Optional[torch.Tensor]) -> Weight:
    """The capacity C (checked: a number or a closed-form schedule) as the
    kernel takes it: a schedule at a step tensor, else its value."""
    if not _validate.is_schedule(capacity):
        return Weight(_validate.as_float(capacity))
    if step_tensor is not None:
        return Weight(schedule=capacity._params_tuple)
    return Weight(float(capacity(_validate.as_step(step))))


def _host_beta(beta: Any, step: Any, capacity: Any, mu: Any) -> tuple[Any, Any]:
    """beta and step with the host-evaluated forms resolved: a list or 1-D
    array of values per step (read as FromArray; build that once instead)
    and the schedules evaluated in Python (their value at the step, a float
    or a 0-d tensor at a step tensor; the step then stays only for a
    capacity schedule)."""
    if isinstance(beta, (list, tuple)) or (isinstance(beta, np.ndarray) and beta.ndim == 1):
        beta = FromArray(beta)
    if isinstance(beta, HostSchedule):
        beta = resolve_host_beta(beta, step, mu.device if isinstance(mu, _Tensor) else None)
        if not _validate.is_schedule(capacity):
            step = None
    return beta, step


def _family_options(
    family: Any, reduction: Any, free_bits: Any, free_bits_mode: Any, ignore_index: Any,
    gaussian_var: Any, validate: Any,
) -> ElboOptions:  # fmt: skip
    """The options of a call whose likelihood came as a klanneal.likelihoods
    object (it carries the parameters its family needs)."""
    if not FAMILIES[family.name].native:
        _validate.check_options(
            family.name, reduction, free_bits, free_bits_mode, ignore_index, 1.0,
            with_params=True,
        )  # fmt: skip
        return ElboOptions(
            family.name, reduction, _validate.as_float(free_bits), free_bits_mode,
            int(ignore_index), 1.0, _validate.check_flag("validate", validate),
        )  # fmt: skip
    return elbo_options(
        family.name, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
    )


def _cpu_step(step: torch.Tensor) -> int:
    """A CPU step tensor's value, read eagerly (check_tensor_args has checked
    its shape and dtype)."""
    value = int(step)
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _global_mean(
    options: ElboOptions, mu: torch.Tensor, logvar: torch.Tensor,
    prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor], group: Any,
) -> Optional[torch.Tensor]:  # fmt: skip
    """Batch free bits across processes: the per-dimension batch mean of
    KL_bd over the global batch (None without batch free bits)."""
    if not (options.free_bits > 0 and options.free_bits_mode == "batch"):
        return None
    from klanneal.reference import global_kl_per_dim, kl_per_element, widen

    with torch.no_grad():
        # KL_bd in the kernels' arithmetic type (float32 for fp16/bf16
        # latents, which rounded every step of it), summed in float64.
        kl_bd = kl_per_element(widen(mu), widen(logvar), widen(prior_mu), widen(prior_logvar))
        return global_kl_per_dim(kl_bd, group).contiguous()


def _run_reference(options: ElboOptions, args: dict[str, Any]) -> ELBOOutput:
    """A REFERENCE call: the value checks (eager), then elbo_loss_ref."""
    beta, step = args["beta"], args["step"]
    if options.validate and not torch.compiler.is_compiling():
        recon_input, target = args["recon_input"], args["target"]
        likelihood = args["likelihood"]
        if isinstance(likelihood, Likelihood):
            check_count_values(recon_input, target, **likelihood.tensors())
        _validate.check_values(
            recon_input, target, options.likelihood, options.ignore_index,
            beta if isinstance(beta, _Tensor) else None,
            step if isinstance(step, _Tensor) else None,
            check_target=FAMILIES[options.likelihood].native,
        )  # fmt: skip
    if _validate.is_schedule(beta) and not isinstance(step, _Tensor):
        step_int = _validate.as_step(step)
        _validate.check_scheduled_beta(beta(step_int), beta, step_int)
    batch_free_bits = options.free_bits > 0 and options.free_bits_mode == "batch"
    if not batch_free_bits:
        args = dict(args, free_bits_group=None)
    return elbo_loss_ref(
        reduction=options.reduction, free_bits=options.free_bits,
        free_bits_mode=options.free_bits_mode, ignore_index=options.ignore_index,
        gaussian_var=options.gaussian_var, **args,
    )  # fmt: skip


def _run_counts(options: ElboOptions, args: dict[str, Any]) -> ELBOOutput:
    """A COUNTS call: the count family's reconstruction op (klanneal._count_op)
    plus the KL term of the same arguments (kl_term_call)."""
    recon_input, target, family = args["recon_input"], args["target"], args["likelihood"]
    # A name reaches here only for a family without parameters (Poisson): the
    # others refuse their name (check_options), nn.ELBOLoss keeps their object.
    params = family.tensors() if isinstance(family, Likelihood) else {}
    if options.validate and not torch.compiler.is_compiling():
        # The values themselves are checked by the native kernel, in its pass.
        values = not native_count_kernel(recon_input.device)
        check_count_values(recon_input, target, values, **params)
        beta, step = args["beta"], args["step"]
        _validate.check_values(
            recon_input, target, options.likelihood, -100,
            beta if isinstance(beta, _Tensor) else None,
            step if isinstance(step, _Tensor) else None, check_target=False,
        )  # fmt: skip
    kl_out = kl_term_call(
        args["mu"], args["logvar"], args["beta"], args["step"], recon_input, options.reduction,
        options.free_bits, options.free_bits_mode, -100, args["prior_mu"],
        args["prior_logvar"], args["capacity"], args["free_bits_group"], options.validate,
    ).run()  # fmt: skip
    recon = count_recon(
        recon_input, target, options.likelihood, params.get("theta"), params.get("zi_logits"),
        options.reduction, options.validate,
    ).to(kl_out.loss.dtype)  # fmt: skip
    return ELBOOutput(
        kl_out.loss + recon, recon.detach(), kl_out.kl, kl_out.kl_per_dim, kl_out.beta
    )


def _overwrites_a_leaf(recon_input: torch.Tensor) -> bool:
    """recon_input is, or is a view of, a leaf that requires grad.

    Writing into a view of a parameter writes the parameter (torch itself
    refuses ``p.view(...).mul_(2)``): every tensor up the ``_base`` chain
    shares the storage.
    """
    t: Optional[torch.Tensor] = recon_input
    while t is not None:
        if t.is_leaf and t.requires_grad:
            return True
        t = t._base
    return False


def _check_output_not_saved(recon_input: torch.Tensor) -> None:
    """Refuses to overwrite an output its producing op saved for its own
    backward (log_softmax, softmax, exp, sigmoid, tanh: their gradient is a
    function of their result), or a view of one: autograd would fail later
    with its generic "modified by an inplace operation". Such a node has a
    ``_saved_result`` attribute on its class (read there: the instance's
    would unpack the saved tensor).
    """
    t: Optional[torch.Tensor] = recon_input
    while t is not None:
        node = t.grad_fn
        if node is not None and hasattr(type(node), "_saved_result"):
            name = type(node).__name__
            op = name[: -len("Backward0")] if name.endswith("Backward0") else name
            raise ValueError(
                f"inplace=True would overwrite recon_input, the output of {op} ({name}), which "
                "that op saved for its own backward, so the backward would fail. Use "
                "inplace=False; or, for a categorical decoder that ends in log_softmax, drop "
                "that layer and pass the logits (the same loss and gradients, and the faster "
                "path)"
            )
        t = t._base


def reference_only() -> bool:
    """A torch.func transform (grad, vmap, jacrev, ...) is running or a
    torch.autograd.forward_ad dual level is open (eager only: torch.compile
    traces the op itself). The fused op has no batching rule and no
    forward-mode derivative; the reference's plain PyTorch ops have both, so
    dual tensors get their tangents."""
    return not torch.compiler.is_compiling() and (
        _TRANSFORMS_ACTIVE() or _FORWARD_AD._current_level >= 0
    )


_FORWARD_AD: Any = torch.autograd.forward_ad
_TRANSFORMS_ACTIVE = torch._C._are_functorch_transforms_active
