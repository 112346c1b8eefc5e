"""KL terms of the ELBO: one table entry per prior family.

``prior=`` of ``klanneal.elbo_loss_ref`` takes one of the objects below; the
older ``prior_mu=`` / ``prior_logvar=`` keywords stand for
:class:`DiagonalGaussian` and their absence for :class:`StandardNormal`
(:func:`resolve` turns either spelling into an object)::

    klanneal.elbo_loss_ref(x, y, mu, logvar, prior=klanneal.kl_terms.DiagonalGaussian(pmu, plv))

:data:`FAMILIES` is the table: per family its name, the names of its tensors,
the pure-PyTorch KL_bd of q = N(mu, exp(logvar)) from the prior per example b
and latent dimension d (the reference every kernel is tested against), an
optional check of its tensors against mu, and whether the fused kernel has
it. The reference reads the table, so free bits, capacity, every reduction
and the data-parallel batch mean apply to any family's KL_bd. A family
added with :func:`register` is reference-only (``native=False``): it runs
everywhere on the reference path until it has a kernel.

The two native families are the fused op's ``prior_mu`` / ``prior_logvar``
slots: both null for the standard normal, both set for a diagonal Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from klanneal import _validate

__all__ = [
    "FAMILIES",
    "DiagonalGaussian",
    "Family",
    "KLTerm",
    "StandardNormal",
    "check_broadcastable",
    "register",
    "resolve",
]

# kl(mu, logvar, **tensors) -> KL_bd [B, D]; check(mu, **tensors) raises on
# tensors that do not fit mu (shape, dtype, device).
KlFn = Callable[..., torch.Tensor]
CheckFn = Callable[..., None]


@dataclass(frozen=True)
class Family:
    """One row of the KL-term table.

    Attributes:
        name: the family's name (the key of :data:`FAMILIES`).
        kl: the reference KL_bd, ``kl(mu, logvar, **tensors)`` -> [B, D] for
            mu, logvar [B, D], in their dtype; differentiable w.r.t. every
            tensor (autograd gives the gradients on the reference path).
        tensors: the names of the family's tensors (or numbers), the keyword
            arguments of ``kl`` and the keys of ``KLTerm.tensors()``.
        check: ``check(mu, **tensors)``, raising TypeError / ValueError for
            tensors that do not fit mu; None: :func:`check_broadcastable`.
        native: the fused kernel has it; False (the default): it runs on the
            reference path.
    """

    name: str
    kl: KlFn
    tensors: tuple[str, ...] = ()
    check: Optional[CheckFn] = None
    native: bool = False


def _standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def _diagonal_gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    prior_mu: Optional[torch.Tensor] = None,
    prior_logvar: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    # A missing one of the two is taken as 0: what the reference has always
    # done (klanneal.metrics relies on it); elbo_loss's check refuses it.
    prior_mu = torch.zeros_like(mu) if prior_mu is None else prior_mu
    prior_logvar = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    return 0.5 * (
        prior_logvar - logvar + (logvar.exp() + (mu - prior_mu).pow(2)) / prior_logvar.exp() - 1
    )


def _check_diagonal_gaussian(
    mu: torch.Tensor, prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor]
) -> None:
    _validate.check_prior(mu, prior_mu, prior_logvar)


#: The table. The native families are the fused op's prior slots.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("standard_normal", _standard_normal_kl, native=True),
        Family(
            "diagonal_gaussian",
            _diagonal_gaussian_kl,
            tensors=("prior_mu", "prior_logvar"),
            check=_check_diagonal_gaussian,
            native=True,
        ),
    )
}


def register(family: Family) -> Family:
    """Add a reference-only family to :data:`FAMILIES` (returned as given).

    One entry is all a new prior needs to work everywhere through the
    reference path (``elbo_loss_ref``: every reduction, free bits, capacity,
    gradients by autograd). Example, an isotropic Gaussian prior N(0, var I)::

        def kl(mu, logvar, prior_var):  # [B, D]
            return 0.5 * (math.log(prior_var) - logvar + (logvar.exp() + mu**2) / prior_var - 1)

        register(Family("isotropic_gaussian", kl, tensors=("prior_var",)))
        prior = KLTerm("isotropic_gaussian", prior_var=0.25)

    Raises:
        TypeError: ``family`` is not a :class:`Family`.
        ValueError: ``family.native`` is True (a kernel is added in C++, see
            docs/architecture.md), or its name is already in the table.
    """
    if not isinstance(family, Family):
        raise TypeError(f"register takes a klanneal.kl_terms.Family, got {type(family).__name__}")
    if family.native:
        raise ValueError(
            f"register: family {family.name!r} has native=True, but a registered family is "
            "reference-only until the fused kernel has it (see docs/architecture.md)"
        )
    if family.name in FAMILIES:
        raise ValueError(f"register: a KL family named {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def check_broadcastable(mu: torch.Tensor, **tensors: Any) -> None:
    """The default check of a family's tensors: each is a real number or a
    floating-point tensor on mu's device that broadcasts to mu's shape [B, D].

    Raises:
        TypeError: neither a real number nor a floating-point tensor.
        ValueError: on another device than mu, or not broadcastable to mu's shape.
    """
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            if not t.dtype.is_floating_point:
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != mu.device:
                raise ValueError(f"{name} is on {t.device} but mu is on {mu.device}")
            try:
                t.expand(mu.shape)
            except RuntimeError:
                shapes = f"{tuple(t.shape)} to mu's {tuple(mu.shape)}"
                raise ValueError(f"{name} does not broadcast: {shapes}") from None
        elif isinstance(t, bool) or not isinstance(t, (int, float)):
            raise TypeError(f"{name} must be a float or a tensor, got {type(t).__name__}")


class KLTerm:
    """A KL term: a family of :data:`FAMILIES` and the values of its tensors.

    Args:
        name: the family's name.
        tensors: one keyword argument per name in the family's ``tensors``.

    Raises:
        ValueError: an unknown family.
        TypeError: a tensor missing or one the family does not take.
    """

    __slots__ = ("_name", "_tensors")

    def __init__(self, name: str, /, **tensors: Any) -> None:
        family = FAMILIES.get(name)
        if family is None:
            raise ValueError(f"unknown KL family {name!r}: one of {', '.join(FAMILIES)}")
        if tensors.keys() != set(family.tensors):
            missing = [t for t in family.tensors if t not in tensors]
            unknown = sorted(set(tensors) - set(family.tensors))
            raise TypeError(
                f"KL family {name!r} takes {', '.join(family.tensors) or 'no tensors'}: "
                f"missing {missing}, unknown {unknown}"
            )
        self._name = name
        self._tensors = dict(tensors)

    @property
    def name(self) -> str:
        """The family's name (the key of :data:`FAMILIES`)."""
        return self._name

    @property
    def family(self) -> Family:
        """The family's table entry (read at each use: the table is the definition)."""
        return FAMILIES[self._name]

    @property
    def native(self) -> bool:
        """The fused kernel has this family (else it runs on the reference path)."""
        return self.family.native

    def tensors(self) -> dict[str, Any]:
        """The family's tensors by name (a new dict; the values as given)."""
        return dict(self._tensors)

    def check(self, mu: torch.Tensor) -> None:
        """Check the tensors against mu [B, D] (shape, dtype, device).

        Raises:
            TypeError, ValueError: from the family's check (the message names
                the tensor).
        """
        check = self.family.check or check_broadcastable
        check(mu, **self._tensors)

    def kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """The reference KL_bd [B, D] of q = N(mu, exp(logvar)) from this prior,
        mu and logvar [B, D] (the family's formula, in their dtype)."""
        return self.family.kl(mu, logvar, **self._tensors)

    def __repr__(self) -> str:
        args = [f"{k}={_describe(v)}" for k, v in self._tensors.items()]
        if type(self) is KLTerm:
            args.insert(0, repr(self._name))
        return f"{type(self).__name__}({', '.join(args)})"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)


