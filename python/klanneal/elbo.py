"""klanneal.elbo_loss: reconstruction + beta * Gaussian KL in one fused op."""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import numpy as np
import torch

from klanneal import _ops, _validate
from klanneal._host_schedules import FromArray, HostSchedule, resolve_host_beta
from klanneal.likelihoods import FAMILIES, Likelihood
from klanneal.likelihoods import resolve as resolve_likelihood
from klanneal.reference import ELBOOutput, elbo_loss_ref
from klanneal.schedules import Schedule

__all__ = ["ELBOOutput", "elbo_loss"]


def elbo_loss(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Union[float, torch.Tensor, Schedule] = 1.0,
    *,
    step: Optional[Union[int, torch.Tensor]] = None,
    likelihood: str = "categorical",
    reduction: str = "batchmean",
    free_bits: float = 0.0,
    free_bits_mode: str = "batch",
    ignore_index: int = -100,
    gaussian_var: float = 1.0,
    prior_mu: Optional[torch.Tensor] = None,
    prior_logvar: Optional[torch.Tensor] = None,
    capacity: Union[None, float, Schedule] = None,
    free_bits_group: Any = None,
    inplace: bool = False,
    validate: bool = True,
) -> ELBOOutput:
    """Negative ELBO: reconstruction NLL + beta * KL(q(z|x) || p(z)).

    Per element, the reconstruction term is: categorical
    logsumexp(x) - x[target]; bernoulli the binary cross-entropy with logits
    (soft targets in [0, 1] allowed); gaussian
    0.5 * ((x - target)^2 / gaussian_var + log(2 pi gaussian_var)); mse
    (x - target)^2. The KL of example b and latent dimension d is, from the
    default prior N(0, I), KL_bd = -0.5 * (1 + logvar_bd - mu_bd^2 - exp(logvar_bd)),
    and from a learned prior N(prior_mu, exp(prior_logvar)) (a conditional
    VAE's prior network) KL_bd = 0.5 * (plv - lv + (exp(lv) + (mu - pmu)^2) / exp(plv) - 1).

    Reductions over the batch of B examples:
      - "batchmean": (sum of all recon terms + beta * KL term) / B, the
        per-example ELBO (the convention of the cyclical-annealing paper's code);
      - "sum": the same without / B;
      - "none": the per-example vector [B].
    The KL term is sum_{b,d} KL_bd. With free bits lambda > 0 it is
    B * sum_d max(lambda, mean_b KL_bd) in "batch" mode (Kingma et al. 2016)
    and sum_b sum_d max(lambda, KL_bd) in "sample" mode. With a capacity C
    (Burgess et al. 2018) the KL term t becomes |t - C|: |t_b - C| per
    example for "none", B * |t / B - C| for "batchmean" and "sum" (so
    batchmean = recon / B + beta * |mean KL - C|, beta playing gamma).

    Args:
        recon_input: categorical: logits [B, ..., V]; bernoulli: logits [B, ...];
            gaussian/mse: means [B, ...]. float32, float64, float16 or bfloat16
            (half types are computed in float32).
        target: categorical: integer class ids [B, ...] (not uint64); otherwise
            floats of the shape of recon_input (promoted with it to a common
            dtype). A gaussian/mse target may require grad (a loss between two
            model outputs); a bernoulli one may not.
        mu: [B, D] mean of q(z|x).
        logvar: [B, D] log-variance of q(z|x), same dtype as mu.
        beta: KL weight: a float, a 0-d tensor (no torch.compile recompiles as
            its value changes; one that requires grad, a learnable beta as in
            GECO, gets d loss / d beta, the KL term) or a klanneal.schedules
            object evaluated at `step` (not a Capacity: pass that as `capacity`),
            or a list / 1-D numpy array of beta per step (read as
            ``klanneal.schedules.FromArray``, rebuilt on every call: build
            that once instead).
        step: int or 0-d integer tensor; required with a schedule (beta or
            capacity), not allowed otherwise.
        likelihood: "categorical", "bernoulli", "gaussian" or "mse", or a
            ``klanneal.likelihoods`` object carrying the family's parameters
            (``Gaussian(var=0.5)`` is ``"gaussian"`` with ``gaussian_var=0.5``).
            The count families of single-cell VAEs, ``Poisson()``,
            ``NegativeBinomial(theta)`` and
            ``ZeroInflatedNegativeBinomial(theta, zi_logits)`` (recon_input:
            the means mu > 0, [B, G]; target: the counts, any real dtype;
            theta, zi_logits: floats or tensors broadcastable to [B, G], which
            get their gradients), run on the reference path (plain PyTorch,
            autograd) until their fused kernels land.
        reduction: "batchmean", "sum" or "none" ("none" is not allowed with
            free_bits > 0 in "batch" mode, a batch-level objective).
        free_bits: lambda in nats per latent dimension; 0 disables.
        free_bits_mode: "batch" or "sample" (see above).
        ignore_index: categorical target value whose positions contribute nothing.
        gaussian_var: the fixed variance of the gaussian likelihood (> 0).
        prior_mu, prior_logvar: [B, D] mean and log-variance of a learned
            diagonal-Gaussian prior (both or neither; mu's dtype and device);
            None: N(0, I). Both get gradients.
        capacity: None, a float C >= 0, or a schedule (klanneal.schedules.Capacity)
            evaluated at `step`: the capacity objective above.
        free_bits_group: None, "world" or a torch.distributed ProcessGroup:
            with batch free bits, the per-dimension batch mean is all-reduced
            over the group before the clamp (like SyncBatchNorm), so that
            under DistributedDataParallel the gradients equal those of one
            process on the global batch (docs/elbo.md, "Data-parallel
            training"). recon, kl and kl_per_dim stay this process's.
        inplace: write the gradient w.r.t. recon_input into recon_input's own
            buffer (saves a logits-sized allocation; fp32/fp64 only, a no-op
            for fp16/bf16, whose gradients are kept in fp32). recon_input is
            overwritten whenever a gradient for it is computed; it must not be
            a leaf that requires grad or a view of one, nor the output of an op
            that saved it for its own backward (log_softmax, softmax, exp,
            sigmoid, tanh) or a view of one, nor be needed afterwards.
        validate: check class ids / bernoulli targets / tensor beta and step
            values (a device sync on GPU). With validate=False the kernel
            still never reads out of bounds: a row with a bad class id gets a
            NaN loss. inplace and validate are bools (numpy bools accepted):
            anything else, such as the string "False", is a TypeError. Meta
            tensors hold no values: validate checks only their shapes.

    Returns:
        ELBOOutput(loss, recon, kl, kl_per_dim, beta): loss is differentiable
        w.r.t. recon_input, mu and logvar (0-d, or [B] for "none"); recon and
        kl are the two terms under the same reduction (kl before free bits),
        kl_per_dim the [D] batch-mean KL, beta the weight used (the float64
        beta, e.g. ``schedule(step)``, rounded to the results' dtype like
        them: for fp32 inputs it equals ``float32(schedule(step))``, not
        ``schedule(step)``); all in the
        dtype promote_types(recon_input.dtype, mu.dtype), float32 at least
        (fp16/bf16 inputs give float32 results, accumulated in fp32, as
        autocast does for losses). Gradients have the dtype of their input;
        for fp16/bf16 inputs they are kept in fp32 until backward applies the
        upstream gradient, so a GradScaler's loss scale cannot underflow or
        overflow them (docs/elbo.md, "Mixed precision").

    Raises:
        TypeError: an argument of the wrong type, dtype or layout (a sparse
            tensor), or a beta or step tensor that is not 0-d.
        ValueError: mismatched shapes or devices, an empty batch or class
            dimension, an out-of-range value (class id, bernoulli target,
            negative or non-finite beta / free_bits / gaussian_var), an unknown
            option, a schedule without `step`, or inplace=True on a leaf that
            requires grad or on an output that its op saved for its backward.
    """
    given: Any = beta  # lists and arrays are accepted though not in the annotation
    if isinstance(given, (list, tuple)) or (isinstance(given, np.ndarray) and given.ndim == 1):
        beta = FromArray(given)  # a table of values per step (build it once: FromArray)
    if isinstance(beta, HostSchedule):
        # A table, an offset or another schedule evaluated in Python: its
        # value at the step (a float, or a 0-d tensor at a step tensor) is
        # the beta the op sees; the step stays only for a capacity schedule.
        beta = resolve_host_beta(beta, step, mu.device if isinstance(mu, torch.Tensor) else None)
        if not _validate.is_schedule(capacity):
            step = None
    if type(likelihood) is not str:  # a klanneal.likelihoods object
        if isinstance(likelihood, Likelihood) and not FAMILIES[likelihood.name].native:
            return _reference_family(
                recon_input, target, mu, logvar, beta, step, likelihood, reduction, free_bits,
                free_bits_mode, prior_mu, prior_logvar, capacity, free_bits_group, validate,
            )  # fmt: skip
        likelihood, gaussian_var = resolve_likelihood(likelihood, gaussian_var)
    options = _ops.elbo_options(
        likelihood, reduction, free_bits, free_bits_mode, ignore_index, gaussian_var, validate
    )
    if inplace is not False:
        inplace = _validate.check_flag("inplace", inplace)
    _validate.check_tensor_args(recon_input, target, mu, logvar, beta, step, likelihood, capacity)
    if (
        capacity is None
        and prior_mu is None
        and prior_logvar is None
        and free_bits_group is None
        and not inplace
        and recon_input.is_cpu
        and (likelihood == "categorical" or target.dtype == recon_input.dtype)
        and not torch.compiler.is_compiling()
        and _ops.native_available(None)
        and not _reference_only()
    ):
        result = _common_cpu_call(options, recon_input, target, mu, logvar, beta, step)
        if result is not None:
            return result
    has_prior = prior_mu is not None or prior_logvar is not None
    if has_prior:
        _validate.check_prior(mu, prior_mu, prior_logvar)
    group = None if free_bits_group is None else _validate.check_free_bits_group(free_bits_group)
    if inplace and _overwrites_a_leaf(recon_input):
        raise ValueError(
            "inplace=True would overwrite recon_input, a leaf tensor that requires grad (or a "
            "view of one, whose storage it shares); use inplace=False"
        )
    if likelihood != "categorical" and target.dtype != recon_input.dtype:
        # Promote, as torch's losses do: casting the target down to the
        # predictions' dtype loses it (an fp32 target 0.5004 is 0.5 in bf16).
        common = torch.promote_types(recon_input.dtype, target.dtype)
        recon_input, target = recon_input.to(common), target.to(common)
    compiling = torch.compiler.is_compiling()
    if compiling and isinstance(step, int) and not isinstance(step, bool):
        # A Python int step under torch.compile: a tensor inside the graph,
        # evaluated by the op, so that a new step is not a new constant (a
        # recompile per step).
        step = torch.tensor(step, dtype=torch.int64)
    if compiling and type(beta) in (float, int):
        # A Python number beta likewise (beta = float(schedule(step)) in a
        # compiled step): a float64 tensor, so that a new value is an input,
        # not a recompile (check_tensor_args' comparisons guard its range).
        beta = torch.tensor(beta, dtype=torch.float64)
    batch_free_bits = options.free_bits > 0 and free_bits_mode == "batch"
    on_cpu = recon_input.is_cpu  # cheaper than .device, which builds a torch.device
    if not _ops.native_available(None if on_cpu else recon_input.device) or _reference_only():
        # torch.func transforms (grad, vmap), forward-mode AD and devices
        # without a kernel take the reference: plain PyTorch ops, which every
        # transform supports.
        # Value checks read the tensors: skipped while torch.compile traces.
        if validate and not compiling:
            _validate.check_values(
                recon_input,
                target,
                likelihood,
                ignore_index,
                beta if isinstance(beta, torch.Tensor) else None,
                step if isinstance(step, torch.Tensor) else None,
            )
        if _validate.is_schedule(beta) and not isinstance(step, torch.Tensor):
            step_int = _validate.as_step(step)
            _validate.check_scheduled_beta(beta(step_int), beta, step_int)
        return elbo_loss_ref(
            recon_input, target, mu, logvar, beta, step=step, likelihood=likelihood,
            reduction=reduction, free_bits=free_bits, free_bits_mode=free_bits_mode,
            ignore_index=ignore_index, gaussian_var=gaussian_var, prior_mu=prior_mu,
            prior_logvar=prior_logvar, capacity=capacity,
            free_bits_group=group if batch_free_bits else None,
        )  # fmt: skip

    # Beta and the capacity reach the kernel as one of: a number (beta_value,
    # a constant capacity schedule), a beta tensor, or schedule parameters
    # evaluated at a step tensor (ElboParams, resolve_beta). Eager on the CPU
    # the values are at hand, so tensors are read as numbers: cheaper than
    # the float64 copies they would otherwise need.
    eager_cpu = not compiling and on_cpu
    beta_tensor: Optional[torch.Tensor] = None
    step_tensor: Optional[torch.Tensor] = None
    if isinstance(step, torch.Tensor):
        if eager_cpu and step.is_cpu:
            step = _cpu_step(step)
        else:
            step_tensor = step.detach().to(device=recon_input.device, dtype=torch.int64).reshape(())
    # The beta schedule slots; None leaves the packed template's NO_SCHEDULE.
    schedule: Optional[tuple[float, ...]] = None
    number = _beta_number(beta, step, validate, eager_cpu)
    beta_value = 0.0
    if number is not None:
        beta_value = number
    elif isinstance(beta, torch.Tensor):
        # Not detached: a beta that requires grad gets d loss / d beta through the op.
        beta_tensor = beta.to(device=recon_input.device, dtype=torch.float64).reshape(())
    elif _validate.is_schedule(beta):
        # Evaluated inside the op from the step tensor: no recompiles as it changes.
        _validate.check_schedule_range(beta)
        schedule = beta._params_tuple
    else:
        beta_value = _validate.as_float(beta)  # a real number (check_tensor_args)
    if step_tensor is not None and schedule is None and beta_tensor is None:
        # A step tensor (for a capacity schedule) makes the kernel take beta
        # from the schedule at that step (resolve_beta): a constant one at
        # this value, not NO_SCHEDULE's 0.
        schedule = _ops.constant_schedule(beta_value)
    capacity_params: Optional[tuple[float, ...]] = None
    if capacity is not None:
        if not _validate.is_schedule(capacity):
            capacity_params = _ops.constant_schedule(capacity)  # type: ignore[arg-type]
        elif step_tensor is not None:
            capacity_params = capacity._params_tuple
        else:
            capacity_params = _ops.constant_schedule(float(capacity(_validate.as_step(step))))

    # is_grad_enabled() is False inside the op, so the caller decides which
    # gradients the forward pass computes (need, from which of recon_input,
    # target, mu, logvar, beta, prior_mu, prior_logvar autograd tracks).
    if torch.is_grad_enabled():
        requires = (
            recon_input.requires_grad,
            target.requires_grad,
            mu.requires_grad,
            logvar.requires_grad,
            beta_tensor is not None and beta_tensor.requires_grad,
            has_prior and prior_mu.requires_grad,  # type: ignore[union-attr]
            has_prior and prior_logvar.requires_grad,  # type: ignore[union-attr]
        )
    else:
        requires = _UNTRACKED
    plan: Optional[_ops.EagerPlan] = None
    if compiling:  # traced: no cache (the plan is only the eager path's)
        need = _ops.eager_need(requires)
    else:
        plan = _ops.eager_plan(requires, recon_input.dtype, mu.dtype, reduction)
        need = plan.asked
    floats, ints = options.packed(beta_value, schedule, capacity_params, need)
    if likelihood == "categorical" and target.dtype != torch.int64:
        target = target.to(torch.int64)
    global_mean = None
    if group is not None and batch_free_bits:
        from klanneal.reference import global_kl_per_dim, kl_per_element, widen

        with torch.no_grad():
            # KL_bd in the kernels' arithmetic type (float32 for fp16/bf16
            # latents, which rounded every step of it), summed in float64.
            kl_bd = kl_per_element(widen(mu), widen(logvar), widen(prior_mu), widen(prior_logvar))
            global_mean = global_kl_per_dim(kl_bd, group).contiguous()
    recon_input, target = recon_input.contiguous(), target.contiguous()
    mu, logvar = mu.contiguous(), logvar.contiguous()
    if has_prior:
        prior_mu, prior_logvar = prior_mu.contiguous(), prior_logvar.contiguous()  # type: ignore[union-attr]
    # fp16/bf16 gradients are kept in fp32 until backward (loss scaling), so
    # they cannot be written over a half-precision recon_input: inplace is a
    # no-op for those dtypes.
    write_inplace = inplace and need[0] and recon_input.dtype in _ops.FULL_PRECISION
    if write_inplace and not compiling:
        _check_output_not_saved(recon_input)
    if compiling or write_inplace:
        args: tuple[Any, ...] = (
            recon_input, target, mu, logvar, beta_tensor, step_tensor, floats, ints,
            prior_mu, prior_logvar, global_mean,
        )  # fmt: skip
        if write_inplace:
            outs = _ops.elbo_loss_inplace(*args)
        else:
            outs = _ops.elbo_loss_traced(*args)
        dtype = _ops.result_dtype(recon_input.dtype, mu.dtype)
        return ELBOOutput(
            outs.loss.to(dtype),
            outs.recon.detach().to(dtype),
            outs.kl.detach().to(dtype),
            outs.kl_per_dim.detach().to(dtype),
            outs.beta.detach().to(dtype),
        )
    assert plan is not None
    inputs = (recon_input, target, mu, logvar, beta_tensor, prior_mu, prior_logvar)
    results = _ops.eager_elbo(plan, options, inputs, floats, ints, step_tensor, global_mean)
    return ELBOOutput(*results)


