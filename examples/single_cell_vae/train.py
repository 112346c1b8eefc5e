"""Schedules, the training loop and the held-out evaluation of the single-cell example."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any

import torch

import klanneal
import klanneal.metrics
import klanneal.nn
import klanneal.schedules
from klanneal.likelihoods import ZeroInflatedNegativeBinomial

from .data import CountData
from .metrics import knn_accuracy, pca_projection, silhouette_score
from .model import SingleCellVAE
from .scvi_formula import SCVI_EPS, scvi_zinb_nll

SCHEDULE_NAMES = ("monotonic", "cyclical")
EXTRA_SCHEDULES = ("constant",)  # beta = 1 throughout: no annealing (not run by default)
LATENT_DIM = 10
HIDDEN_DIM = 128
EVAL_SAMPLES = 5  # z samples per held-out cell for the reconstruction term
EVAL_CHUNK = 1024  # held-out cells per evaluation call


def make_schedule(name: str, steps: int, args: argparse.Namespace) -> klanneal.schedules.Schedule:
    """The beta schedule ``name`` over ``steps`` optimizer steps.

    monotonic: 0 -> 1 linearly over the first ``warmup_fraction`` of the steps,
    then 1 (scvi-tools' KL warm-up, counted in steps); cyclical: Fu et al.'s
    M cycles, ramping over a fraction R of each; constant: beta = 1.

    Raises:
        ValueError: from klanneal.schedules, for parameters that do not fit.
    """
    if name == "monotonic":
        return klanneal.schedules.Monotonic(max(1, round(args.warmup_fraction * steps)))
    if name == "cyclical":
        return klanneal.schedules.Cyclical(steps, n_cycles=args.n_cycles, ratio=args.ratio)
    if name == "constant":
        return klanneal.schedules.Constant(1.0)
    raise ValueError(f"unknown schedule {name!r}")


@dataclass
class RunResult:
    """One schedule's run: held-out metrics, training curves, the trained model."""

    name: str
    metrics: dict[str, Any]
    curves: dict[str, list[float]] = field(default_factory=dict)
    model: SingleCellVAE | None = None
    qz_m_held_out: torch.Tensor | None = None  # [N_held, L], for the figure


def _batches(train_idx: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless shuffled passes over the training cells, whole batches only: a
    batch of one cell would break BatchNorm's training statistics."""
    size = min(batch_size, train_idx.numel())
    while True:
        order = train_idx[torch.randperm(train_idx.numel(), generator=generator)]
        for start in range(0, order.numel() - size + 1, size):
            yield order[start : start + size]


def train_one(
    name: str,
    data: CountData,
    train_idx: torch.Tensor,
    held_idx: torch.Tensor,
    args: argparse.Namespace,
) -> RunResult:
    """Trains one model under schedule ``name`` and evaluates it on the held-out cells."""
    torch.manual_seed(args.seed)  # the same initial weights and dropout masks for every schedule
    generator = torch.Generator().manual_seed(args.seed)  # batches and z samples
    model = SingleCellVAE(data.counts.shape[1], LATENT_DIM, HIDDEN_DIM)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    # The likelihood's parameters change every batch (theta = exp(px_r) is
    # recomputed for its gradient, px_dropout comes from the decoder): the
    # object given here is replaced before each call.
    criterion = klanneal.nn.ELBOLoss(
        make_schedule(name, args.steps, args), likelihood=ZeroInflatedNegativeBinomial()
    )
    curves: dict[str, list[float]] = {"beta": [], "recon": [], "kl": []}
    batches = _batches(train_idx, args.batch_size, generator)
    report_every = max(1, args.steps // 10)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        x = data.counts[next(batches)]
        out = model(x, generator)
        criterion.likelihood = ZeroInflatedNegativeBinomial(model.theta(), out.px_dropout)
        elbo = criterion(out.px_rate, x, out.qz_m, out.qz_logvar)
        optimizer.zero_grad(set_to_none=True)
        elbo.loss.backward()
        optimizer.step()
        criterion.step()
        curves["beta"].append(float(elbo.beta))
        curves["recon"].append(float(elbo.recon))
        curves["kl"].append(float(elbo.kl))
        if not args.quiet and ((step + 1) % report_every == 0 or step + 1 == args.steps):
            print(
                f"  {name:>9} step {step + 1:>5}/{args.steps}: beta {float(elbo.beta):.3f}, "
                f"rec {float(elbo.recon):.1f}, KL {float(elbo.kl):.2f} nats/cell (batch)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    metrics, qz_m_held = evaluate(model, data, train_idx, held_idx, args.seed)
    metrics["final_beta"] = curves["beta"][-1]
    metrics["train_seconds"] = seconds
    return RunResult(name, metrics, curves, model, qz_m_held)


@torch.no_grad()
def posterior_means(model: SingleCellVAE, counts: torch.Tensor) -> torch.Tensor:
    """[N, L] E_q[z | x] of each cell, in evaluation mode."""
    model.eval()
    return torch.cat([model.encode(c)[0] for c in counts.split(EVAL_CHUNK)])


@torch.no_grad()
def heldout_elbo(model: SingleCellVAE, counts: torch.Tensor, seed: int) -> tuple[float, float]:
    """(reconstruction, KL) in nats per cell on ``counts`` [N, G], beta = 1.

    The reconstruction term -E_q[log p(x | z)] is averaged over EVAL_SAMPLES
    draws of z per cell; the KL is the closed form. Both through klanneal.elbo_loss.
    """
    model.eval()
    generator = torch.Generator().manual_seed(seed + 1)
    theta = model.theta()
    recon = kl = 0.0
    for x in counts.split(EVAL_CHUNK):
        for _ in range(EVAL_SAMPLES):
            out = model(x, generator)
            elbo = klanneal.elbo_loss(
                out.px_rate, x, out.qz_m, out.qz_logvar, beta=1.0, reduction="sum",
                likelihood=ZeroInflatedNegativeBinomial(theta, out.px_dropout),
            )  # fmt: skip
            recon += float(elbo.recon) / EVAL_SAMPLES
        kl += float(elbo.kl)  # closed form: the same for every draw of z
    return recon / counts.shape[0], kl / counts.shape[0]


def separation(
    points: torch.Tensor, labels: torch.Tensor, train_idx: torch.Tensor, held_idx: torch.Tensor
) -> dict[str, float | None]:
    """k-NN accuracy of the held-out cells against the training cells, and the
    held-out cells' silhouette (None when they hold a single type)."""
    held_labels = labels[held_idx]
    return {
        "knn_accuracy": knn_accuracy(
            points[train_idx], labels[train_idx], points[held_idx], held_labels
        ),
        "silhouette": (
            silhouette_score(points[held_idx], held_labels)
            if held_labels.unique().numel() > 1
            else None
        ),
    }


def evaluate(
    model: SingleCellVAE,
    data: CountData,
    train_idx: torch.Tensor,
    held_idx: torch.Tensor,
    seed: int,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Held-out metrics of a trained model, and the held-out posterior means."""
    recon, kl = heldout_elbo(model, data.counts[held_idx], seed)
    qz_m = posterior_means(model, data.counts)
    metrics: dict[str, Any] = {
        "recon": recon,
        "kl": kl,
        "elbo": recon + kl,
        "active_units": klanneal.metrics.active_units(qz_m[held_idx]),
        "latent_dim": LATENT_DIM,
        **separation(qz_m, data.cell_type, train_idx, held_idx),
    }
    return metrics, qz_m[held_idx]


def reference_separation(
    data: CountData, train_idx: torch.Tensor, held_idx: torch.Tensor
) -> dict[str, dict[str, float | None]]:
    """The same separation metrics on the true latent positions (the ceiling)
    and on the usual non-model baseline: the first LATENT_DIM principal
    components of log1p(counts scaled to the median library size), the axes
    fitted on the training cells."""
    counts = data.counts
    library = counts.sum(dim=1, keepdim=True).clamp_min(1.0)
    normalised = torch.log1p(counts / library * library[train_idx].median())
    centre, axes = pca_projection(normalised[train_idx], LATENT_DIM)
    pcs = (normalised.double() - centre) @ axes
    return {
        "true_latent": separation(data.latent, data.cell_type, train_idx, held_idx),
        "pca": separation(pcs, data.cell_type, train_idx, held_idx),
    }


@torch.no_grad()
def eps_effect(
    model: SingleCellVAE, counts: torch.Tensor, seed: int, eps: float = SCVI_EPS
) -> dict[str, float]:
    """What scvi-tools' epsilon changes, on one batch of cells ``counts`` [B, G].

    The reconstruction term per cell (sum over genes) from scvi-tools'
    formula with ``eps`` minus the same formula with eps = 0, both in float64
    at the model's parameters for one z per cell; and klanneal's float32 term
    (no epsilon) minus the float64 eps = 0 one (its rounding). Nats per cell.
    """
    model.eval()
    out = model(counts, torch.Generator().manual_seed(seed + 2))
    theta = model.theta()
    args64 = [t.double() for t in (counts, out.px_rate, theta, out.px_dropout)]
    exact = scvi_zinb_nll(*args64, eps=0.0).sum(dim=1)
    with_eps = scvi_zinb_nll(*args64, eps=eps).sum(dim=1)
    ours = klanneal.elbo_loss(
        out.px_rate, counts, out.qz_m, out.qz_logvar, beta=1.0, reduction="none",
        likelihood=ZeroInflatedNegativeBinomial(theta, out.px_dropout),
    ).recon  # fmt: skip
    scvi_fp32 = scvi_zinb_nll(counts, out.px_rate, theta, out.px_dropout, eps=eps).sum(dim=1)
    return {
        "cells": counts.shape[0],
        "eps": eps,
        "recon_per_cell": float(exact.mean()),
        "eps_shift_mean": float((with_eps - exact).mean()),
        "eps_shift_max_abs": float((with_eps - exact).abs().max()),
        "klanneal_fp32_error_max_abs": float((ours.double() - exact).abs().max()),
        "scvi_fp32_error_max_abs": float((scvi_fp32.double() - exact).abs().max()),
    }
