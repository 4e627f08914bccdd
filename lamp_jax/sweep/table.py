"""A sweep's results: one row per trial, read from its run directory, and the table and figure
of mean +- std over seeds per configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lamp_jax.run_dir import RunDirectory
from lamp_jax.sweep.grid import Trial


def trial_row(trial: Trial, config: ml_collections.ConfigDict, directory: RunDirectory
              ) -> dict[str, Any]:
    """One trial's line of ``sweep.json``, read from its run directory's ``metrics.json``."""
    metrics = directory.metrics()
    kind = config.mask.eval_kind
    binary = "pruned" if kind == "threshold" else "pruned_threshold"
    soft = "pruned" if kind == "expectation" else "pruned_expectation"
    steps = [h["step"] for h in metrics["history"] if h.get("best")]
    return {
        "label": trial.label, "overrides": dict(trial.overrides), "seed": config.seed,
        "mode": config.mask.mode, "learning_rate": config.optim.learning_rate,
        "run_dir": str(Path("runs") / trial.name),
        "selected_by": f"dev macro P@1, {kind}", "best_step": steps[-1] if steps else None,
        "dev_binary": metrics["dev"][binary]["macro_P@1"],
        "dev_soft": metrics["dev"][soft]["macro_P@1"],
        "test_binary": metrics["test"][binary]["macro_P@1"],
        "test_soft": metrics["test"][soft]["macro_P@1"],
        "test_full": metrics["test"]["full"]["macro_P@1"],
        "test_binary_summary": metrics["test"][binary],
        "sparsity": float(np.mean(metrics["sparsity"]["total"])),
        "steps": metrics["steps"],
    }


COLUMNS = (("dev_binary", "dev P@1 binary"), ("dev_soft", "dev P@1 soft"),
           ("test_binary", "test P@1 binary"), ("test_soft", "test P@1 soft"),
           ("sparsity", "sparsity"))


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample standard deviation (``ddof=1``) over seeds per configuration, in
    first-seen order."""
    labels = list(dict.fromkeys(r["label"] for r in records))
    rows = []
    for label in labels:
        runs = [r for r in records if r["label"] == label]
        row = {"label": label, "seeds": [r["seed"] for r in runs],
               "run_dirs": [r["run_dir"] for r in runs if "run_dir" in r]}
        for key, _ in COLUMNS:
            values = np.array([r[key] for r in runs])
            row[key] = (float(values.mean()),
                        float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], full: float) -> str:
    head = "| configuration | seeds | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    best = max(rows, key=lambda r: r["dev_binary"][0])["label"]
    for row in rows:
        cells = [f"{m:.3f} +- {s:.3f}" if np.isfinite(s) else f"{m:.3f} (one seed)"
                 for m, s in (row[k] for k, _ in COLUMNS)]
        label = f"**{row['label']}**" if row["label"] == best else row["label"]
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines.append(f"\nFull model (no masks), test macro P@1: {full:.3f}. Bold: the best dev "
                 "macro P@1 (binary), averaged over seeds.")
    runs = [(row["label"], seed, link) for row in rows
            for seed, link in zip(row["seeds"], row.get("run_dirs", ()), strict=False)]
    if runs:
        lines.append("\nRun directories (`lamp_jax.load_run`, `lamp-jax report --workdir`, "
                     "`lamp-jax evaluate --workdir`):\n")
        lines += [f"- [{label}, seed {seed}]({link}/)" for label, seed, link in runs]
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], full: float, path) -> None:
    from lamp_jax.plots import plt, save_figure

    fig, (ax, ax_s) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.5),
                                   gridspec_kw={"width_ratios": [3, 1]}, sharey=True)
    y = np.arange(len(rows))
    for i, (key, name) in enumerate(COLUMNS[:4]):
        means = [r[key][0] for r in rows]
        stds = [np.nan_to_num(r[key][1]) for r in rows]
        ax.errorbar(means, y + (i - 1.5) * 0.15, xerr=stds, fmt="o", capsize=3, label=name)
    ax.axvline(full, color="gray", linestyle="--", label="full model, test")
    ax.set_yticks(y, [r["label"] for r in rows])
    ax.set_xlabel("macro P@1 (mean +- std over seeds)")
    ax.legend(loc="best", fontsize="small")
    ax_s.errorbar([r["sparsity"][0] for r in rows], y,
                  xerr=[np.nan_to_num(r["sparsity"][1]) for r in rows], fmt="s", capsize=3)
    ax_s.set_xlabel("sparsity (binary masks)")
    ax.invert_yaxis()
    fig.tight_layout()
    save_figure(fig, path)


