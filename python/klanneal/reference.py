"""Pure-PyTorch reference of the fused ELBO loss.

Three things at once: the fallback when the native extension is missing or a
device has no kernel, the oracle every test compares against, and the
"eager" baseline of the benchmarks. It is written the way people write the
loss by hand today (``F.cross_entropy`` + ``beta * kl``) and is kept short
and obvious on purpose. It does not validate its arguments: call
``klanneal.elbo_loss`` for that.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch

from klanneal import kl_terms
from klanneal.kl_terms import KLTerm
from klanneal.likelihoods import FAMILIES, Likelihood
from klanneal.likelihoods import resolve as resolve_likelihood

__all__ = ["ELBOOutput", "elbo_loss_ref"]


class ELBOOutput(NamedTuple):
    """Result of ``klanneal.elbo_loss`` (and of ``elbo_loss_ref``).

    Attributes:
        loss: the objective, differentiable w.r.t. recon_input, mu and logvar
            (and prior_mu, prior_logvar or a prior's tensors, a beta tensor
            that requires grad);
            0-d, or [B] for reduction="none".
        recon: the reconstruction term under the same reduction, detached.
        kl: the true KL term (before free bits) under the same reduction, detached.
        kl_per_dim: [D] batch-mean KL per latent dimension, detached.
        beta: the KL weight that was used, a 0-d tensor.
    """

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor
    beta: torch.Tensor


def _recon_per_example(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    likelihood: str,
    ignore_index: int,
    gaussian_var: float,
    params: dict[str, Any],
) -> torch.Tensor:
    """Sum of the per-element negative log-likelihood of each example: [B]
    (the family's reference formula, klanneal.likelihoods.FAMILIES; params:
    the family's own parameters, a negative binomial's theta say)."""
    family = FAMILIES.get(likelihood)
    if family is None:
        raise ValueError(f"likelihood: unknown likelihood {likelihood!r}")
    missing = [p for p in family.params if p != "gaussian_var" and p not in params]
    if missing:
        raise ValueError(
            f"likelihood={likelihood!r} needs its {', '.join(missing)}: pass a "
            "klanneal.likelihoods object (e.g. NegativeBinomial(theta))"
        )
    nll = family.nll(
        recon_input, target, ignore_index=ignore_index, gaussian_var=gaussian_var, **params
    )
    return nll.reshape(recon_input.shape[0], -1).sum(dim=1)


def _beta_value(beta: Any, step: Optional[Union[int, torch.Tensor]]) -> Union[float, torch.Tensor]:
    """A float or 0-d tensor beta, evaluating a schedule at `step` if given one."""
    from klanneal.schedules import Schedule

    if isinstance(beta, Schedule):
        if not beta._native and isinstance(step, torch.Tensor):
            from klanneal._host_schedules import resolve_host_beta

            value: torch.Tensor = resolve_host_beta(beta, step, step.device)  # type: ignore[arg-type]
            return value
        return float(beta(int(step)))  # type: ignore[arg-type]  # an int or 0-d tensor
    result: Union[float, torch.Tensor] = beta
    return result


def kl_per_element(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: Optional[torch.Tensor] = None,
    prior_logvar: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL_bd [B, D] of q = N(mu, exp(logvar)) from N(0, I), or from N(prior_mu,
    exp(prior_logvar)) (a missing one of the two taken as 0; priors that
    broadcast to mu's shape are taken): the formulas of klanneal.kl_terms.FAMILIES."""
    return kl_terms.resolve(None, prior_mu, prior_logvar).kl(mu, logvar)


def global_kl_per_dim(kl_bd: torch.Tensor, group: Any) -> torch.Tensor:
    """The [D] float64 mean of KL_bd over the batches of every process of `group`.

    One all-reduce of the per-dimension sums and the batch size: the mean of
    the global batch, as one process on the concatenated batch computes it
    (like SyncBatchNorm's statistics). Detached: the clamp's mask and value
    need it, its gradient flows through the local batch only.
    """
    import torch.distributed as dist

    sums = kl_bd.detach().to(torch.float64).sum(dim=0)
    count = torch.full((1,), float(kl_bd.shape[0]), dtype=torch.float64, device=sums.device)
    buf = torch.cat([sums, count])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=None if group == "world" else group)
    return buf[:-1] / buf[-1]


def elbo_loss_ref(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Any = 1.0,
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
    capacity: Any = None,
    free_bits_group: Any = None,
    prior: Optional[KLTerm] = None,
) -> ELBOOutput:
    """Reconstruction + beta * KL in plain PyTorch.

    Same arguments and semantics as ``klanneal.elbo_loss`` (without
    validation, ``inplace`` and ``validate``): "batchmean" is (sum of all
    recon terms + beta * KL term) / B, "sum" the same without / B, "none"
    the per-example vector [B]. The KL term is sum_{b,d} KL_bd, or with free
    bits lambda > 0: B * sum_d max(lambda, mean_b KL_bd) ("batch" mode) or
    sum_b sum_d max(lambda, KL_bd) ("sample" mode). KL_bd is the formula
    of ``prior``'s family (a klanneal.kl_terms object, any entry of
    klanneal.kl_terms.FAMILIES, reference-only ones included; gradients
    w.r.t. its tensors by autograd), or is taken from N(prior_mu,
    exp(prior_logvar)) when those are given, else from N(0, 1). With a
    capacity C the KL term t becomes |t - C| per example ("none") or
    B * |t / B - C|. With free_bits_group (batch free bits) the batch mean
    is the global batch's, all-reduced over the group.

    Raises:
        TypeError: ``prior`` with ``prior_mu`` or ``prior_logvar``, or a
            ``prior`` that is not a klanneal.kl_terms object.

    Returns:
        ELBOOutput(loss, recon, kl, kl_per_dim, beta).
    """
    params: dict[str, Any] = {}
    name: str
    if isinstance(likelihood, str):
        name = likelihood
    else:  # a klanneal.likelihoods object
        params = likelihood.tensors() if isinstance(likelihood, Likelihood) else {}
        name, gaussian_var = resolve_likelihood(likelihood, gaussian_var)
    global_mean = None
    if free_bits_group is not None:

        def global_mean(kl_bd: torch.Tensor) -> torch.Tensor:
            return global_kl_per_dim(kl_bd, free_bits_group)

    return reference_loss(
        recon_input, target, mu, logvar, beta, step=step, likelihood=name,
        reduction=reduction, free_bits=free_bits, free_bits_mode=free_bits_mode,
        ignore_index=ignore_index, gaussian_var=gaussian_var, prior_mu=prior_mu,
        prior_logvar=prior_logvar, capacity=capacity, global_mean=global_mean,
        likelihood_params=params, prior=prior,
    )  # fmt: skip


