"""A sweep's results: one row per trial, read from its run directory, and the table and figure
of mean +- std over seeds per configuration."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
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
        # The controls (lamp_jax.controls) when the run computed them; None otherwise.
        "test_full_typed": _control(metrics, "full_typed", "macro_P@1"),
        "test_random_masks": _control(metrics, "random_masks", "macro_P@1"),
    }


def _control(metrics: dict[str, Any], *keys: str) -> float | None:
    node = metrics.get("controls")
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


COLUMNS = (("dev_binary", "dev P@1 binary"), ("dev_soft", "dev P@1 soft"),
           ("test_binary", "test P@1 binary"), ("test_soft", "test P@1 soft"),
           ("sparsity", "sparsity"), ("test_full_typed", "test P@1 full, typed"),
           ("test_random_masks", "test P@1 random masks"))


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
            values = np.array([np.nan if r.get(key) is None else r[key] for r in runs], float)
            row[key] = (float(values.mean()),
                        float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        rows.append(row)
    return rows


def seed_evidence(records: Sequence[dict[str, Any]], workdir: Any, resamples: int = 1000
                  ) -> dict[str, dict[str, Any]]:
    """Per configuration with controls: how its subnetworks beat the typed full model over
    its seeds and held-out facts (a two-level bootstrap: seeds, then facts within each drawn
    seed; :func:`lamp_jax.analysis.evidence.seed_fact_bootstrap`), and, with two seeds or
    more, how much the seeds' pruned sets overlap per relation against independent random
    sets of the same sizes (:func:`lamp_jax.analysis.stability.overlap_across_seeds`)."""
    from lamp_jax.analysis.evidence import seed_fact_bootstrap
    from lamp_jax.analysis.stability import overlap_across_seeds
    from lamp_jax.checkpoint import load_binary_masks

    out = {}
    for label in dict.fromkeys(r["label"] for r in records):
        runs = [RunDirectory(workdir / r["run_dir"]) for r in records if r["label"] == label]
        ranks = [d.prompt_ranks("test") for d in runs]
        if any(r is None for r in ranks):
            continue
        relations = runs[0].run_json()["relations"]
        interval = seed_fact_bootstrap(
            np.stack([r["pruned"] == 1 for r in ranks]),
            np.stack([r["full_typed"] == 1 for r in ranks]), ranks[0]["relation"],
            ranks[0]["fact"], len(relations), resamples)
        found = {"pruned - full_typed": interval.summary(relations)}
        if len(runs) > 1:
            masks = [load_binary_masks(d.path / "masks.npz") for d in runs]
            as_logits = [jax.tree.map(lambda m: 2.0 * m - 1.0, tree) for tree, _, _ in masks]
            _, overlap = overlap_across_seeds(as_logits, masks[0][1], 0.5)
            total = overlap["total"]
            # Masks that prune nothing have no overlap to compare: NaN, said in the table.
            found["seed_overlap"] = {key: _mean_of_defined(getattr(total, field)) for key, field
                                     in (("jaccard", "jaccard"), ("chance", "expected"),
                                         ("ratio", "ratio"))}
        out[label] = found
    return out


def markdown_table(rows: Sequence[dict[str, Any]], full: float,
                   evidence: dict[str, dict[str, Any]] | None = None) -> str:
    evidence = evidence or {}
    names = [name for _, name in COLUMNS] + ["test P@1 binary minus full typed [95% CI]",
                                             "seeds' pruned sets overlap / chance"]
    lines = ["| configuration | seeds | " + " | ".join(names) + " |",
             "|" + "---|" * (len(names) + 2)]
    best = max(rows, key=lambda r: r["dev_binary"][0])["label"]
    for row in rows:
        cells = [("-" if np.isnan(m) else f"{m:.3f} +- {s:.3f}" if np.isfinite(s)
                  else f"{m:.3f} (one seed)") for m, s in (row[k] for k, _ in COLUMNS)]
        found = evidence.get(row["label"], {})
        macro = found.get("pruned - full_typed", {}).get("macro")
        cells.append(f"{macro['observed']:+.3f} [{macro['low']:+.3f}, {macro['high']:+.3f}]"
                     f"{' *' if macro['excludes_zero'] else ''}" if macro else "-")
        overlap = found.get("seed_overlap")
        cells.append("-" if not overlap else "nothing pruned" if np.isnan(overlap["ratio"])
                     else f"{overlap['ratio']:.2f}")
        label = f"**{row['label']}**" if row["label"] == best else row["label"]
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines.append(f"\nFull model (no masks), test macro P@1: {full:.3f}. Bold: the best dev "
                 "macro P@1 (binary), averaged over seeds. Typed: ranked among the relation's "
                 "training objects. The interval is a two-level bootstrap (seeds, then held-out "
                 "facts within each seed; * where it excludes zero); the overlap is the "
                 "seeds' Jaccard overlap of each relation's pruned sets over that of independent "
                 "random sets of the same sizes (1 = chance).")
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


def _mean_of_defined(values: np.ndarray) -> float:
    """The mean of the values that are not NaN; NaN (without numpy's warning) if none is."""
    values = np.asarray(values, np.float64)
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
