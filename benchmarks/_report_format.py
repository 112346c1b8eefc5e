"""Formatting and ratio helpers shared by the benchmark report's sections."""

from __future__ import annotations

import math
from typing import Any, Optional

MIB = 2**20
# Provider order in tables and plots; providers not listed here come after, sorted.
PROVIDER_ORDER = (
    "eager", "compile", "liger", "torch-chunked", "klanneal", "klanneal-inplace", "memcpy"
)  # fmt: skip


def provider_key(name: str) -> tuple[int, str]:
    order = PROVIDER_ORDER.index(name) if name in PROVIDER_ORDER else len(PROVIDER_ORDER)
    return order, name


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def fmt(value: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}{suffix}"
    return f"{value:.{digits}f}{suffix}"


def fmt_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.3f}"
    return f"{value:.2g}"


def mem(row: Optional[dict[str, Any]]) -> Optional[float]:
    return None if row is None else row.get("peak_extra_bytes")


def target(
    case: str, what: str, op: str, threshold: float, ratio: Optional[float], source: str
) -> dict[str, Any]:
    met = None if ratio is None else (ratio >= threshold if op == ">=" else ratio <= threshold)
    return {
        "case": case,
        "target": what,
        "required": f"{op} {threshold:g}x",
        "measured": ratio,
        "met": met,
        "source": source,
    }
