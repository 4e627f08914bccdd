"""The training loop, once: ``train_and_evaluate`` = setup -> fit -> final report.

    summary = train_and_evaluate(config, workdir)    # what train.py runs

:func:`fit` is the only training loop of lamp-jax: ``train.py`` hands it one run and a
:class:`~lamp_jax.run_dir.Keeper` of one run directory, a sweep hands it a group of runs side
by side and one run directory per run (:mod:`lamp_jax.sweep`). Everything numeric is a call
into the pure functions of :mod:`lamp_jax.step`, :mod:`lamp_jax.ranking` and
:mod:`lamp_jax.masks`; what is written, and where, is the keeper's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lamp_jax.data import labels_entry, relation_display
from lamp_jax.hosts import PreemptionNotice, is_main, main_log, peak_rss_bytes, to_host
from lamp_jax.masks import sparsity_stats
from lamp_jax.parallel import use_cpu_devices
from lamp_jax.ranking import RankingResult, specialization_matrices
from lamp_jax.run_dir import Keeper
from lamp_jax.run_setup import RunSetup, setup_run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=print) -> dict[str, Any]:
    """Learns one mask per relation, selects by dev macro P@1, reports held-out test metrics.

    Resumes from ``workdir/checkpoints`` when a run was interrupted. Writes ``run.json``,
    ``metrics.json``, ``masks.npz`` and ``plots/*.png`` into ``workdir`` and returns the metrics
    (``{"stopped_at": step, "preempted": bool, ...}`` when ``config.stop_after`` or a
    preemption notice stopped it first)."""
    from lamp_jax.config_checks import validate_config

    validate_config(config)  # before anything is written
    # Before JAX starts its backends (a no-op once they have, e.g. later in a notebook).
    use_cpu_devices(config.cpu_devices)
    log, clock = main_log(log), PhaseClock()
    keeper = Keeper.for_run(workdir)
    keeper.prepare()
    run = setup_run([config], log, lap=clock.lap)
    best = fit(run, keeper, log, clock)
    if best is None:
        return keeper.stopped
    (report,) = final_report(run, best, log)
    clock.lap("report")
    trained = sum(clock.seconds.get(k, 0.0) for k in ("steps", "evaluation", "checkpoints"))
    keeper.write_reports(run, best, [report], {
        "train_seconds": trained, "steps": run.num_steps, "resources": clock.resources()})
    log(clock.summary())
    keeper.close()
    return report.summary


def fit(run: RunSetup, keeper: Keeper, log=print, clock: PhaseClock | None = None) -> Any:
    """Trains every run on the relation axis to its end, evaluating on dev every
    ``run.eval_every`` steps; returns the best masks (``[slots, ...]`` on the mesh), or None
    when ``config.stop_after`` or a preemption notice (SIGTERM, :class:`PreemptionNotice`)
    stopped this invocation first, after saving the state (``keeper.stopped`` says where).
    A notice that comes after the last step is left to the default handler (it stops the
    process at once): the final state is saved by then, and a rerun writes the reports."""
    clock = clock or PhaseClock()
    state = keeper.open(run, log)
    clock.lap("setup")
    first = int(state.step)
    bar = tqdm(range(first, run.num_steps), desc="training masks", unit="step", initial=first,
               total=run.num_steps, disable=not is_main())
    pending = metrics = None
    # SIGTERM (a preemption notice) from here on saves the state at the next step and stops.
    with PreemptionNotice() as notice:
        for step in bar:
            state, metrics = run.step_fn(state, run.frozen, run.train_batch(step))
            done = step + 1
            # Checked one step late, so the host never stalls the device queue to look.
            if pending is not None:
                check_finite(pending, done - 1, run, log)
            pending = metrics
            if done % run.eval_every == 0 or done == run.num_steps:
                check_finite(pending, done, run, log)
                pending = None
                clock.lap("steps", state.mask_logits)
                dev = run.scores(state.mask_logits, "dev")
                bar.set_postfix(dev_macro_p1=f"{dev[0].macro(1):.3f}")
                keeper.evaluated(done, state, dev, metrics, run, clock)
            # Asked at every step, by every process (JAX's preemption protocol needs that).
            preempted = notice.reached(done)
            drill = (run.config.stop_after and done - first >= run.config.stop_after
                     and done < run.num_steps)
            if preempted or drill:  # at the last step too: a rerun writes the reports
                bar.close()
                keeper.stopped = keeper.stop(state, done, preempted=preempted)
                if preempted:
                    log(f"preemption notice (SIGTERM): saved the state at step {done}; run the "
                        "same command again to resume")
                return None
    bar.close()
    keeper.finish()
    clock.lap("checkpoints")
    # The best masks replace the training state (bert-base x 16 relations: 8 GB freed before
    # the final evaluations).
    del state, metrics, pending
    return keeper.best_masks(run)


@dataclasses.dataclass
class RunReport:
    """One run's final report: ``summary`` (what metrics.json holds) and what its plots need."""

    summary: dict[str, Any]
    full: RankingResult
    pruned: RankingResult
    sparsity: dict[str, np.ndarray]
    specialization: np.ndarray | None
    shown_relations: tuple[str, ...]  # as tables and plots name them: "P19 (place of birth)"


def final_report(run: RunSetup, best: Any, log=print) -> list[RunReport]:
    """Per run: the subnetworks (the run's inference kind and the other one) and the full
    model on ``run.report_split``, the best masks on dev, sparsity, and the specialization
    matrix (``config.specialization``)."""
    split, kind = run.report_split, run.eval_mode.kind
    other = "expectation" if kind == "threshold" else "threshold"
    pruned, full = run.scores(best, split), run.scores(None, split)
    # The other inference kind too: binary subnetwork vs soft sigmoid(G) multipliers.
    soft_or_binary = run.scores(best, split, other)
    on_dev = ((run.scores(best, "dev"), run.scores(best, "dev", other))
              if split != "dev" and "dev" in run.eval_sets else None)
    num, relations = len(run.relations), run.relations
    stats = sparsity_stats(best, run.spec, run.mode.threshold)
    matrices = (specialization_matrices(run.rank_fn(kind), best, run.frozen,
                                        run.eval_sets[split], relations, run.put, run.num_runs)
                if run.config.specialization else None)
    shown = relation_display(relations, run.data.labels)
    reports = []
    for v, config in enumerate(run.configs):
        sparsity = {k: x[v * num:(v + 1) * num] for k, x in stats.items()}
        summary = {split: {"pruned": pruned[v].summary(), "full": full[v].summary(),
                           f"pruned_{other}": soft_or_binary[v].summary()},
                   "split": config.data.split,
                   "sparsity": {k: x.tolist() for k, x in sparsity.items()},
                   "relations": list(relations), **labels_entry(relations, run.data.labels)}
        if on_dev is not None:
            summary["dev"] = {"pruned": on_dev[0][v].summary(),
                              f"pruned_{other}": on_dev[1][v].summary()}
        if matrices is not None:
            summary["specialization"] = matrices[v].tolist()
        reports.append(RunReport(summary, full[v], pruned[v], sparsity,
                                 None if matrices is None else matrices[v], shown))
    if run.num_runs == 1:
        _log_report(reports[0], split, run.config.seed, log)
    return reports


def _log_report(report: RunReport, split: str, seed: int, log) -> None:
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
        f"{seed}; mean +- std over seeds: python -m lamp_jax.sweep --seeds 3)")
    matrix = report.specialization
    if matrix is not None:
        off = matrix[~np.eye(len(matrix), dtype=bool)].reshape(len(matrix), -1)
        log(f"specialization: own mask P@1 {np.nanmean(np.diag(matrix)):.3f}, other relations' "
            f"masks {np.nanmean(off):.3f}, full model {full.macro(1):.3f}")


def check_finite(metrics: dict[str, Any], step: int, run: RunSetup, log) -> None:
    """The step already refused non-finite updates; here we stop or say it was skipped."""
    slots = list(run.relations) * run.num_runs
    finite = to_host(metrics["finite"])[: len(slots)]
    if finite.all():
        return
    bad = [r for r, ok in zip(slots, finite, strict=True) if not ok]
    message = (f"non-finite loss or gradient at step {step} for relation(s) {bad}; their masks "
               "were left unchanged")
    if run.config.on_nonfinite == "stop":
        raise FloatingPointError(message + " (config.on_nonfinite='skip' skips such updates)")
    log("warning: " + message)


class PhaseClock:
    """Wall seconds per phase of a run (load, setup, steps, evaluation, checkpoints, report)
    and peak memory. A lap ends a phase; ``lap(phase, arrays)`` first waits for the device
    work behind ``arrays``, so asynchronous steps are charged to "steps"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started_unix = time.time()
        self._start = self._mark = time.perf_counter()
        self.timeline: list[tuple[str, float, float]] = []  # (phase, from s, to s)

    def lap(self, phase: str, arrays: Any = None) -> None:
        if arrays is not None:
            jax.block_until_ready(arrays)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        self.timeline.append((phase, round(self._mark - self._start, 3),
                              round(now - self._start, 3)))
        self._mark = now

    def resources(self) -> dict[str, Any]:
        device_peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
                        for d in jax.local_devices() if d.platform != "cpu"]
        return {"phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "phase_timeline": self.timeline, "started_unix": self.started_unix,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_device_bytes": max([p for p in device_peaks if p], default=None)}

    def summary(self) -> str:
        res = self.resources()
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
        device = (f", peak device memory {res['peak_device_bytes'] / 2**30:.2f} GiB"
                  if res["peak_device_bytes"] else "")
        return (f"wall seconds per phase: {phases}; peak RSS "
                f"{res['peak_rss_bytes'] / 2**30:.2f} GiB{device}")