def _kl_terms(
    kl_bd: torch.Tensor,
    free_bits: float,
    free_bits_mode: str,
    global_mean: Optional[Callable[[torch.Tensor], torch.Tensor]],
) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """The KL term per example [B] (None under batch free bits, a batch-level
    objective) and its batch total, after free bits, from KL_bd [B, D]."""
    batch = kl_bd.shape[0]
    if free_bits > 0 and free_bits_mode == "batch":
        # clamp, not maximum: at a tie the gradient passes (the kernels match
        # this). The batch mean is compared with lambda in float64, whatever
        # the latent dtype (as the CPU and CUDA kernels do).
        local_mean = kl_bd.double().mean(dim=0)
        if global_mean is None:
            kl_term_total = batch * local_mean.clamp(min=free_bits).sum()
        else:
            # The global mean's value and mask, the gradient of the local mean.
            mean = global_mean(kl_bd)
            passing = local_mean - local_mean.detach() + mean
            kl_term_total = batch * torch.where(mean >= free_bits, passing, free_bits).sum()
        kl_term_b = None
    elif free_bits > 0:
        kl_term_b = kl_bd.clamp(min=free_bits).sum(dim=1)
        kl_term_total = kl_term_b.sum()
    else:
        kl_term_b = kl_bd.sum(dim=1)
        kl_term_total = kl_term_b.sum()
    return kl_term_b, kl_term_total


_HALF = (torch.float16, torch.bfloat16)


def widen(t: Any) -> Any:
    """A float16/bfloat16 tensor as float32 (anything else as it is)."""
    return t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t


def reference_loss(
    recon_input: torch.Tensor,
    target: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    beta: Any,
    *,
    step: Optional[Union[int, torch.Tensor]],
    likelihood: str,
    reduction: str,
    free_bits: float,
    free_bits_mode: str,
    ignore_index: int,
    gaussian_var: float,
    prior_mu: Optional[torch.Tensor],
    prior_logvar: Optional[torch.Tensor],
    capacity: Any,
    global_mean: Optional[Callable[[torch.Tensor], torch.Tensor]],
    likelihood_params: Optional[dict[str, Any]] = None,
    prior: Optional[KLTerm] = None,
) -> ELBOOutput:
    """elbo_loss_ref with the global batch mean of batch free bits given as a
    function of the local KL_bd (an all-reduce, or the op's precomputed one)."""
    kl_term = kl_terms.resolve(prior, prior_mu, prior_logvar)
    batch = mu.shape[0]
    # At least float32, as torch autocast returns losses: half-precision
    # inputs are accumulated in fp32 and a half result could overflow.
    dtype = torch.promote_types(recon_input.dtype, mu.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    # Half-precision inputs are computed in float32, as the kernels do (an
    # fp16 sum over a row overflows at 65504); gradients flow back through
    # the casts in the inputs' dtypes.
    recon_input, mu, logvar, target = widen(recon_input), widen(mu), widen(logvar), widen(target)
    kl_tensors = {name: widen(t) for name, t in kl_term.tensors().items()}
    beta = _beta_value(beta, step)

    recon_b = _recon_per_example(
        recon_input, target, likelihood, ignore_index, gaussian_var, likelihood_params or {}
    )
    kl_bd = kl_term.family.kl(mu, logvar, **kl_tensors)  # [B, D], the family's formula
    kl_per_dim = kl_bd.mean(dim=0)  # [D]
    kl_term_b, kl_term_total = _kl_terms(kl_bd, free_bits, free_bits_mode, global_mean)
    kl_b = kl_bd.sum(dim=1)
    if capacity is not None:
        c = _beta_value(capacity, step)
        if reduction == "none":
            assert kl_term_b is not None  # batch free bits is refused with "none"
            kl_term_b = (kl_term_b - c).abs()
        else:
            kl_term_total = batch * torch.abs(kl_term_total / batch - c)

    if reduction == "none":
        loss = recon_b + beta * kl_term_b
        recon, kl = recon_b, kl_b
    else:
        divisor = batch if reduction == "batchmean" else 1
        loss = (recon_b.sum() + beta * kl_term_total) / divisor
        recon, kl = recon_b.sum() / divisor, kl_b.sum() / divisor

    beta_t = torch.as_tensor(beta, dtype=dtype, device=mu.device).detach().reshape(())
    return ELBOOutput(
        loss.to(dtype),
        recon.detach().to(dtype),
        kl.detach().to(dtype),
        kl_per_dim.detach().to(dtype),
        beta_t,
    )
