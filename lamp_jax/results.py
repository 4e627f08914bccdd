"""A run's final results: its subnetworks and the full model on a held-out split.

    report = final_report(setup, best_masks)          # what metrics.json holds, and the plots'
    log_report(report, "test", config.seed)           # the table train.py prints
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lamp_jax.controls import control_report
from lamp_jax.data import labels_entry, relation_display
from lamp_jax.hosts import progress
from lamp_jax.masks import sparsity_stats
from lamp_jax.ranking import RankingResult, specialization_matrix


@dataclasses.dataclass
class FinalReport:
    """One run's final report: ``summary`` (what metrics.json holds) and what its plots need."""

    summary: dict[str, Any]
    full: RankingResult
    pruned: RankingResult
    sparsity: dict[str, np.ndarray]
    specialization: np.ndarray | None
    shown_relations: tuple[str, ...]  # as tables and plots name them: "P19 (place of birth)"
    # Per held-out prompt, every system's rank (config.controls; lamp_jax.controls), else None.
    prompt_ranks: dict[str, np.ndarray] | None = None


def other_kind(kind: str) -> str:
    """The inference kind a report shows beside the run's own: binary masks vs sigmoid(G)."""
    return "expectation" if kind == "threshold" else "threshold"


def final_report(setup: Any, best: Any, split: str = "test",
                 full: RankingResult | None = None) -> FinalReport:
    """The best masks (``[slots, ...]`` on the setup's mesh) of the run set up by
    :mod:`lamp_jax.setup`: its subnetworks (the run's inference kind and the other one) and the
    full model on ``split`` (``full``: already computed), the masks on dev, their sparsity, the
    specialization matrix (``config.specialization``) and the controls
    (``config.controls``, :mod:`lamp_jax.controls`)."""
    kind = setup.eval_mode.kind
    other = other_kind(kind)
    relations = setup.relations
    with_dev = split != "dev" and "dev" in setup.eval_sets
    passes = (2 + (full is None) + 2 * with_dev  # subnetworks of both kinds, the full model
              + len(relations) * bool(setup.config.specialization))
    bar = progress(total=passes, desc=f"evaluating on {split}", unit="pass", leave=False)

    def scores(masks, on, kind=None) -> RankingResult:
        result = setup.scores(masks, on, kind) if kind else setup.scores(masks, on)
        bar.update()
        return result

    pruned = scores(best, split)
    full = full if full is not None else scores(None, split)
    soft_or_binary = scores(best, split, other)
    sparsity = {k: x[:len(relations)] for k, x in
                sparsity_stats(best, setup.spec, setup.mode.threshold).items()}
    summary = {split: {"pruned": pruned.summary(), "full": full.summary(),
                       f"pruned_{other}": soft_or_binary.summary()},
               "split": setup.config.data.split,
               "sparsity": {k: x.tolist() for k, x in sparsity.items()},
               "relations": list(relations), **labels_entry(relations, setup.data.labels)}
    if with_dev:
        summary["dev"] = {"pruned": scores(best, "dev").summary(),
                          f"pruned_{other}": scores(best, "dev", other).summary()}
    matrix = None
    if setup.config.specialization:
        matrix = specialization_matrix(setup.scorer(kind), best, setup.eval_sets[split],
                                       relations, on_pass=bar.update)
        summary["specialization"] = matrix.tolist()
    bar.close()
    ranks = None
    if setup.config.controls.enabled:
        summary["controls"], ranks = control_report(setup, best, split, full, pruned)
    return FinalReport(summary, full, pruned, sparsity, matrix,
                       relation_display(relations, setup.data.labels), ranks)


def log_report(report: FinalReport, split: str, seed: int, log=print) -> None:
    """The per-relation table, the macro and micro P@1, and the specialization summary."""
    full, pruned = report.full, report.pruned
    width = max([18, *(len(r) + 2 for r in report.shown_relations)])
    lines = [f"{'relation':<{width}}{'prompts':>8}{'full P@1':>10}{'pruned P@1':>12}"
             f"{'sparsity':>10}"]
    for i, r in enumerate(report.shown_relations):
        lines.append(f"{r:<{width}}{int(pruned.count[i]):>8}{full.precision_at(1)[i]:>10.3f}"
                     f"{pruned.precision_at(1)[i]:>12.3f}{report.sparsity['total'][i]:>10.3f}")
    log("\n".join(lines))
    log(f"{split} macro P@1: full {full.macro(1):.3f} -> pruned {pruned.macro(1):.3f}; "
        f"micro P@1: full {full.micro(1):.3f} -> pruned {pruned.micro(1):.3f} (one run, seed "
        f"{seed}; mean +- std over seeds: lamp-jax sweep --seeds 3)")
    controls = report.summary.get("controls")
    if controls:
        log(control_lines(controls))
    matrix = report.specialization
    if matrix is not None:
        off = matrix[~np.eye(len(matrix), dtype=bool)].reshape(len(matrix), -1)
        log(f"specialization: own mask P@1 {np.nanmean(np.diag(matrix)):.3f}, other relations' "
            f"masks {np.nanmean(off):.3f}, full model {full.macro(1):.3f}")


def control_lines(controls: dict[str, Any]) -> str:
    """The controls in a few lines: each one's macro P@1 and the subnetwork's difference from it
    with its interval (``*``: the interval excludes zero)."""
    names = {"full": "full model", "full_typed": "full model, typed", "prior": "relation prior",
             "magnitude": "magnitude masks", "random": "random masks"}
    scores = {"full_typed": controls["full_typed"]["macro_P@1"],
              "prior": controls["prior"]["macro_P@1"],
              "magnitude": controls["magnitude_masks"]["macro_P@1"],
              "random": controls["random_masks"].get("macro_P@1")}
    lines = [f"controls ({controls['split']}, {controls['protocol']} split; subnetwork minus "
             f"control, macro P@1, {controls['intervals']['pruned - full']['confidence']:.0%} "
             "interval over held-out facts):"]
    for key, interval in controls["intervals"].items():
        other = key.removeprefix("pruned - ")
        if other == "full_typed" and controls.get("ranking") == "candidates":
            continue  # ranking each relation's answers, the typed ranking is the ranking
        macro = interval["macro"]
        score = f"{scores[other]:.3f}, " if scores.get(other) is not None else ""
        lines.append(f"  {names[other]:<18} {score}difference {macro['observed']:+.3f} "
                     f"[{macro['low']:+.3f}, {macro['high']:+.3f}]"
                     f"{' *' if macro['excludes_zero'] else ''}")
    ratio = controls["overlap_between_relations"]["mean_ratio"]
    overlap = ("the masks prune nothing" if np.isnan(ratio) else
               f"pruned sets of two relations overlap {ratio:.2f}x chance (Jaccard)")
    lines.append(f"  subnetwork, typed: {controls['pruned_typed']['macro_P@1']:.3f}; {overlap}")
    return "\n".join(lines)
