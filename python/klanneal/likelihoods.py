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

from klanneal import _count_ref

__all__ = [
    "FAMILIES",
    "Bernoulli",
    "Categorical",
    "Family",
    "Gaussian",
    "Likelihood",
    "MSE",
    "NegativeBinomial",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "resolve",
]

#: The kinds of target a family takes (see klanneal._validate.check_tensor_args).
TARGET_KINDS = ("class_ids", "probabilities", "real", "counts")

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


# The count families: recon_input is the mean mu > 0 of each count (scVI's
# px_rate), target the counts; klanneal._count_ref holds the stable forms.
def _poisson_nll(x: torch.Tensor, y: torch.Tensor, **_: Any) -> torch.Tensor:
    return _count_ref.poisson_nll(x, y)


def _nb_nll(x: torch.Tensor, y: torch.Tensor, theta: Any, **_: Any) -> torch.Tensor:
    return _count_ref.nb_nll(x, torch.as_tensor(theta, device=x.device), y)


def _zinb_nll(
    x: torch.Tensor, y: torch.Tensor, theta: Any, zi_logits: Any, **_: Any
) -> torch.Tensor:
    theta = torch.as_tensor(theta, device=x.device)
    return _count_ref.zinb_nll(x, theta, torch.as_tensor(zi_logits, device=x.device), y)


#: The table, in the order of the C++ enum for the families with a kernel.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("categorical", "class_ids", _categorical_nll),
        Family("bernoulli", "probabilities", _bernoulli_nll),
        Family("gaussian", "real", _gaussian_nll, params=("gaussian_var",)),
        Family("mse", "real", _mse_nll),
        # Reference-only until their fused kernels land (the formulas and
        # their gradients are in csrc/include/klanneal/count_likelihoods.h).
        Family("poisson", "counts", _poisson_nll, native=False),
        Family("negative_binomial", "counts", _nb_nll, params=("theta",), native=False),
        Family(
            "zero_inflated_negative_binomial",
            "counts",
            _zinb_nll,
            params=("theta", "zi_logits"),
            native=False,
        ),  # fmt: skip
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

    def tensors(self) -> dict[str, Any]:
        """The family's parameters that are tensors (or numbers) of their own:
        a reference-only family's (``Family.params``); empty for the others."""
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


def _param(cls: str, name: str, value: Any, positive: bool) -> Any:
    """A count family's parameter: a real number or a floating-point tensor
    (checked for its values by the call, where they are known)."""
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{cls}: {name} must be a floating-point tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{cls}: {name} must be a float or a tensor, got {type(value).__name__}")
    ok = value > 0 if positive else value == value
    if not (math.isfinite(value) or not positive) or not ok:
        bound = "finite and > 0" if positive else "a number (not NaN)"
        raise ValueError(f"{cls}: {name} must be {bound}, got {value}")
    return float(value)


@dataclass(frozen=True)
class Poisson(Likelihood):
    """Poisson(target; rate = recon_input) per element: mu - x log mu + lgamma(x + 1).

    recon_input is the mean mu > 0 of each count ([B, G]); target the counts
    x >= 0, [B, G], any float or integer dtype. Runs on the reference path
    (plain PyTorch) until its fused kernel lands.
    """

    name: str = field(init=False, default="poisson")


@dataclass(frozen=True, eq=False)
class NegativeBinomial(Likelihood):
    """Negative binomial in scvi-tools' parameterisation: mean ``recon_input`` (mu
    > 0, [B, G]), inverse dispersion ``theta``:

        log p(x) = theta log(theta / (theta + mu)) + x log(mu / (theta + mu))
                   + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)

    Args:
        theta: inverse dispersion > 0: a float, or a tensor broadcastable to
            [B, G] (per gene [G], scVI's default, typically a learnable
            parameter: it gets its gradient; per cell and gene [B, G]).

    The target holds the counts x >= 0. Computed in a stable form (Loader's
    saddle point: no cancellation from theta 1e-6 to 1e8, no epsilon added);
    reference path until its fused kernel lands.
    """

    theta: Any = 1.0
    name: str = field(init=False, default="negative_binomial")

    def __post_init__(self) -> None:
        object.__setattr__(self, "theta", _param(type(self).__name__, "theta", self.theta, True))

    def tensors(self) -> dict[str, Any]:
        return {"theta": self.theta}


@dataclass(frozen=True, eq=False)
class ZeroInflatedNegativeBinomial(Likelihood):
    """The negative binomial mixed with a point mass at 0 of probability
    sigmoid(zi_logits) (scvi-tools' ZINB), in log space (never the log of a
    difference).

    Args:
        theta: inverse dispersion > 0 (a float, or a tensor broadcastable to [B, G]).
        zi_logits: logits of the zero-inflation probability, a float or a
            tensor broadcastable to [B, G] ([G] or [B, G]).
    """

    theta: Any = 1.0
    zi_logits: Any = 0.0
    name: str = field(init=False, default="zero_inflated_negative_binomial")

    def __post_init__(self) -> None:
        cls = type(self).__name__
        object.__setattr__(self, "theta", _param(cls, "theta", self.theta, True))
        object.__setattr__(self, "zi_logits", _param(cls, "zi_logits", self.zi_logits, False))

    def tensors(self) -> dict[str, Any]:
        return {"theta": self.theta, "zi_logits": self.zi_logits}


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
