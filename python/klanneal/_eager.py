"""The eager path of klanneal.elbo_loss: the device kernel called directly and
the loss attached by a plain autograd.Function.

In eager mode klanneal.elbo_loss does not go through the dispatcher at all:
``eager_elbo`` calls the device kernel directly and ``ElboFunction``
attaches the loss (the cheapest attachment: torch's custom-op wrapper costs
tens of microseconds per call); with nothing to track (torch.no_grad) there
is no Function at all.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Optional

import torch

from klanneal._autograd import _backward_common, _save_context, saved_gradients
from klanneal._buffers import (
    POOL_MIN_BYTES,
    _grad_recon_buffer,
    _latent_grads,
    _scalar_outputs,
)
from klanneal._kernels import _kernels, _run_kernel
from klanneal._layout import (
    FULL_PRECISION,
    SAVED,
    ElboOptions,
    InplaceOutputs,
    OpInputs,
    Outputs,
    Results,
    grad_dtype,
    result_dtype,
)
from klanneal._registration import elbo_loss_inplace_op, elbo_loss_op

# The inputs whose requires-grad flags decide an eager call (EagerPlan), in
# this order, and their positions among the op's inputs (OpInputs); the
# saved gradient of each (SAVED; None: an input without one of its own:
# target's is -grad_recon, beta's comes from kl_weight).
EAGER_INPUTS = ("recon_input", "target", "mu", "logvar", "beta", "prior_mu", "prior_logvar")
_OP_INDEX = tuple(OpInputs._fields.index(name) for name in EAGER_INPUTS)
_GRAD_NAME = {"recon_input": "grad_recon", "mu": "grad_mu", "logvar": "grad_logvar",
              "prior_mu": "grad_prior_mu", "prior_logvar": "grad_prior_logvar"}  # fmt: skip
_SAVED_INDEX = tuple(
    SAVED.index(_GRAD_NAME[name]) if name in _GRAD_NAME else None for name in EAGER_INPUTS
)


class EagerPlan:
    """What an eager call's requires-grad flags, dtypes and reduction decide,
    worked out once per combination (``eager_plan``, a cache of at most
    2^7 x 4 x 4 x 3 keys).

    asked: the 5 gradients the kernel computes (recon_input, mu, logvar,
    prior_mu, prior_logvar); tracked: the positions among the op's inputs
    (OpInputs) of those of EAGER_INPUTS that autograd tracks; saved_index:
    the saved gradient (ctx.saved_tensors index) of each tracked input, for
    the backward that returns them as they are, or None where one needs
    more than that (a target or beta gradient, or fp16/bf16 inputs, whose
    fp32 gradients are cast); dtype: the results' dtype; the gradients'
    dtypes. It is also ``_backward_common``'s state:
    ``scaled`` gives the copy that records a backward's in-place scaling.
    """

    __slots__ = (
        "asked", "tracked", "saved_index", "dtype", "recon_grad_dtype", "latent_grad_dtype",
        "reduction", "recon_dtype", "latent_dtype", "grad_recon_input", "grad_target",
        "grad_beta", "scaled_in_place", "same_dtype_grads", "plain_scalars", "saved_slots",
        "unit_saved",
    )  # fmt: skip

    def __init__(
        self,
        requires: tuple[bool, ...],
        recon_dtype: torch.dtype,
        latent_dtype: torch.dtype,
        reduction: str,
    ) -> None:
        """requires: whether autograd tracks recon_input, target, mu, logvar,
        beta, prior_mu, prior_logvar (all False with grad mode off). A
        gaussian/mse target that requires grad gets -grad_recon."""
        self.asked = eager_need(requires)
        tracked = [k for k, r in enumerate(requires) if r]
        self.tracked = tuple(_OP_INDEX[k] for k in tracked)
        saved = [_SAVED_INDEX[k] for k in tracked]
        full = recon_dtype in FULL_PRECISION and latent_dtype in FULL_PRECISION
        self.saved_index = None if None in saved or not full else tuple(saved)
        self.dtype = result_dtype(recon_dtype, latent_dtype)
        self.recon_grad_dtype = grad_dtype(recon_dtype)
        self.latent_grad_dtype = grad_dtype(latent_dtype)
        self.reduction = reduction
        self.recon_dtype, self.latent_dtype = recon_dtype, latent_dtype
        self.grad_recon_input, self.grad_target = requires[0], requires[1]
        self.grad_beta = requires[4]
        self.scaled_in_place = False
        self.same_dtype_grads = full
        # 0-d loss, recon and kl, and no d loss / d beta (kl_weight).
        self.plain_scalars = reduction != "none" and not requires[4]
        # ElboFunction saves only the tensors computed: their slots among
        # SAVED + kl_weight (kl_weight: d loss / d beta, for a beta tensor
        # that requires grad).
        self.saved_slots = tuple(k for k in range(5) if self.asked[k]) + (
            (5,) if self.grad_beta else ()
        )
        # ElboFunction.backward's unit case (loss.backward() on a 0-d loss
        # whose inputs' gradients are the saved tensors, in order).
        self.unit_saved = self.saved_index is not None and self.plain_scalars

    def scaled(self) -> EagerPlan:
        """A copy for one backward to mark (the cached plan is shared by calls)."""
        copy = object.__new__(EagerPlan)
        for name in EagerPlan.__slots__:
            setattr(copy, name, getattr(self, name))
        copy.unit_saved = False  # its backward goes through _backward_common
        return copy


eager_plan = functools.cache(EagerPlan)


def eager_need(requires: tuple[bool, ...]) -> tuple[bool, bool, bool, bool, bool]:
    """The gradients the kernel computes (recon_input, mu, logvar, prior_mu,
    prior_logvar) for the requires-grad flags of eager_elbo's inputs: a
    gaussian/mse target that requires grad gets -grad_recon."""
    recon_input, target, mu, logvar, _, prior_mu, prior_logvar = requires  # EAGER_INPUTS
    return (recon_input or target, mu, logvar, prior_mu, prior_logvar)


def eager_elbo(plan: EagerPlan, options: ElboOptions, op: OpInputs) -> tuple[torch.Tensor, ...]:
    """One eager elbo_loss call: runs the device kernel, then attaches the
    loss to autograd (ElboFunction) if any input is tracked.

    op: the op's inputs (contiguous; floats and ints packed with plan.asked
    the gradients asked for); plan: eager_plan of their requires-grad flags.
    Returns loss, recon, kl, kl_per_dim, beta in plan.dtype: written in that
    dtype on the CPU (out_dtype), in float64 on CUDA and cast.
    """
    recon_input, mu = op.recon_input, op.mu
    need = plan.asked
    on_cpu = recon_input.is_cpu
    zero_d = _ZERO_D.get(plan.dtype) if on_cpu and plan.plain_scalars else None
    if zero_d is not None and not _FUNCTION_MODE():
        # The common call's outputs: four 0-d tensors and kl_per_dim [D] in
        # the results' dtype on the CPU; empty_like of a 0-d tensor is the
        # cheapest allocation there is (torch.empty parses its arguments).
        new = torch.empty_like
        scalars: tuple[Optional[torch.Tensor], ...] = (
            new(zero_d), new(zero_d), new(zero_d),
            torch.empty(mu.shape[1], dtype=plan.dtype), new(zero_d), None,
        )  # fmt: skip
    elif on_cpu:
        scalars = _scalar_outputs(mu, plan.reduction, None, plan.dtype, plan.grad_beta)
    else:
        scalars = _scalar_outputs(mu, plan.reduction, recon_input.device, kl_weight=plan.grad_beta)
    if plan.same_dtype_grads:
        # The gradients in the inputs' own dtypes, of their (contiguous)
        # layouts: empty_like without arguments, the cheapest allocation
        # (below the pool's size, where _grad_recon_buffer would do the same).
        empty = torch.empty_like
        if not need[0]:
            grad_recon = None
        elif recon_input.numel() * recon_input.itemsize < POOL_MIN_BYTES:
            grad_recon = empty(recon_input)
        else:
            grad_recon = _grad_recon_buffer(recon_input, plan.recon_grad_dtype)
        grads: tuple[Optional[torch.Tensor], ...] = (
            grad_recon, empty(mu) if need[1] else None, empty(mu) if need[2] else None,
            empty(mu) if need[3] else None, empty(mu) if need[4] else None,
        )  # fmt: skip
    else:
        grads = (
            _grad_recon_buffer(recon_input, plan.recon_grad_dtype) if need[0] else None,
            *_latent_grads(mu, need, plan.latent_grad_dtype),
        )
    _run_kernel(options, op, scalars, grads)
    loss, recon, kl, kl_per_dim, beta_out, kl_weight = scalars
    if not on_cpu:
        out = plan.dtype
        loss, recon, kl = loss.to(out), recon.to(out), kl.to(out)  # type: ignore[union-attr]
        kl_per_dim, beta_out = kl_per_dim.to(out), beta_out.to(out)  # type: ignore[union-attr]
    if plan.tracked:
        # Function.apply's C part (APPLY); only the tracked inputs are its
        # arguments (elbo_call has unwrapped a tensor that escaped a
        # finished torch.func transform, as Function.apply does).
        tracked = [op[k] for k in plan.tracked]
        computed = (*grads, kl_weight)
        saved = tuple(computed[k] for k in plan.saved_slots)
        loss = APPLY((loss, saved, plan, False), *tracked)
    return loss, recon, kl, kl_per_dim, beta_out  # type: ignore[return-value]


class ElboFunction(torch.autograd.Function):
    """Eager autograd of klanneal.elbo_loss: attaches the loss of a kernel that
    already ran (eager_elbo) and returns the gradients it computed.

    Its arguments are (loss, the gradients computed in the order of
    EagerPlan.saved_slots, the EagerPlan, whether to keep the gradients on
    ctx instead of saving them: the common call keeps small ones) and, of
    the inputs, only those that require grad (EagerPlan.tracked): each argument
    of an autograd.Function costs time on every call, which is what small
    batches pay for. For the same reason the loss is the only output: recon,
    kl, kl_per_dim and beta are plain tensors.
    """

    @staticmethod
    def forward(ctx: Any, state: tuple[Any, ...], *tracked: torch.Tensor) -> torch.Tensor:
        loss, saved, plan, keep = state
        ctx.set_materialize_grads(False)
        # The gradients computed, in plan.saved_slots order: small ones kept
        # on ctx (see saved_gradients), the others saved.
        if keep:
            ctx.kept = saved
        else:
            ctx.kept = None
            ctx.save_for_backward(*saved)
        ctx.handed_out = False
        ctx.plan = plan
        return loss  # type: ignore[no-any-return]

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor]) -> tuple[Any, ...]:
        plan = ctx.plan
        if (
            plan.unit_saved
            and type(grad_loss) is _Tensor
            and grad_loss.is_cpu
            and not _GRAD_ENABLED()
            and not _DYNAMO_COMPILING()
            and grad_loss.item() == 1.0
        ):
            # The common case (loss.backward() on a 0-d loss): the gradients
            # of the forward pass, as they are (so a later backward through
            # a retained graph must not scale them in place). Any other
            # unit gradient is handed out the same way by _backward_common.
            kept = ctx.kept
            # Kept and not yet handed out, the graph not freed (reading
            # ctx.saved_tensors, none saved, raises then): as they are.
            if kept is None or ctx.handed_out or ctx.saved_tensors:
                kept = saved_gradients(ctx)
            ctx.handed_out = True
            return (None, *kept)
        ctx.plan = state = plan.scaled()
        out = _backward_common(ctx, state, grad_loss, plan.saved_slots)  # in OpInputs order
        return (None, *[out[k] for k in plan.tracked])


def _c_apply() -> Any:
    """torch.autograd.Function's C-level apply bound to ElboFunction, or its
    Python apply where torch's class layout is not the expected one."""
    apply = getattr(super(torch.autograd.Function, ElboFunction), "apply", None)
    if isinstance(apply, types.BuiltinMethodType) and apply.__self__ is ElboFunction:
        return apply
    return ElboFunction.apply


