"""Combine text-VAE runs into the README's Penn Treebank table and figure.

    python examples/ptb_report.py --out docs/ptb \\
        ptb_run/main ptb_run/ablation_constlr=cyclical:"cyclical, constant lr (ablation)"

Each argument is a run directory written by ``examples/text_vae.py`` (its
``summary.json`` and ``runs/NAME/result.pt``), optionally followed by
``=NAME:LABEL`` to take only schedule NAME from it under another label.
Writes ``summary.json`` (the runs' summaries merged: recipe, splits, and per
row rec, kl, nelbo, ppl, au, mi, epochs, steps, seconds, seed, git sha and the
command), ``summary.md`` (the table) and ``valid_curves.png`` (KL, Rec and
-ELBO on the validation split over training, beta and the learning rate).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import text_vae  # examples/text_vae/, beside this script
import torch

ROWS = ("rec", "kl", "nelbo", "ppl", "au", "mi", "epochs", "steps", "seconds", "seed")


def _load(spec: str):
    path, _, pick = spec.partition("=")
    run_dir = Path(path)
    summary = json.loads((run_dir / "summary.json").read_text())
    names = list(summary["schedules"])
    label = None
    if pick:
        name, _, label = pick.partition(":")
        names = [name]
    out = []
    for name in names:
        result = torch.load(run_dir / "runs" / name / "result.pt", weights_only=False)["result"]
        row_label = label or name
        result.name = row_label
        entry = {k: summary["schedules"][name][k] for k in ROWS}
        entry["latent_dim"] = summary["schedules"][name]["latent_dim"]
        entry["lr_schedule"] = summary["schedules"][name]["lr_schedule"]
        entry["git_sha"] = summary["git_sha"]
        entry["command"] = summary.get("command")
        out.append((row_label, entry, result, summary))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--git-sha",
        default=None,
        help="the commit the runs trained at, when the summaries were written later "
        "(e.g. by a --resume that only collected the results)",
    )
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR=NAME:LABEL")
    args = parser.parse_args(argv)
    rows = [row for spec in args.runs for row in _load(spec)]
    labels = [label for label, _, _, _ in rows]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        # summary.json is keyed by label: a repeated one would keep only its last run.
        parser.error(
            f"the rows {repeated} come from more than one run: label them, "
            "e.g. RUN_DIR=cyclical:cyclical-seed1"
        )
    if args.git_sha:
        for _, entry, _, _ in rows:
            entry["git_sha"] = args.git_sha
    first = rows[0][3]
    merged = {
        "recipe": first["recipe"],
        "train_split": first["train_split"],
        "eval_split": first["eval_split"],
        "valid_split": first["valid_split"],
        "schedules": {label: entry for label, entry, _, _ in rows},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(merged, indent=2) + "\n")
    lines = [
        "| schedule | lr | rec | KL | -ELBO | PPL | AU | MI |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, e, _, _ in rows:
        lines.append(
            f"| {label} | {e['lr_schedule']} | {e['rec']:.2f} | {e['kl']:.3f} | "
            f"{e['nelbo']:.2f} | {e['ppl']:.1f} | {e['au']}/{e['latent_dim']} | {e['mi']:.3f} |"
        )
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    results = [r for _, _, r, _ in rows]
    e0 = rows[0][1]
    length = f"{e0['steps']} steps"
    if e0["epochs"] is not None:  # None: trained with --steps
        length = f"{e0['epochs']:g} epochs = {length}"
    title = f"PTB, recipe {merged['recipe']}: {length}, seed {e0['seed']}"
    text_vae.plot_valid_curves(results, args.out / "valid_curves.png", title, "valid")
    print("\n".join(lines))
    print(f"wrote {args.out}/summary.json, summary.md, valid_curves.png", file=sys.stderr)


if __name__ == "__main__":
    main()