_UNTRACKED = (False,) * 7


def _reference_family(
    recon_input: Any, target: Any, mu: Any, logvar: Any, beta: Any, step: Any,
    likelihood: Likelihood, reduction: Any, free_bits: Any, free_bits_mode: Any,
    prior_mu: Any, prior_logvar: Any, capacity: Any, free_bits_group: Any, validate: Any,
) -> ELBOOutput:  # fmt: skip
    """A likelihood family without a fused kernel (klanneal.likelihoods'
    reference-only entries: the count families): the same checks, then
    elbo_loss_ref, its gradients by autograd (the family's tensors, a
    learnable theta say, included)."""
    _validate.check_flag("validate", validate)
    _validate.check_options(
        likelihood.name, reduction, free_bits, free_bits_mode, -100, 1.0, with_params=True
    )
    _validate.check_tensor_args(
        recon_input, target, mu, logvar, beta, step, likelihood.name, capacity
    )
    if prior_mu is not None or prior_logvar is not None:
        _validate.check_prior(mu, prior_mu, prior_logvar)
    group = None if free_bits_group is None else _validate.check_free_bits_group(free_bits_group)
    if validate and not torch.compiler.is_compiling():
        _validate.check_count_values(recon_input, target, **likelihood.tensors())
        tensors = (beta if isinstance(beta, torch.Tensor) else None,)
        _validate.check_values(
            recon_input, target, likelihood.name, -100, tensors[0],
            step if isinstance(step, torch.Tensor) else None, check_target=False,
        )  # fmt: skip
    batch_free_bits = float(free_bits) > 0 and free_bits_mode == "batch"
    return elbo_loss_ref(
        recon_input, target, mu, logvar, beta, step=step, likelihood=likelihood,
        reduction=reduction, free_bits=free_bits, free_bits_mode=free_bits_mode,
        prior_mu=prior_mu, prior_logvar=prior_logvar, capacity=capacity,
        free_bits_group=group if batch_free_bits else None,
    )  # fmt: skip