# eager_elbo calls ElboFunction through APPLY, the C apply of
# torch.autograd.Function: what Function.apply adds in Python is for
# torch.func transforms, and elbo_loss takes the reference path whenever one
# is active; elbo_call unwraps dead wrappers as Function.apply does.
APPLY = _c_apply()


# A 0-d CPU tensor per results' dtype: eager_elbo's outputs are empty_like of it (on
# the CPU whatever default device is set when klanneal is imported).
_ZERO_D = {
    dtype: torch.empty((), dtype=dtype, device="cpu") for dtype in (torch.float32, torch.float64)
}
_FUNCTION_MODE = torch._C._is_torch_function_mode_enabled
_GRAD_ENABLED = torch.is_grad_enabled
# Dynamo tracing a backward (compiled autograd) sees no fast path; other
# tracers pass tensor subclasses, which the type check leaves out.
_DYNAMO_COMPILING = torch.compiler.is_dynamo_compiling
_Tensor = torch.Tensor


class _ElboInplace(torch.autograd.Function):
    """Autograd of the inplace op: the logits buffer becomes its own gradient.

    recon_input is not marked dirty: its autograd history stays that of the
    decoder output it is, so that views (logits.view(B, T, V)) work too (a
    Function that marks a view dirty may return only one tensor). The
    mutation bumps recon_input's version counter (the op declares it; the
    eager path bumps it by hand): a node that saved the logits for its own
    backward reports the overwrite.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> tuple[torch.Tensor, ...]:
        i = OpInputs(*inputs)
        if torch.compiler.is_compiling():
            outs = elbo_loss_inplace_op(*inputs)
        else:
            kernel = _kernels(i.recon_input.device)[1]
            outs = kernel(*inputs)
            torch.autograd.graph.increment_version(i.recon_input)
        _save_context(ctx, i)
        out = InplaceOutputs(*outs)
        # In SAVED order (recon_input holds its gradient now), then kl_weight.
        ctx.save_for_backward(
            i.recon_input, out.grad_mu, out.grad_logvar, out.grad_prior_mu,
            out.grad_prior_logvar, out.kl_weight,
        )  # fmt: skip
        ctx.mark_non_differentiable(out.recon, out.kl, out.kl_per_dim, out.beta)
        return out.loss, out.recon, out.kl, out.kl_per_dim, out.beta

    @staticmethod
    def backward(ctx: Any, grad_loss: Optional[torch.Tensor], *unused: Any) -> tuple[Any, ...]:
        return tuple(_backward_common(ctx, ctx, grad_loss))


def elbo_loss_traced(*args: Any) -> Results:
    """loss, recon, kl, kl_per_dim, beta (float64) of the op, with its
    registered autograd: the path under torch.compile and on devices without
    a native kernel (the op's default kernel is the reference)."""
    out = Outputs(*elbo_loss_op(*args))
    return Results(out.loss, out.recon, out.kl, out.kl_per_dim, out.beta)


def elbo_loss_inplace(*args: Any) -> Results:
    """The inplace op with autograd: loss, recon, kl, kl_per_dim, beta."""
    return Results(*_ElboInplace.apply(*args))  # type: ignore[no-untyped-call]
