"""Likelihoods of the reconstruction term: one table entry per family.

``likelihood=`` of ``klanneal.elbo_loss``, ``elbo_loss_ref`` and
``klanneal.nn.ELBOLoss`` takes a family's name (``"categorical"``,
``"bernoulli"``, ``"gaussian"``, ``"mse"``) or one of the objects below, which
carry the family's parameters, so that the next likelihood needs no new
keyword::

    klanneal.elbo_loss(x, y, mu, logvar, likelihood=klanneal.likelihoods.Gaussian(var=0.5))

:data:`FAMILIES` is the table: per family its name, the kind of target it
takes (what the checks ask of ``target``), its parameters, the pure-PyTorch
per-element negative log-likelihood (the reference every kernel is tested
against) and whether it has a fused kernel (its code is the name's position
in the C++ ``Likelihood`` enum, ``_C.elbo_layout()["likelihood"]``). The
argument checks, the reference and the tests read it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = [
    "FAMILIES",
    "Bernoulli",
    "Categorical",
    "Family",
    "Gaussian",
    "Likelihood",
    "MSE",
    "resolve",
]

#: The kinds of target a family takes (see klanneal._validate.check_tensor_args).
TARGET_KINDS = ("class_ids", "probabilities", "real")

# nll(recon_input, target, **params) -> per-element negative log-likelihood,
# recon_input's shape without the class dimension for class ids.
NllFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Family:
    """One row of the likelihood table.

    Attributes:
        name: the string ``likelihood=`` takes.
        target: what ``target`` holds: "class_ids" (an integer tensor
            [B, ...] indexing recon_input's last dimension), "probabilities"
            (floats in [0, 1], recon_input's shape) or "real" (floats,
            recon_input's shape; a target that requires grad gets one).
        nll: the reference per-element negative log-likelihood,
            ``nll(recon_input, target, ignore_index=..., **params)``.
        params: the family's parameters, as keyword arguments of ``nll``.
        native: it has a fused kernel (else it runs on the reference path).
    """

    name: str
    target: str
    nll: NllFn
    params: tuple[str, ...] = ()
    native: bool = True


def _categorical_nll(x: torch.Tensor, y: torch.Tensor, ignore_index: int, **_: Any) -> torch.Tensor:
    vocab = x.shape[-1]
    # int32/int16/int8 class ids, which the fused op takes: cross_entropy
    # takes only int64 (and uint8).
    return F.cross_entropy(
        x.reshape(-1, vocab), y.reshape(-1).to(torch.int64), reduction="none",
        ignore_index=ignore_index,
    )  # fmt: skip


def _bernoulli_nll(x: torch.Tensor, y: torch.Tensor, **_: Any) -> torch.Tensor:
    """Binary cross-entropy with logits, exact at infinite logits too.

    softplus(-x) + x (1 - y) for x > 0 and softplus(x) - x y otherwise, the
    linear part taken as 0 where its target factor is exactly 0. Equal to
    F.binary_cross_entropy_with_logits for finite x (value and gradient
    sigmoid(x) - y), but where torch gives NaN at x = +-inf (inf - inf,
    inf * 0) this gives the loss's limits: 0 where the target agrees exactly
    with the logit's sign, +inf otherwise (as the kernels do).
    """
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    positive = F.softplus(-x) + torch.where(y == 1, zero, x * (1 - y))
    negative = F.softplus(x) - torch.where(y == 0, zero, x * y)
    return torch.where(x > 0, positive, negative)


def _gaussian_nll(x: torch.Tensor, y: torch.Tensor, gaussian_var: float, **_: Any) -> torch.Tensor:
    # log(2 pi) + log(var): 2 pi var itself overflows for var > 2.8e307.
    log_norm = math.log(2 * math.pi) + math.log(gaussian_var)
    return 0.5 * ((x - y) ** 2 / gaussian_var + log_norm)


def _mse_nll(x: torch.Tensor, y: torch.Tensor, **_: Any) -> torch.Tensor:
    return (x - y) ** 2


#: The table, in the order of the C++ enum for the families with a kernel.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("categorical", "class_ids", _categorical_nll),
        Family("bernoulli", "probabilities", _bernoulli_nll),
        Family("gaussian", "real", _gaussian_nll, params=("gaussian_var",)),
        Family("mse", "real", _mse_nll),
    )
}
NAMES = tuple(FAMILIES)


@dataclass(frozen=True)
class Likelihood:
    """Base of the likelihood objects: a family and its parameters."""

    name: str = field(init=False, default="")

    def options(self) -> dict[str, Any]:
        """The elbo_loss keyword arguments this object stands for."""
        return {}


@dataclass(frozen=True)
class Categorical(Likelihood):
    """Softmax over recon_input's last dimension (logits [B, ..., V]); target:
    integer class ids [B, ...] (``ignore_index`` positions contribute nothing)."""

    name: str = field(init=False, default="categorical")


@dataclass(frozen=True)
class Bernoulli(Likelihood):
    """Independent Bernoulli per element (logits); target: probabilities in [0, 1]."""

    name: str = field(init=False, default="bernoulli")


@dataclass(frozen=True)
class Gaussian(Likelihood):
    """N(target; recon_input, var) per element: 0.5 ((x - y)^2 / var + log(2 pi var)).

    Args:
        var: the fixed variance, finite and > 0 (``gaussian_var``).
    """

    var: float = 1.0
    name: str = field(init=False, default="gaussian")

    def __post_init__(self) -> None:
        var: Any = self.var
        if isinstance(var, bool) or not isinstance(var, (int, float)):
            raise TypeError(f"Gaussian: var must be a float, got {type(var).__name__}")
        if not (math.isfinite(var) and var > 0):
            raise ValueError(f"Gaussian: var must be finite and > 0, got {var}")

    def options(self) -> dict[str, Any]:
        return {"gaussian_var": float(self.var)}


@dataclass(frozen=True)
class MSE(Likelihood):
    """Squared error (x - y)^2 per element (a Gaussian's shape without its constants)."""

    name: str = field(init=False, default="mse")


def resolve(likelihood: Any, gaussian_var: Any) -> tuple[Any, Any]:
    """(name, gaussian_var) of a ``likelihood=`` argument: a name passes
    through (checked later with the other options); an object gives its
    family's name and parameters.

    Raises:
        TypeError: neither a string nor a klanneal.likelihoods object.
        ValueError: a parameter given both ways with different values
            (``Gaussian(var=0.5)`` with ``gaussian_var=2.0``).
    """
    if isinstance(likelihood, str):
        return likelihood, gaussian_var
    if not isinstance(likelihood, Likelihood):
        raise TypeError(
            f"likelihood must be one of {', '.join(NAMES)} or a klanneal.likelihoods object, "
            f"got {type(likelihood).__name__}"
        )
    options = likelihood.options()
    var = options.get("gaussian_var")
    if var is not None and gaussian_var not in (1.0, var):
        raise ValueError(
            f"likelihood={likelihood!r} sets the variance; gaussian_var={gaussian_var} "
            "contradicts it (pass one of the two)"
        )
    return likelihood.name, gaussian_var if var is None else var
