"""The summary (JSON and markdown), the printed table and the figure of the single-cell example."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import klanneal

from .data import TRUE_LATENT_DIM, CountData
from .metrics import KNN_NEIGHBOURS
from .train import EVAL_SAMPLES, LATENT_DIM, RunResult

MISSING_MATPLOTLIB = (
    "matplotlib is not installed: the figure will be skipped (summary.json and summary.md "
    "are written); pip install 'klanneal[demo]' for it"
)
FIGURE = "single_cell_vae.png"


def has_matplotlib() -> bool:
    """Whether the figure can be drawn (matplotlib, in the demo extra, imports)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(summary: dict[str, Any]) -> str:
    """The markdown table: one row per schedule, then the two reference representations."""
    k = summary["knn_neighbours"]
    lines = [
        f"| schedule | rec | KL | -ELBO | active units | {k}-NN accuracy | silhouette | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["schedules"].items():
        lines.append(
            f"| {name} | {m['recon']:.2f} | {m['kl']:.2f} | {m['elbo']:.2f} "
            f"| {m['active_units']}/{m['latent_dim']} | {m['knn_accuracy']:.3f} "
            f"| {_number(m['silhouette'], 3)} | {m['train_seconds']:.0f} |"
        )
    labels = {
        "true_latent": f"(true z, d = {summary['data']['true_latent_dim']})",
        "pca": f"({summary['latent_dim']} PCs of log1p normalised counts)",
    }
    for key, m in summary["references"].items():
        lines.append(
            f"| {labels[key]} | | | | | {m['knn_accuracy']:.3f} | {_number(m['silhouette'], 3)} | |"
        )
    return "\n".join(lines)


def data_summary(data: CountData, train_idx: torch.Tensor, held_idx: torch.Tensor) -> dict:
    """Sizes and the statistics a reader checks first (sparsity, library sizes)."""
    totals = data.counts.sum(dim=1)
    return {
        "cells": data.counts.shape[0],
        "genes": data.counts.shape[1],
        "types": data.n_types,
        "train_cells": train_idx.numel(),
        "held_out_cells": held_idx.numel(),
        "true_latent_dim": TRUE_LATENT_DIM,
        "zero_fraction": float((data.counts == 0).double().mean()),
        "mean_dropout_probability": float(data.dropout.double().mean()),
        "median_total_counts": float(totals.median()),
        "median_theta": float(data.theta.median()),
    }


def build_summary(
    results: Sequence[RunResult],
    references: dict[str, Any],
    data_stats: dict[str, Any],
    eps: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Everything summary.json holds (nats per held-out cell for rec, KL, -ELBO)."""
    return {
        "klanneal_version": klanneal.__version__,
        "torch_version": torch.__version__,
        "command_flags": {k: v for k, v in vars(args).items() if k != "out"},
        "threads": args.threads,
        "data": data_stats,
        "latent_dim": LATENT_DIM,
        "knn_neighbours": KNN_NEIGHBOURS,
        "schedules": {r.name: r.metrics for r in results},
        "references": references,
        "eps_effect": eps,
    }


def eps_sentence(eps: dict[str, Any]) -> str:
    """What scvi-tools' epsilon changes, in one sentence (train.eps_effect's numbers)."""
    return (
        f"scvi-tools' eps = {eps['eps']:g}, on {eps['cells']} held-out cells and the "
        f"{eps['schedule']} model: the reconstruction, {eps['recon_per_cell']:.2f} nats/cell, "
        f"moves by {eps['eps_shift_mean']:+.1e} on average (at most "
        f"{eps['eps_shift_max_abs']:.1e}) in float64; the float32 rounding of the per-cell "
        f"sum is {eps['klanneal_fp32_error_max_abs']:.1e} for klanneal and "
        f"{eps['scvi_fp32_error_max_abs']:.1e} for scvi-tools' formula (max over the cells)"
    )


def write_outputs(summary: dict[str, Any], results: Sequence[RunResult], out_dir: Path) -> None:
    """summary.json, summary.md, curves.json (per-step training beta, rec and KL)."""
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "curves.json").write_text(json.dumps({r.name: r.curves for r in results}) + "\n")
    d = summary["data"]
    md = [
        "# Single-cell VAE: monotonic vs cyclical KL annealing",
        "",
        f"Synthetic ZINB counts: {d['cells']} cells x {d['genes']} genes, {d['types']} cell "
        f"types in a {d['true_latent_dim']}-d latent space ({d['zero_fraction']:.0%} zeros, "
        f"median {d['median_total_counts']:.0f} counts per cell); {d['train_cells']} training "
        f"and {d['held_out_cells']} held-out cells. Model: scVI-like, latent "
        f"{summary['latent_dim']}, ZINB likelihood (klanneal.likelihoods), "
        f"{summary['command_flags']['steps']} Adam steps per schedule, seed "
        f"{summary['command_flags']['seed']}, {summary['threads']} thread(s).",
        "",
        "Held-out cells, nats per cell (rec: -E_q log p(x|z), "
        f"{EVAL_SAMPLES} z samples; -ELBO = rec + KL); "
        f"{summary['knn_neighbours']}-NN accuracy of the held-out posterior means against the "
        "training cells' and the held-out silhouette, by the known cell types:",
        "",
        format_table(summary),
        "",
        eps_sentence(summary["eps_effect"]) + ".",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(md))


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (single mini-batches are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(results: Sequence[RunResult], held_types: torch.Tensor, path: Path) -> None:
    """Training curves (beta, KL, rec) and the held-out posterior means
    (their first two principal axes), coloured by the true cell type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(1, 3 + n, figsize=(4 * (3 + n), 3.6))
    window = max(1, len(results[0].curves["beta"]) // 50)
    for ax, key, title in zip(
        axes, ("beta", "kl", "recon"), ("beta", "KL (training batches)", "rec (training batches)")
    ):
        for r in results:
            values = r.curves[key] if key == "beta" else _smooth(r.curves[key], window)
            ax.plot(values, label=r.name, linewidth=1.0)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    for ax, r in zip(axes[3:], results):
        assert r.qz_m_held_out is not None
        points = r.qz_m_held_out.double()
        points = points - points.mean(dim=0)
        _, _, vh = torch.linalg.svd(points, full_matrices=False)
        xy = points @ vh[:2].T
        ax.scatter(xy[:, 0], xy[:, 1], c=held_types, cmap="tab10", s=4)
        ax.set_title(f"{r.name}: held-out E_q[z] (2 PCs)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
