"""The report's "What the masks found": the controls of the run's final report, a random-weight
control run beside it, the overlap of the relations' pruned sets, a sparsity curve and a
necessity test (:mod:`lamp_jax.controls`, :mod:`lamp_jax.analysis.curves`)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from lamp_jax.analysis.curves import necessity, sparsity_curve
from lamp_jax.analysis.evidence import paired_bootstrap
from lamp_jax.controls import as_mask_logits
from lamp_jax.errors import UsageError
from lamp_jax.run_dir import RunDirectory

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def controls_section(run: Any, control_dir: str | None = None) -> dict[str, Any]:
    """The run's controls (``metrics.json``), and with ``control_dir`` (a run of the same
    recipe on a random-weight model, ``config.model_weights="random"``) that run's subnetworks
    and the difference from them, with its interval over the same held-out facts."""
    metrics = run.metrics or {}
    if "controls" not in metrics:
        raise UsageError(f"{run.workdir}/metrics.json has no controls (trained with "
                         "config.controls.enabled=False, or by a lamp-jax before they existed): "
                         "re-evaluate it with `python -m lamp_jax.evaluate --workdir ...`")
    out = {"controls": metrics["controls"], "full": metrics["test"]["full"]["macro_P@1"],
           "pruned": metrics["test"]["pruned"]["macro_P@1"]}
    if control_dir is None:
        return out
    other = RunDirectory(control_dir)
    mine, theirs = RunDirectory(run.workdir).prompt_ranks("test"), other.prompt_ranks("test")
    other_metrics = other.metrics()
    if mine is None or theirs is None or other_metrics is None:
        raise UsageError(f"{control_dir} and {run.workdir} must both be finished runs with "
                         "controls (prompt_ranks_test.npz)")
    if not (np.array_equal(mine["relation"], theirs["relation"])
            and np.array_equal(mine["fact"], theirs["fact"])):
        raise UsageError(f"{control_dir} was not evaluated on the held-out facts of "
                         f"{run.workdir}: use the same data, split, data seed and relations")
    resamples = out["controls"]["intervals"]["pruned - full"]["resamples"]
    out["random_weights"] = {
        "run": str(control_dir),
        "model_weights": other.manifest().config.get("model_weights", "pretrained"),
        "full": other_metrics["test"]["full"]["macro_P@1"],
        "pruned": other_metrics["test"]["pruned"]["macro_P@1"],
        "controls": other_metrics.get("controls"),
        "interval": paired_bootstrap(mine["pruned"] == 1, theirs["pruned"] == 1,
                                     mine["relation"], mine["fact"], len(run.relations),
                                     resamples).summary(list(run.relations))}
    return out


def _threshold_score(run: Any, split: str = "test"):
    """Macro P@1 on ``split`` of per-relation 0/1 multiplier trees, by the run's binary
    ranking."""
    score = run.scorer("threshold")
    batches = run.eval_batches(split)
    return lambda multipliers: score(as_mask_logits(multipliers, run.mode.threshold),
                                     batches).macro(1)


def curve_section(run: Any, out: Any, save) -> dict[str, Any]:
    """The sparsity curve (module :mod:`lamp_jax.analysis.curves`) on test, and its figure."""
    curve = sparsity_curve(_threshold_score(run), run.mask_logits, run.mlm.params, SPARSITIES)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("learned", "magnitude", "random"):
        ax.plot(curve["sparsity"], curve[name], marker="o",
                label=f"{name} masks (AUC {curve['auc'][name]:.3f})")
    ax.axhline(run.evaluate("test", masks=None).macro(1), color="gray", ls="--",
               label="full model")
    ax.set_xlabel("fraction pruned in every masked matrix")
    ax.set_ylabel("test macro P@1")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curve["figure"] = save(fig, out / "sparsity_curve.png")
    return curve


def necessity_section(run: Any) -> dict[str, Any]:
    """Each relation's specific weights removed from the full model (curves.necessity)."""
    def score_with(multipliers):
        return run.evaluate("test", masks=multipliers).precision_at(1)

    return necessity(score_with, run.mask_logits, run.mode.threshold)


