"""klanneal.elbo_loss: reconstruction + beta * Gaussian KL in one fused op."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from klanneal._call import elbo_call
from klanneal._call import reference_only as _reference_only  # noqa: F401 - linear, tests
from klanneal._common_call import common_call
from klanneal.kl_terms import KLTerm
from klanneal.likelihoods import Likelihood
from klanneal.reference import ELBOOutput
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
    likelihood: Union[str, Likelihood] = "categorical",
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
    prior: Optional[KLTerm] = None,
) -> ELBOOutput:
    """Negative ELBO: reconstruction NLL + beta * KL(q(z|x) || p(z)), value and
    every gradient in one fused pass.

    The per-element terms of each likelihood, the KL of each prior, the
    reductions ("batchmean": (recon + beta * KL term) / B, the per-example
    ELBO of the cyclical-annealing paper's code; "sum"; "none": [B]), free
    bits and the capacity objective are defined in docs/elbo.md, with their
    derivations; ``klanneal.elbo_loss_ref`` computes the same in plain
    PyTorch.

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
            get their gradients), run through the op klanneal::count_nll
            (docs/elbo.md, "Count likelihoods").
        reduction: "batchmean", "sum" or "none" ("none" is not allowed with
            free_bits > 0 in "batch" mode, a batch-level objective).
        free_bits: lambda in nats per latent dimension; 0 disables.
        free_bits_mode: "batch" or "sample" (see above).
        ignore_index: categorical target value whose positions contribute nothing.
        gaussian_var: the fixed variance of the gaussian likelihood (> 0).
        prior_mu, prior_logvar: [B, D] mean and log-variance of a learned
            diagonal-Gaussian prior (both or neither; mu's dtype and device);
            None: N(0, I). Both get gradients.
        prior: the KL term's prior as a ``klanneal.kl_terms`` object
            (``StandardNormal()``, ``DiagonalGaussian(prior_mu,
            prior_logvar)``, or a family registered there, which runs on the
            reference path until it has a kernel); not together with
            prior_mu / prior_logvar. None: N(0, I), or the prior_mu /
            prior_logvar given.
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
    if (
        step is None and capacity is None and prior is None and prior_mu is None
        and prior_logvar is None and free_bits_group is None and inplace is False
        and not _DYNAMO_COMPILING()  # a C call: torch.compile traces elbo_call's path
    ):  # fmt: skip
        out = common_call(
            recon_input, target, mu, logvar, beta, likelihood, reduction, free_bits,
            free_bits_mode, ignore_index, gaussian_var, validate,
        )  # fmt: skip
        if out is not None:
            return out
    return elbo_call(
        recon_input, target, mu, logvar, beta, step, likelihood, reduction, free_bits,
        free_bits_mode, ignore_index, gaussian_var, prior_mu, prior_logvar, capacity,
        free_bits_group, inplace, validate, prior,
    ).run()  # fmt: skip


_DYNAMO_COMPILING = torch.compiler.is_dynamo_compiling