class StandardNormal(KLTerm):
    """The prior N(0, I): KL_bd = -0.5 (1 + logvar - mu^2 - exp(logvar)).

    What ``elbo_loss`` uses when it is given no prior.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__("standard_normal")


class DiagonalGaussian(KLTerm):
    """A learned prior N(prior_mu, exp(prior_logvar)) (a conditional VAE's p(z | c)):
    KL_bd = 0.5 (plv - lv + (exp(lv) + (mu - pmu)^2) / exp(plv) - 1).

    Args:
        prior_mu: [B, D] means, mu's shape, dtype and device.
        prior_logvar: [B, D] log-variances, likewise. Both get gradients.

    :meth:`check` (what ``elbo_loss`` runs) refuses a missing one of the two,
    a non-tensor, and a shape, dtype or device other than mu's.
    """

    __slots__ = ()

    def __init__(
        self, prior_mu: Optional[torch.Tensor], prior_logvar: Optional[torch.Tensor]
    ) -> None:
        super().__init__("diagonal_gaussian", prior_mu=prior_mu, prior_logvar=prior_logvar)

    @property
    def prior_mu(self) -> Optional[torch.Tensor]:
        """[B, D] means of the prior."""
        value: Optional[torch.Tensor] = self._tensors["prior_mu"]
        return value

    @property
    def prior_logvar(self) -> Optional[torch.Tensor]:
        """[B, D] log-variances of the prior."""
        value: Optional[torch.Tensor] = self._tensors["prior_logvar"]
        return value


# Shared by every call without a prior (it holds no tensors): no object per call.
_STANDARD_NORMAL = StandardNormal()


def resolve(prior: Any, prior_mu: Any = None, prior_logvar: Any = None) -> KLTerm:
    """The KL-term object of a call's ``prior=``, ``prior_mu=`` and ``prior_logvar=``.

    ``prior`` as it is when given; else ``prior_mu`` / ``prior_logvar`` as a
    :class:`DiagonalGaussian` (checked later by its :meth:`~KLTerm.check`,
    which refuses a missing one of the two); none of the three: a
    :class:`StandardNormal`.

    Raises:
        TypeError: ``prior`` together with ``prior_mu`` or ``prior_logvar``,
            or a ``prior`` that is not a klanneal.kl_terms object.
    """
    if prior is None:
        if prior_mu is None and prior_logvar is None:
            return _STANDARD_NORMAL
        return DiagonalGaussian(prior_mu, prior_logvar)
    if not isinstance(prior, KLTerm):
        raise TypeError(
            "prior must be a klanneal.kl_terms object (StandardNormal(), "
            f"DiagonalGaussian(prior_mu, prior_logvar), KLTerm(name, ...)), got "
            f"{type(prior).__name__}"
        )
    if prior_mu is not None or prior_logvar is not None:
        given = " and ".join(
            n for n, v in (("prior_mu", prior_mu), ("prior_logvar", prior_logvar)) if v is not None
        )
        raise TypeError(
            f"prior= and {given}= both describe the prior: pass one of the two "
            f"(prior=DiagonalGaussian(prior_mu, prior_logvar), or the tensors alone)"
        )
    return prior
