"""Figures, the summary and the result table of the text-VAE example."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import klanneal.schedules

from .data import EXTRA_SCHEDULES, PAPER_TOY, SCHEDULE_NAMES
from .train import RunResult, lr_kind, make_schedule

# --------------------------------------------------------------------------- reporting


def _smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the curves of single mini-batches are noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


MISSING_MATPLOTLIB = (
    "matplotlib is not installed: the run's figures will be skipped (the tables and JSON "
    "are written); pip install 'klanneal[demo]' for them"
)


def has_matplotlib() -> bool:
    """Whether the figures can be drawn (matplotlib, in the demo extra, imports)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise RuntimeError(
            "the demo's figures need matplotlib: pip install 'klanneal[demo]'"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(
    results: Sequence[RunResult], path: Path, title: str, optimum: float | None
) -> None:
    """Learning curves of -ELBO, reconstruction, KL and beta (as in the paper)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    steps = max(len(r.curves["step"]) for r in results)
    # Corpus batches differ in sentence length (nats per sequence swing with
    # it), so their curves need a wider window than the toy's full batches.
    window = max(1, steps // (100 if optimum is not None else 25))
    panels = (
        ("elbo", "-ELBO (rec + KL, beta = 1)"),
        ("recon", "reconstruction"),
        ("kl", "KL"),
        ("beta", "beta"),
    )
    for ax, (key, label) in zip(axes, panels):
        for r in results:
            values = r.curves[key] if key == "beta" else _smooth(r.curves[key], window)
            ax.plot(r.curves["step"], values, label=r.name, linewidth=1.2)
        if key in ("elbo", "recon"):
            # The first steps (tens of nats) would flatten the part that matters.
            settled = [v for r in results for v in _smooth(r.curves[key], window)[steps // 10 :]]
            if settled:
                ax.set_ylim(0, 1.2 * max(settled))
        if key == "elbo" and optimum is not None:
            ax.axhline(optimum, color="gray", linestyle=":", label=f"log N = {optimum:.3f}")
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_valid_curves(results: Sequence[RunResult], path: Path, title: str, split: str) -> None:
    """-ELBO, reconstruction and KL on the validation split over training, beta and lr."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.6))
    panels = (
        ("elbo", f"-ELBO on {split}"),
        ("recon", f"reconstruction on {split}"),
        ("kl", f"KL on {split}"),
        ("beta", "beta (training)"),
        ("lr", "learning rate (training)"),
    )
    for ax, (key, label) in zip(axes, panels):
        for r in results:
            if key in ("beta", "lr"):
                ax.plot(r.curves["step"], r.curves.get(key, []), label=r.name, linewidth=1.0)
            else:
                ax.plot(r.valid_curves["step"], r.valid_curves[key], marker=".", label=r.name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_latent(
    results: Sequence[RunResult], path: Path, samples: int, seed: int, title: str
) -> None:
    """Posterior samples and means of each sequence in 2-D, one panel per schedule.

    With a 1- or 2-D latent the axes are z's dimensions; otherwise a PCA of the
    posterior means (computed per schedule) projects means and samples.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    gen = torch.Generator().manual_seed(seed)
    cmap = plt.get_cmap("tab10")
    for ax, r in zip(axes[0], results):
        mu, logvar = r.final.mu, r.final.logvar
        n, d = mu.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * torch.randn(
            (n, samples, d), generator=gen
        )
        if d <= 2:
            # eye(1, 2) draws a 1-D latent along the x axis.
            centre, basis = torch.zeros(d), torch.eye(d, 2)
            xlabel, ylabel = "z1", "z2"
        else:
            centre = mu.mean(0)
            _, _, v = torch.linalg.svd(mu - centre, full_matrices=False)
            basis = v[:2].T
            xlabel, ylabel = "PC1 of posterior means", "PC2"
        for i in range(n):
            pts = (z[i] - centre) @ basis
            ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.35, color=cmap(i % 10))
            m = (mu[i : i + 1] - centre) @ basis
            ax.scatter(m[:, 0], m[:, 1], s=60, marker="x", color=cmap(i % 10))
        ax.set_title(f"{r.name}: KL {r.final.kl:.2f}, MI {r.final.mutual_info:.2f}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summarise(results: Sequence[RunResult], args: argparse.Namespace, toy: bool) -> dict[str, Any]:
    """Machine-readable summary: config, per-schedule metrics, paper values, ordering check."""
    schedules = {}
    for r in results:
        f = r.final
        schedules[r.name] = {
            "recon": f.recon,
            "kl": f.kl,
            "elbo": f.elbo,
            "perplexity": f.perplexity,
            "active_units": f.active_units,
            "latent_dim": args.latent_dim,
            "mutual_info": f.mutual_info,
            "final_beta": r.curves["beta"][-1] if r.curves["beta"] else None,
            "train_seconds": r.seconds,
            # The names the paper's table uses (issue 13's summary format).
            "rec": f.recon,
            "nelbo": f.elbo,
            "ppl": f.perplexity,
            "au": f.active_units,
            "mi": f.mutual_info,
            "epochs": args.epochs,
            "steps": args.steps,
            "seconds": r.seconds,
            "seed": args.seed,
            "lr_schedule": lr_kind(r.name, args),
        }
        if toy:
            # The paper has no controller run: its values are None there.
            schedules[r.name]["paper"] = PAPER_TOY.get(_schedule_name(r.name))
    kls = {name: s["kl"] for name, s in schedules.items()}
    ordering = None
    if all(n in kls for n in SCHEDULE_NAMES):
        ordering = kls["cyclical"] > kls["monotonic"] > kls["constant"]
    return {
        "mode": "toy" if toy else "corpus",
        "recipe": args.recipe,
        "train_split": None if toy else args.train_split,
        "eval_split": None if toy else args.eval_split,
        "valid_split": None if toy else args.valid_split,
        "git_sha": git_sha(),
        "command": " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else None,
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "optimum_elbo": math.log(args.n_sequences) if toy else None,
        "schedules": schedules,
        "kl_order_cyclical_gt_monotonic_gt_constant": ordering,
    }


def _schedule_name(label: str) -> str:
    """The schedule of a run labelled `label` (the name, or "cyclical, ..." for a variant)."""
    return label.split(",")[0]


def format_table(summary: dict[str, Any]) -> str:
    """The result table as markdown (the paper's toy values beside ours in toy mode)."""
    toy = summary["mode"] == "toy"
    if toy:
        head = "| schedule | rec | KL | -ELBO | AU | MI | paper KL | paper -ELBO |"
        rule = "|---|---:|---:|---:|---:|---:|---:|---:|"
    else:
        head = "| schedule | rec | KL | -ELBO | PPL | AU | MI |"
        rule = "|---|---:|---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for name, s in summary["schedules"].items():
        au = f"{s['active_units']}/{s['latent_dim']}"
        row = f"| {name} | {_fmt(s['recon'])} | {_fmt(s['kl'])} | {_fmt(s['elbo'])} | "
        if toy:
            paper = s["paper"] or {"kl": "-", "elbo": "-"}
            row += f"{au} | {_fmt(s['mutual_info'])} | {paper['kl']} | {paper['elbo']} |"
        else:
            row += f"{_fmt(s['perplexity'], 2)} | {au} | {_fmt(s['mutual_info'])} |"
        lines.append(row)
    return "\n".join(lines)


def ordering_sentence(summary: dict[str, Any]) -> str:
    """States whether KL cyclical > monotonic > constant held in this run."""
    held = summary["kl_order_cyclical_gt_monotonic_gt_constant"]
    if held is None:
        return "KL ordering: not checked (needs all three schedules)."
    kls = {n: summary["schedules"][n]["kl"] for n in SCHEDULE_NAMES}
    order = " > ".join(sorted(kls, key=lambda n: -kls[n]))
    verdict = "HELD" if held else "did NOT hold"
    return (
        f"KL ordering cyclical > monotonic > constant (the paper's): {verdict} in this run "
        f"(observed {order})."
    )


def write_outputs(
    results: Sequence[RunResult], args: argparse.Namespace, toy: bool, out_dir: Path
) -> dict[str, Any]:
    """summary.json, summary.md, curves.json and the PNG figures under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(results, args, toy)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "curves.json").write_text(
        json.dumps(
            {r.name: {**r.curves, "valid": r.valid_curves} for r in results},
            separators=(",", ":"),
        )
        + "\n"
    )
    what = (
        f"toy data: {args.n_sequences} sequences x {args.seq_len} words"
        if toy
        else f"corpus {args.data} (train split {args.train_split}, eval split {args.eval_split})"
    )
    budget = f"{args.epochs:g} epochs = " if args.epochs is not None else ""
    recipe = f"recipe {args.recipe}; " if args.recipe != "none" else ""
    title = f"{what}; {recipe}{budget}{args.steps} steps, seed {args.seed}"
    figures = (
        _write_figures(results, args, toy, out_dir, title, summary) if has_matplotlib() else []
    )
    lines = [
        "# klanneal text-VAE demo",
        "",
        f"{title}. Numbers in nats per sequence, "
        + (
            "on the training data (the toy data set is the whole distribution)."
            if toy
            else f"on the {args.eval_split} split."
        ),
        "",
        format_table(summary),
        "",
    ]
    if toy:
        lines += [
            f"Best possible -ELBO: log({args.n_sequences}) = {summary['optimum_elbo']:.3f}. "
            "AU = active units (Cov(E_q[z_d]) > 0.01); MI = I(x; z) in nats "
            f"(at most {summary['optimum_elbo']:.3f}). "
            "Paper values: end of training in the learning-curve figure of Fu et al. (2019).",
            "",
            ordering_sentence(summary),
            "",
        ]
    else:
        lines += [
            "PPL = exp(-ELBO / tokens) (an upper bound; tokens include <eos>). "
            "AU = active units (Cov(E_q[z_d]) > 0.01); MI = I(x; z) in nats.",
            "",
        ]
    lines += [f"![{f}]({f})" for f in figures] + [""]
    (out_dir / "summary.md").write_text("\n".join(lines))
    return summary


def git_sha() -> str | None:
    """The checkout's commit (with ``-dirty`` for uncommitted changes), or None."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha + ("-dirty" if dirty else "")


def _write_figures(
    results: Sequence[RunResult],
    args: argparse.Namespace,
    toy: bool,
    out_dir: Path,
    title: str,
    summary: dict[str, Any],
) -> list[str]:
    """The PNG figures under ``out_dir``; returns their names."""
    plot_curves(results, out_dir / "learning_curves.png", title, summary["optimum_elbo"])
    figures = ["learning_curves.png"]
    # The schedules themselves, drawn by klanneal's own plot (python -m klanneal schedule);
    # a controller's beta depends on the run (the learning curves show it).
    curves = [
        (r.name, make_schedule(_schedule_name(r.name), args.steps, args))
        for r in results
        if _schedule_name(r.name) not in EXTRA_SCHEDULES
    ]
    if curves:
        _pyplot()  # the Agg backend
        fig = klanneal.schedules.plot_schedules(
            curves, args.steps, f"beta schedules; {args.steps} steps"
        )
        fig.savefig(out_dir / "schedules.png", dpi=90)
        _pyplot().close(fig)
        figures.append("schedules.png")
    if any(r.valid_curves.get("step") for r in results):
        plot_valid_curves(results, out_dir / "valid_curves.png", title, args.valid_split)
        figures.append("valid_curves.png")
    if toy:
        plot_latent(results, out_dir / "latent_space.png", 200, args.seed, title)
        figures.append("latent_space.png")
    return figures