def _cpu_step(step: torch.Tensor) -> int:
    """A CPU step tensor's value, read eagerly (check_tensor_args has checked
    its shape and dtype)."""
    value = int(step)
    if value < 0:
        raise ValueError(f"step must be >= 0, got {value}")
    return value


def _beta_number(beta: Any, step: Any, validate: bool, eager_cpu: bool) -> Optional[float]:
    """beta as the number the kernel gets, where it is one: a float; eager on
    the CPU, a CPU tensor that does not require grad (read and checked); a
    schedule at an int step (evaluated and checked; a CPU step tensor has
    been read by the caller). None otherwise: a tensor that goes to the op
    as a tensor, a schedule at a step tensor, another real number."""
    if type(beta) is float:
        return beta
    if isinstance(beta, torch.Tensor):
        if not (eager_cpu and beta.is_cpu and not beta.requires_grad):
            return None
        value = beta.item()  # float(beta) is this through Tensor.__float__
        if validate and not (value >= 0 and math.isfinite(value)):
            _validate.check_beta_value(value, "a beta tensor")
        return value
    if _validate.is_schedule(beta) and not isinstance(step, torch.Tensor):
        step_int = _validate.as_step(step)
        return _validate.check_scheduled_beta(float(beta(step_int)), beta, step_int)
    return None


