"""The report's section and targets for the count likelihoods (bench_counts.py, issue 24)."""

from __future__ import annotations

from typing import Any

from _report_format import MIB
from _report_format import fmt as _fmt
from _report_format import fmt_ms as _fmt_ms
from _report_format import mem as _mem
from _report_format import provider_key as _provider_key
from _report_format import ratio as _ratio
from _report_format import target as _target

# Issue 24 (fp32, forward + backward): (case, peer, threshold, what) for "the peer's
# median time / klanneal's >= threshold". Judged on every device the count cases ran on,
# and listed as not measured for the CPU when they did not run there.
COUNT_TARGETS = (
    ("zinb-20k", "eager", 5.0, "klanneal: speed-up over eager"),
    ("zinb-20k", "compile", 2.5, "klanneal: speed-up over compile"),
    ("scvi-step", "eager", 1.5, "klanneal: training-step speed-up over eager"),
)


def _count_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("family") == "counts"]


def count_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 24: klanneal's speed-up over the hand-written scVI loss and its
    torch.compile (ZINB, G=20000), and over the hand-written loss in a training step."""
    counts = _count_rows(rows)
    by = {(r["device"], r["case"], r["provider"]): r for r in counts}
    out = []
    for device in dict.fromkeys(["cpu", *(r["device"] for r in counts)]):
        for case, peer, threshold, what in COUNT_TARGETS:
            ours, other = by.get((device, case, "klanneal")), by.get((device, case, peer))
            ratio = _ratio(other and other["median_ms"], ours and ours["median_ms"])
            label = case if device == "cpu" else f"{case} ({device})"
            out.append(_target(label, what, ">=", threshold, ratio, "issue 24"))
    return out


def counts_section(rows: list[dict[str, Any]]) -> list[str]:
    counts = _count_rows(rows)
    if not counts:
        return []
    repeats = "/".join(str(n) for n in sorted({r["repeats"] for r in counts}))
    lines = [
        "## Count likelihoods",
        "",
        f"Rows from benchmarks/bench_counts.py (issue 24): medians of {repeats} round-robin "
        "calls per provider, fp32, forward + backward, gradients "
        "of px_rate, theta ([G], per gene), zi_logits, mu and logvar. `eager` = scvi-tools' "
        "log_zinb_positive / log_nb_positive (transcribed in benchmarks/_scvi_loss.py, eps "
        "1e-8) summed over genes + beta * KL, the mean over cells; `compile` = torch.compile "
        "of it; `klanneal` = klanneal.elbo_loss with ZeroInflatedNegativeBinomial(theta, "
        "zi_logits) or NegativeBinomial(theta). Each provider's loss and gradients are "
        "checked against eager's before timing. `scvi-step` = one Adam step of the scVI-like "
        "VAE of examples/single_cell_vae with each loss (memory not measured). `extra / "
        "px_rate` = peak extra memory over px_rate's size (B x G x 4 bytes); `zeros` = the "
        "fraction of zero counts.",
        "",
        "| case | device | provider | median ms | p20-p80 ms | eager / provider "
        "| compile / provider | peak extra MiB | extra / px_rate | zeros | loss rel. diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by = {(r["device"], r["case"], r["provider"]): r for r in counts}
    for device, case in dict.fromkeys((r["device"], r["case"]) for r in counts):
        lines += _case_lines(by, device, case)
    notes = [
        f"\nMemory of {r['provider']} ({r['case']}, {r['device']}) not measured: "
        f"{r['memory_error']}"
        for r in counts
        if r.get("memory_error")
    ]
    if any(r["provider"] == "klanneal" and not r.get("klanneal_native", True) for r in counts):
        notes.append(
            "\nklanneal ran its pure-PyTorch reference path (klanneal/_count_ref.py) for these "
            "families: the native count kernel was not available."
        )
    return lines + notes + [""]


def _case_lines(
    by: dict[tuple[str, str, str], dict[str, Any]], device: str, case: str
) -> list[str]:
    group = sorted(
        (r for (d, c, _), r in by.items() if (d, c) == (device, case)),
        key=lambda r: _provider_key(r["provider"]),
    )
    eager, compiled = by.get((device, case, "eager")), by.get((device, case, "compile"))
    lines = []
    for r in group:
        peak, diff, zeros = _mem(r), r.get("loss_rel_diff_vs_eager"), r.get("zero_fraction")
        lines.append(
            f"| {case} | {device} | {r['provider']} | {_fmt_ms(r['median_ms'])} "
            f"| {_fmt_ms(r['p20_ms'])}-{_fmt_ms(r['p80_ms'])} "
            f"| {_fmt(_ratio(eager and eager['median_ms'], r['median_ms']), suffix='x')} "
            f"| {_fmt(_ratio(compiled and compiled['median_ms'], r['median_ms']), suffix='x')} "
            f"| {_fmt(None if peak is None else peak / MIB)} "
            f"| {_fmt(_ratio(peak, r['logits_bytes']))} "
            f"| {'-' if zeros is None else f'{zeros:.2f}'} "
            f"| {'-' if diff is None else f'{diff:.1e}'} |"
        )
    return lines