def overlap_figure(run: Any, controls: dict[str, Any]):
    """The relations' pruned-set overlap as a ratio to the overlap of independent random sets
    of the same sizes (1 = chance)."""
    from lamp_jax import plots

    overlap = controls["overlap_between_relations"]
    ratio = np.asarray(overlap["jaccard"]) / np.asarray(overlap["chance"])
    return plots.overlap_heatmap(run.shown_relations, ratio,
                                 label="Jaccard overlap / chance", vmax=None)


def index_lines(found: dict[str, Any]) -> list[str]:
    """The markdown of the section."""
    c = found["controls"]
    among_answers = c.get("ranking") == "candidates"  # then the typed ranking is the ranking
    rows = [("full model", found["full"], c["intervals"]["pruned - full"])]
    if not among_answers:
        rows.append(("full model, typed (relation's training objects)",
                     c["full_typed"]["macro_P@1"], c["intervals"]["pruned - full_typed"]))
    rows += [("relation prior (most frequent training object)", c["prior"]["macro_P@1"],
              c["intervals"]["pruned - prior"]),
             ("magnitude masks, same sparsity per matrix", c["magnitude_masks"]["macro_P@1"],
              c["intervals"]["pruned - magnitude"])]
    random = c["random_masks"]
    if random.get("draws"):
        std = random["macro_P@1_std"]
        rows.append((f"random masks, same sparsity per matrix ({random['draws']} draws)",
                     f"{random['macro_P@1']:.3f}" + (f" +- {std:.3f}" if std else ""),
                     c["intervals"]["pruned - random"]))
    if "random_weights" in found:
        r = found["random_weights"]
        rows.append((f"subnetworks of a random-weight model ({r['run']})", r["pruned"],
                     r["interval"]))
    conf = c["intervals"]["pruned - full"]["confidence"]
    lines = ["## What the masks found", "",
             f"{c['split']} split, {c['protocol']} protocol; the learned subnetworks "
             f"({c['subnetwork']} masks) score macro P@1 {found['pruned']:.3f} "
             + ("ranking each relation's answers (answers of any length). " if among_answers
                else f"({c['pruned_typed']['macro_P@1']:.3f} ranked among the relation's "
                     "training objects). ")
             + "Each difference is the subnetworks' minus the control's, with its "
             f"{conf:.0%} interval from {c['intervals']['pruned - full']['resamples']} "
             "resamples of the held-out facts (a fact's sentences together); * marks an "
             "interval that excludes zero.", "",
             "| control | macro P@1 | subnetworks minus control |", "|---|---|---|"]
    for name, score, interval in rows:
        m = interval["macro"]
        shown = score if isinstance(score, str) else f"{score:.3f}"
        lines.append(f"| {name} | {shown} | {m['observed']:+.3f} [{m['low']:+.3f}, "
                     f"{m['high']:+.3f}]{' *' if m['excludes_zero'] else ''} |")
    overlap = c["overlap_between_relations"]
    if np.isnan(overlap["mean_ratio"]):
        lines += ["", "The masks prune nothing: there are no pruned sets to compare.", ""]
    else:
        lines += ["", f"Two relations' pruned sets overlap {overlap['mean_jaccard']:.3f} "
                  f"(Jaccard) where independent random sets of the same sizes would overlap "
                  f"{overlap['mean_chance']:.3f}: {overlap['mean_ratio']:.2f}x chance.", "",
                  f"![overlap]({found['overlap_figure']})", ""]
    curve = found.get("curve")
    if curve:
        auc = curve["auc"]
        lines += ["### Sparsity curve", "",
                  f"Area under test macro P@1 over sparsities {curve['sparsity'][0]:g}.."
                  f"{curve['sparsity'][-1]:g}: learned {auc['learned']:.3f}, magnitude "
                  f"{auc['magnitude']:.3f}, random {auc['random']:.3f}.", "",
                  f"![sparsity curve]({curve['figure']})", ""]
    need = found.get("necessity")
    if need:
        lines += ["### Necessity", "",
                  "Removing from the full model only the weights specific to relation r "
                  "(kept by its mask, pruned by most others' masks) changes test P@1 on r's "
                  f"own prompts by {need['own_change']:+.3f} on average and on the other "
                  f"relations' by {need['other_change']:+.3f}; removing as many random weights "
                  f"of the same matrices changes them by {need['random_own_change']:+.3f} and "
                  f"{need['random_other_change']:+.3f} (findings.json, necessity).", ""]
    return lines
