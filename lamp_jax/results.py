"""A run's final results: its subnetworks and the full model on a held-out split.

    report = final_report(setup, best_masks)          # what metrics.json holds, and the plots'
    log_report(report, "test", config.seed)           # the table train.py prints
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

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


def other_kind(kind: str) -> str:
    """The inference kind a report shows beside the run's own: binary masks vs sigmoid(G)."""
    return "expectation" if kind == "threshold" else "threshold"


def final_report(setup: Any, best: Any, split: str = "test",
                 full: RankingResult | None = None) -> FinalReport:
    """The best masks (``[slots, ...]`` on the setup's mesh) of the run set up by
    :mod:`lamp_jax.setup`: its subnetworks (the run's inference kind and the other one) and the
    full model on ``split`` (``full``: already computed), the masks on dev, their sparsity, and
    the specialization matrix (``config.specialization``)."""
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
        matrix = specialization_matrix(setup.rank_fn(kind), best, setup.frozen,
                                       setup.eval_sets[split], relations, setup.put,
                                       on_pass=bar.update)
        summary["specialization"] = matrix.tolist()
    bar.close()
    return FinalReport(summary, full, pruned, sparsity, matrix,
                       relation_display(relations, setup.data.labels))


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
    matrix = report.specialization
    if matrix is not None:
        off = matrix[~np.eye(len(matrix), dtype=bool)].reshape(len(matrix), -1)
        log(f"specialization: own mask P@1 {np.nanmean(np.diag(matrix)):.3f}, other relations' "
            f"masks {np.nanmean(off):.3f}, full model {full.macro(1):.3f}")
