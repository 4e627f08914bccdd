"""Hyperparameter sweeps: every (configuration, seed) trial is a train.py run, and the trials
that share a program train together, in one jitted step mapped over their runs axis.

    lamp-jax sweep --grid mask.mode=stochastic,deterministic \\
        --grid optim.learning_rate=0.01,0.1,0.3 --seeds 3 --workdir runs/sweep

    out = run_sweep(base_config, ["optim.learning_rate=0.1,1.0"], seeds=3, workdir="runs/lr")

(``lamp-jax sweep`` parses its flags in :mod:`lamp_jax.cli` and calls :func:`run_sweep`.)

Trials that differ only in values (learning rate, mask init, seed: :data:`VALUE_KEYS`) form a
group: train.py's step is mapped over a leading runs axis of their stacked states
(:mod:`lamp_jax.sweep.group`), and each run draws exactly the initial masks, noise and batches
train.py draws with its settings. Settings that change the program (mask mode, temperature,
epochs, model, ...) make groups of their own, trained one after another. On a CPU each run of a
group computes what train.py computes, byte for byte (tested).

Every trial is a run directory, ``<workdir>/runs/<trial>/``, which ``load_run``,
``lamp_jax.report``, ``lamp_jax.evaluate`` and ``export_subnetwork`` open as they open
train.py's. Runs are selected as train.py selects (dev macro P@1 of ``mask.eval_kind``), then
reported on test with binary and soft masks; they write no plots (``sweep.png`` shows them
all). Written to ``--workdir`` besides: ``sweep.json`` (every run), ``sweep.md`` (mean +- std
over seeds per configuration, with links to the runs), ``sweep.png``. Interrupted, the same
command resumes each group from its latest checkpoint; finished groups are read back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from lamp_jax.config_checks import check_sources, validate_config
from lamp_jax.errors import UsageError
from lamp_jax.hosts import is_main, main_log, write_text
from lamp_jax.paths import absolute
from lamp_jax.placement import use_cpu_devices
from lamp_jax.run_dir import RunDirectory
from lamp_jax.sweep.grid import VALUE_KEYS, Trial, parse_grid, plan_groups, with_overrides
from lamp_jax.sweep.group import train_group
from lamp_jax.sweep.table import markdown_table, plot, seed_evidence, summarize, trial_row
from lamp_jax.workdir_lock import hold_workdir

__all__ = ["VALUE_KEYS", "Trial", "parse_grid", "plan_groups", "run_sweep", "summarize",
           "with_overrides"]


def run_sweep(base: ml_collections.ConfigDict, grid: Sequence[str], seeds: int,
              workdir: str | Path, log=print) -> dict[str, Any]:
    """Every grid configuration x seed, side by side per group; writes every run's directory,
    the table and the plot. Rerun after an interruption, it resumes where it stopped."""
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: at least 1")
    groups = plan_groups(base, parse_grid(base, grid), seeds)
    for fixed, trials in groups:  # every configuration, before anything is written
        for trial in trials:
            validate_config(trial.config(with_overrides(base, fixed)))
        check_sources(with_overrides(base, fixed))
    use_cpu_devices(base.cpu_devices)  # before JAX starts its backends
    log = main_log(log)
    workdir = absolute(workdir)
    RunDirectory(workdir).create()
    # One sweep (or run) at a time in a workdir: another is refused before it loads anything.
    with hold_workdir(workdir, log) as lock:
        RunDirectory(workdir).ensure_writable()
        return _run_groups(groups, base, grid, seeds, workdir, lock, log)


def _run_groups(groups: list, base: ml_collections.ConfigDict, grid: Sequence[str], seeds: int,
                workdir: Any, lock: Any, log) -> dict[str, Any]:
    """:func:`run_sweep`'s groups, one after another, in a workdir this process holds."""
    rows, group_seconds, group_info = [], [], []
    for fixed, trials in groups:
        start = time.perf_counter()
        group_base = with_overrides(base, fixed)
        trained = train_group(group_base, workdir, fixed, trials, log, lock=lock)
        if "stopped" in trained:
            if not trained["stopped"]["preempted"]:
                log("stopped after config.stop_after steps; run the same command again to "
                    "resume")
            return {"stopped": True, "preempted": trained["stopped"]["preempted"]}
        group_seconds.append(time.perf_counter() - start)
        group_info.append(trained)
        rows += [trial_row(trial, trial.config(group_base),
                           RunDirectory(workdir / "runs" / trial.name)) for trial in trials]
    out: dict[str, Any] = {"grid": list(grid), "seeds": seeds, "runs": rows,
                           "sweep_seconds": sum(group_seconds), "group_seconds": group_seconds,
                           "groups": group_info}
    summary = summarize(rows)
    evidence = seed_evidence(rows, workdir)
    out["table"], out["seed_evidence"] = summary, evidence
    table = markdown_table(summary, rows[0]["test_full"], evidence)
    write_text(workdir / "sweep.json", json.dumps(out, indent=1))
    write_text(workdir / "sweep.md", table + "\n")
    if is_main():
        plot(summary, rows[0]["test_full"], workdir / "sweep.png")
    log(table)
    log(f"sweep: {len(rows)} runs in {out['sweep_seconds']:.1f} s")
    log(f"written: {workdir / 'sweep.md'}, {workdir / 'sweep.json'}, {workdir / 'sweep.png'}, "
        f"and a run directory per run under {workdir / 'runs'}")
    return out