def _common_cpu_call(
    options: _ops.ElboOptions,
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Any,
    step: Any,
) -> Optional[ELBOOutput]:
    """elbo_loss's common call, eager on the CPU with the native kernel: a
    float or CPU tensor beta that does not require grad, or a schedule at an
    int or CPU tensor step (klanneal.nn.ELBOLoss's call), and no capacity,
    learned prior, process group or inplace (elbo_loss has checked the
    arguments and these conditions). None for a beta of another kind, which
    the general path takes.

    The same kernel and autograd as the general path (_ops.eager_elbo), with
    its argument handling cut to what such a call needs: small batches pay
    per call for every step of it.
    """
    if isinstance(step, torch.Tensor):
        if not step.is_cpu:
            return None
        step = _cpu_step(step)
    beta_value = _beta_number(beta, step, options.validate, True)
    if beta_value is None:
        return None
    if torch.is_grad_enabled():
        requires = (
            recon_input.requires_grad, target.requires_grad, mu.requires_grad,
            logvar.requires_grad, False, False, False,
        )  # fmt: skip
    else:
        requires = _UNTRACKED
    plan = _ops.eager_plan(requires, recon_input.dtype, mu.dtype, options.reduction)
    floats, ints = options.packed(beta_value, None, None, plan.asked)
    if options.likelihood == "categorical" and target.dtype != torch.int64:
        target = target.to(torch.int64)
    inputs = (
        recon_input.contiguous(), target.contiguous(), mu.contiguous(), logvar.contiguous(),
        None, None, None,
    )  # fmt: skip
    return ELBOOutput(*_ops.eager_elbo(plan, options, inputs, floats, ints, None, None))


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


def _reference_only() -> bool:
    """A torch.func transform (grad, vmap, jacrev, ...) is running or a
    torch.autograd.forward_ad dual level is open (eager only: torch.compile
    traces the op itself). The fused op has no batching rule and no
    forward-mode derivative; the reference's plain PyTorch ops have both, so
    dual tensors get their tangents."""
    return not torch.compiler.is_compiling() and (
        torch._C._are_functorch_transforms_active() or _FORWARD_AD._current_level >= 0
    )


_FORWARD_AD: Any = torch.autograd.forward_ad
