"""The report's section and targets for the fused output projection + ELBO (bench_linear.py)."""

from __future__ import annotations

from typing import Any

from _report_format import MIB
from _report_format import fmt as _fmt
from _report_format import fmt_ms as _fmt_ms
from _report_format import mem as _mem
from _report_format import provider_key as _provider_key
from _report_format import ratio as _ratio
from _report_format import target as _target

# Issue 12 (bench_linear.py, fp32, forward + backward): klanneal.linear_elbo_loss's time
# over each peer's, (peer, threshold), and its peak extra memory over the logits'
# size, less the weight gradient where the issue allows it, (case, less it, threshold).
LINEAR_TIME_TARGETS = (("eager", 0.7), ("torch-chunked", 0.7))
LINEAR_MEMORY_TARGETS = (("linear-32k", False, 0.25), ("linear-gpt2", True, 0.15))


def linear_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 12: linear_elbo_loss's time against eager's and torch's chunked path's,
    and its peak extra memory against the logits' size."""
    by = {(r["case"], r["provider"]): r for r in rows if r.get("family") == "linear"}
    out = []
    for case in dict.fromkeys(c for c, _ in by):
        ours = by.get((case, "klanneal"))
        for peer, threshold in LINEAR_TIME_TARGETS:
            other = by.get((case, peer))
            ratio = _ratio(ours and ours["median_ms"], other and other["median_ms"])
            what = f"klanneal: time / {peer}'s"
            out.append(_target(case, what, "<=", threshold, ratio, "issue 12"))
        for target_case, minus_weight_grad, threshold in LINEAR_MEMORY_TARGETS:
            if target_case != case:
                continue
            peak = _mem(ours)
            what = "klanneal: extra memory (weight grad included) / logits"
            if minus_weight_grad:
                what = "klanneal: (extra memory - weight grad) / logits"
                if ours is not None and peak is not None:
                    peak -= ours["weight_grad_bytes"]
            ratio = _ratio(peak, ours and ours["logits_bytes"])
            out.append(_target(case, what, "<=", threshold, ratio, "issue 12"))
    return out


def linear_section(rows: list[dict[str, Any]]) -> list[str]:
    linear_rows = [r for r in rows if r.get("family") == "linear"]
    if not linear_rows:
        return []
    lines = [
        "## Fused output projection + ELBO",
        "",
        "Rows from benchmarks/bench_linear.py: the decoder's output layer and the ELBO, "
        "forward + backward (gradients of hidden, weight, mu, logvar), fp32. `eager` = "
        "F.linear + F.cross_entropy + KL; `compile` = torch.compile of it; `torch-chunked` = "
        "F.linear_cross_entropy with LinearCrossEntropyOptions() + KL; `klanneal` = "
        "klanneal.linear_elbo_loss. Peak extra memory includes the weight's gradient; "
        "`extra / logits` divides it by the size of the [N, V] fp32 logits.",
        "",
    ]
    for case in dict.fromkeys(r["case"] for r in linear_rows):
        group = [r for r in linear_rows if r["case"] == case]
        first = group[0]
        by_name = {r["provider"]: r for r in group}
        eager = by_name.get("eager")
        lines += [
            f"### {case}: {first['title']}",
            "",
            f"hidden {first['hidden_shape']}, logits {first['recon_shape']} "
            f"({first['logits_bytes'] / MIB:.1f} MiB), weight gradient "
            f"{first['weight_grad_bytes'] / MIB:.1f} MiB.",
            "",
            "| provider | median ms | p20-p80 ms | eager / provider | peak extra MiB "
            "| extra / logits | loss rel. diff vs eager |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sorted(group, key=lambda r: _provider_key(r["provider"])):
            peak = r.get("peak_extra_bytes")
            diff = r.get("loss_rel_diff_vs_eager")
            lines.append(
                f"| {r['provider']} | {_fmt_ms(r['median_ms'])} "
                f"| {_fmt_ms(r['p20_ms'])}-{_fmt_ms(r['p80_ms'])} "
                f"| {_fmt(_ratio(eager and eager['median_ms'], r['median_ms']), suffix='x')} "
                f"| {_fmt(None if peak is None else peak / MIB)} "
                f"| {_fmt(_ratio(peak, r['logits_bytes']))} "
                f"| {'-' if diff is None else f'{diff:.1e}'} |"
            )
        for r in group:
            if r.get("memory_error"):
                lines.append(f"\nMemory of {r['provider']} not measured: {r['memory_error']}")
        lines.append("")
    return lines
