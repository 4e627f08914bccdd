"""Analyses of a saved run, written to ``DIR/report/`` with an ``index.md``.

    lamp-jax report --workdir runs/default [--ckbc PATH/conceptnet_ckbc/test.txt]
    write_report("runs/default", ckbc="PATH/conceptnet_ckbc/test.txt")

The run directory may be a URL (``gs://bucket/runs/x``, :mod:`lamp_jax.paths`); the report is
written into it.

Writes: ``findings.json`` with ``overlap.png`` and ``sparsity_curve.png`` (what the masks found,
against the controls: :mod:`lamp_jax.analysis.findings`; ``--control DIR`` sets a random-weight
run of the same recipe beside this one), ``specialization.json/png`` (all R x R pairs in one
pass), ``combination.json/png`` (the search over combined masks), ``kbc.json``
(knowledge-base completion: CKBC triples if given, and for the embedded world its own facts),
``representations.json/png`` (PCA of [MASK] states with silhouette scores, [MASK] attention full
vs subnetwork), and with ``--qa`` ``qa.json`` (zero-shot multiple-choice accuracy, full model vs
combined subnetworks).

What the user named is checked before anything is loaded or written: the run directory, the
``--control`` run, the ``--ckbc`` and ``--qa`` files and the ``--qa-relations``
(:class:`~lamp_jax.errors.UsageError`). ``python -m lamp_jax.report`` is ``lamp-jax report``
(:mod:`lamp_jax.cli`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from etils import epath

from lamp_jax import plots  # also picks matplotlib's headless backend outside notebooks
from lamp_jax.analysis import combine, kbc, qa, representations, specialization
from lamp_jax.analysis import findings as evidence
from lamp_jax.api import Run, load_run
from lamp_jax.config_changes import describe_changes
from lamp_jax.data import Triple, read_ckbc
from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.hosts import is_main, main_log, progress, write_text
from lamp_jax.masks import multiply_masks
from lamp_jax.models import family_of
from lamp_jax.paths import as_path, save_figure
from lamp_jax.ranking import specialization_matrix
from lamp_jax.run_dir import RunDirectory


def _save(fig, path: epath.Path) -> str:
    if is_main():
        save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path.name


def specialization_section(run: Run, test_batches, out: epath.Path) -> dict[str, Any]:
    matrix = specialization_matrix(run.scorer(), run.mask_logits, test_batches, run.relations)
    full = run.evaluate("test", masks=None).precision_at(1)
    result = {"matrix": matrix.tolist(), "relations": list(run.relations),
              **specialization.summarize(matrix, full)}
    result["figure"] = _save(plots.specialization_heatmap(run.shown_relations, matrix),
                             out / "specialization.png")
    return result


def combination_section(run: Run, out: epath.Path, max_size: int) -> dict[str, Any]:
    """Which single combined mask serves all relations' dev prompts best (macro P@1)."""

    candidates = range(len(run.relations))
    bar = progress(total=len(combine.combinations_to_score(candidates, max_size)),
                   desc="combined masks", unit="mask", leave=False)

    def score(multipliers):
        value = run.evaluate("dev", masks=multipliers).macro(1)
        bar.update()
        return value

    found = combine.choose_combination(score, run.mask_logits, candidates, max_size)
    bar.close()
    names = [", ".join(run.relations[i] for i in row["relations"]) + f" ({row['method']})"
             for row in found["search"][:12]]
    for row in found["search"]:
        row["relations"] = [run.relations[i] for i in row["relations"]]
    full = run.evaluate("dev", masks=None).macro(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.barh(names[::-1], [row["score"] for row in found["search"][:12]][::-1])
    ax.axvline(full, color="k", ls="--", label=f"full model {full:.2f}")
    ax.set_xlabel("dev macro P@1 with one combined mask for all relations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return {"full_model_dev_macro_P@1": full, **found,
            "figure": _save(fig, out / "combination.png")}


def representation_section(run: Run, test_batch, out: epath.Path) -> dict[str, Any]:
    labels = np.repeat(np.arange(len(run.relations)), test_batch["weight"].shape[1])
    real = test_batch["weight"].reshape(-1) > 0
    result, fig, axes = {}, *plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (name, logits) in zip(axes, (("full model", None), ("own subnetwork",
                                                                  run.mask_logits)), strict=True):
        states, attention = representations.mask_states(run.mlm, test_batch, logits, run.mode)
        flat = states.reshape(-1, states.shape[-1])[real]
        score = representations.silhouette_score(flat, labels[real])
        points = representations.pca_2d(flat)
        for r, relation in enumerate(run.shown_relations):
            sel = labels[real] == r
            ax.scatter(points[sel, 0], points[sel, 1], s=12, label=relation)
        ax.set_title(f"{name}: silhouette {score:.2f}")
        result[name] = {"silhouette": score, "attention_first_prompt":
                        attention[0, 0].tolist()}
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("[MASK] states of test prompts (PCA), coloured by relation")
    fig.tight_layout()
    result["figure"] = _save(fig, out / "representations.png")
    result["attention_figure"] = _save(attention_figure(run, test_batch), out / "attention.png")
    return result


def attention_figure(run: Run, batch, relations: int = 3):
    """Last-layer attention of [MASK] (mean over heads) on the first prompt of a few relations,
    full model vs that relation's subnetwork."""
    _, full = representations.mask_states(run.mlm, batch, None, run.mode)
    _, pruned = representations.mask_states(run.mlm, batch, run.mask_logits, run.mode)
    shown = min(relations, len(run.relations))
    fig, axes = plt.subplots(shown, 1, figsize=(8, 2.2 * shown))
    for r, ax in enumerate(np.atleast_1d(axes)):
        length = int(batch["attention_mask"][r, 0].sum())
        tokens = run.mlm.tokenizer.convert_ids_to_tokens(batch["input_ids"][r, 0, :length])
        x = np.arange(length)
        ax.bar(x - 0.2, full[r, 0, :length], 0.4, label="full model")
        ax.bar(x + 0.2, pruned[r, 0, :length], 0.4, label=f"{run.shown_relations[r]} subnetwork")
        ax.set_xticks(x, tokens, fontsize=8)
        ax.set_ylabel("attention")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("last-layer attention from [MASK]")
    fig.tight_layout()
    return fig


def world_triples() -> tuple[list[Triple], dict[str, str]]:
    from lamp_jax import world

    templates = {r: spec.probe.replace("{s}", "{head}") for r, spec in world.RELATIONS.items()}
    return [Triple(f.relation, f.subject, f.obj, None) for f in world.make_facts(0)], templates


def qa_section(run: Run, path: str, fmt: str, relations: list[str], method: str) -> dict:
    """Accuracy of the full model vs the combination of ``relations``' subnetworks."""
    questions = (qa.read_copa if fmt == "copa" else qa.read_commonsenseqa)(path)
    chosen = [run.relation_index(r) for r in relations] or list(range(len(run.relations)))
    combined = multiply_masks(run.mlm.params, combine.combine(run.mask_logits, chosen, method))
    return {"file": str(path), "questions": len(questions),
            "relations": [run.relations[i] for i in chosen], "method": method,
            "full_accuracy": qa.accuracy(run.mlm.params, run.mlm, questions),
            "combined_accuracy": qa.accuracy(combined, run.mlm, questions)}


def findings(run: Run, out: epath.Path, control: str | None = None) -> dict[str, Any]:
    """What the masks found (:mod:`lamp_jax.analysis.findings`): the run's controls, the
    random-weight run ``control`` beside it, the overlap heat map, the sparsity curve and the
    necessity test; ``{}`` for a run trained without controls."""
    if "controls" not in (run.metrics or {}):
        return {}
    found = evidence.controls_section(run, control)
    found["overlap_figure"] = _save(evidence.overlap_figure(run, found["controls"]),
                                    out / "overlap.png")
    found["curve"] = evidence.curve_section(run, out, _save)
    found["necessity"] = evidence.necessity_section(run)
    return found


def write_report(workdir: str | os.PathLike, ckbc: str | None = None, max_size: int = 2,
                 log=print, qa_file: str | None = None, qa_format: str = "csqa",
                 qa_relations: tuple[str, ...] = (), qa_method: str = "or",
                 control: str | None = None) -> epath.Path:
    """Writes ``workdir/report/`` (module docstring). ``control``: the run directory of the
    same recipe on a random-weight model (``config.model_weights="random"``), set beside this
    run in "What the masks found"."""
    workdir, log = as_path(workdir), main_log(log)
    manifest = RunDirectory(workdir).manifest()  # MissingFileError: not a run directory
    config = manifest.config
    check_report_inputs(manifest.relations, ckbc, qa_file, qa_relations, qa_method)
    if control is not None:
        RunDirectory(control).manifest()  # MissingFileError: --control is not a run directory
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(workdir)
    test_batches = run.eval_batches("test")
    steps = ["findings", "specialization", "combination", "representations", "kbc"] + (
        ["qa"] if qa_file else [])
    bar = progress(total=len(steps), desc="report", unit="section")
    sections = {}

    def section(name: str, make) -> None:
        bar.set_description(f"report: {name}")
        sections[name] = make()
        bar.update()

    section("findings", lambda: findings(run, out, control))
    section("specialization", lambda: specialization_section(run, test_batches, out))
    section("combination", lambda: combination_section(run, out, max_size))
    section("representations", lambda: representation_section(run, test_batches[0], out))

    def kbc_results() -> dict[str, Any]:
        results = {}
        if run.any_length:  # it ranks single-token tails with a masked LM
            return {"not computed": "knowledge-base completion ranks single-token tails with "
                                    "a masked LM; this run ranks answers of any length"}
        if config.model == "embedded":
            triples, templates = world_triples()
            results["embedded world facts"] = kbc.knowledge_base_completion(
                triples, run.mlm, run.mask_logits, run.relations, run.mode, templates)
        if ckbc:
            results[str(ckbc)] = kbc.knowledge_base_completion(
                read_ckbc(ckbc), run.mlm, run.mask_logits, run.relations, run.mode)
        return results

    section("kbc", kbc_results)
    if qa_file and family_of(run.mlm.config).causal:
        section("qa", lambda: {"not computed": "zero-shot QA scores choices by a masked LM's "
                                               "pseudo-log-likelihood; this is a causal LM"})
    elif qa_file:
        section("qa", lambda: qa_section(run, qa_file, qa_format, list(qa_relations), qa_method))
    bar.close()
    for name, result in sections.items():
        write_text(out / f"{name}.json", json.dumps(result, indent=2))
    seeds = {"seed": config.get("seed"), "data_seed": config.data.get("seed")}
    changes = RunDirectory(workdir).recorded_config_changes()
    write_text(out / "index.md", _index(sections, seeds, changes))
    log(f"report written to {out / 'index.md'}")
    return out


def check_report_inputs(relations: tuple[str, ...], ckbc: str | None, qa_file: str | None,
                        qa_relations: tuple[str, ...], qa_method: str) -> None:
    """UsageError for what a report cannot use, before anything is loaded or written: a
    missing ``ckbc`` or ``qa_file``, a ``qa_relations`` entry the run has not, an unknown
    ``qa_method``."""
    for flag, path in (("--ckbc", ckbc), ("--qa", qa_file)):
        if path and not epath.Path(path).is_file():
            raise MissingFileError(f"{flag} {path}: no such file")
    unknown = [r for r in qa_relations if r not in relations]
    if unknown:
        raise UsageError(f"--qa-relations names {unknown}, which this run has not; it has "
                         f"{', '.join(relations)}")
    if qa_method not in combine.METHODS:
        raise UsageError(f"--qa-method {qa_method!r}: choose one of {combine.METHODS}")


def config_change_lines(changes: list[dict[str, Any]]) -> list[str]:
    """What the report says of a run resumed under another configuration
    (``RunDirectory.recorded_config_changes()``; nothing when it never changed)."""
    if not changes:
        return []
    lines = ["**The configuration changed during training** (`config.on_config_change="
             "continue`; run.json's `config_history` has each configuration):", ""]
    for change in changes:
        lines.append(f"- at step {change['step']}: "
                     + "; ".join(describe_changes(change["changes"])))
    return [*lines, ""]


def _index(sections: dict[str, Any], seeds: dict[str, Any] | None = None,
           config_changes: list[dict[str, Any]] | None = None) -> str:
    s, c, r = sections["specialization"], sections["combination"], sections["representations"]
    seeds = seeds or {}
    lines = ["# lamp-jax report", "",
             f"Every figure below is from one run: seed {seeds.get('seed')} (mask init, noise, "
             f"batch order), held-out facts of data seed {seeds.get('data_seed')}. For a mean "
             "+- std over seeds, train with `lamp-jax sweep --seeds 3`.", "",
             *config_change_lines(config_changes or []),
             *(evidence.index_lines(sections["findings"]) if sections["findings"] else []),
             "## Specialization (test P@1, macro)", "",
             f"own subnetwork {s['own_mask_macro_P@1']:.3f}, other relations' subnetworks "
             f"{s['other_masks_macro_P@1']:.3f}, full model {s['full_model_macro_P@1']:.3f}", "",
             f"![specialization]({s['figure']})", "", "## Combined masks (dev macro P@1)", "",
             f"best: {', '.join(c['best']['relations'])} ({c['best']['method']}) "
             f"{c['best']['score']:.3f}; full model {c['full_model_dev_macro_P@1']:.3f}; "
             f"{len(c['search'])} combinations searched (combination.json)", "",
             f"![combination]({c['figure']})", "", "## Knowledge-base completion", ""]
    for source, result in sections["kbc"].items():
        if "full" in result:
            lines.append(f"- {source}: {result['ranked']} ranked; Hits@1 full "
                         f"{result['full']['Hits@1']:.3f} -> subnetwork "
                         f"{result['subnetwork']['Hits@1']:.3f}; MRR {result['full']['MRR']:.3f}"
                         f" -> {result['subnetwork']['MRR']:.3f}; skipped "
                         f"{result['skipped_at_encoding']}")
        else:
            lines.append(f"- {source}: nothing rankable ({result})")
    lines += ["", "## Representations", "",
              f"silhouette of relations in [MASK] states: full model "
              f"{r['full model']['silhouette']:.3f}, own subnetwork "
              f"{r['own subnetwork']['silhouette']:.3f}", "", f"![representations]({r['figure']})",
              "", f"![attention]({r['attention_figure']})", ""]
    if "qa" in sections:
        q = sections["qa"]
        lines += ["## Zero-shot multiple-choice QA", "",
                  f"{q['questions']} questions from {q['file']}: full model "
                  f"{q['full_accuracy']:.3f}, {q['method']} of {', '.join(q['relations'])} "
                  f"subnetworks {q['combined_accuracy']:.3f}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    from lamp_jax.cli import report

    sys.exit(report())
