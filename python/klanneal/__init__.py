"""klanneal: cyclical KL annealing and a fused ELBO loss for VAEs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

try:
    from klanneal import _C  # noqa: F401

    HAS_NATIVE = True
except ImportError:  # pragma: no cover - the fallback path is tested via KLANNEAL_DISABLE_NATIVE
    _C = None  # type: ignore[assignment]  # (mypy sees the stub _C.pyi: always a module)
    HAS_NATIVE = False


def build_info() -> dict[str, Any]:
    """How the native extension was built (see ``klanneal._C.build_info``).

    Returns ``{"native": False}`` when the extension is missing.

    Raises:
        ValueError: KLANNEAL_SIMD holds a value other than scalar, avx2 or
            avx512 (any case), as the first kernel call does.
    """
    if not HAS_NATIVE:
        return {"native": False, "version": __version__, "cuda": False}
    return {"native": True, **_C.build_info()}


from klanneal import kl_terms, likelihoods, metrics, nn, recipes, schedules  # noqa: E402
from klanneal._ops import empty_cache  # noqa: E402
from klanneal.elbo import ELBOOutput, elbo_loss  # noqa: E402
from klanneal.linear import linear_elbo_loss  # noqa: E402
from klanneal.reference import elbo_loss_ref  # noqa: E402

__all__ = [
    "ELBOOutput",
    "HAS_NATIVE",
    "build_info",
    "elbo_loss",
    "elbo_loss_ref",
    "empty_cache",
    "kl_terms",
    "likelihoods",
    "linear_elbo_loss",
    "metrics",
    "nn",
    "recipes",
    "schedules",
]
