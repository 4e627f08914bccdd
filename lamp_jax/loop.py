"""The training loop of one run, top to bottom: set up, restore or init, step, evaluate, save,
report.

    summary = train_and_evaluate(config, workdir)    # what train.py runs

Everything numeric is a call into the pure functions of :mod:`lamp_jax.step`,
:mod:`lamp_jax.ranking` and :mod:`lamp_jax.masks`; the files are the run directory's
(:mod:`lamp_jax.run_dir`), the checkpoints Orbax's (:mod:`lamp_jax.checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lamp_jax import placement, plots
from lamp_jax.checkpoint import BestMasks, open_state_checkpoints, saved_steps
from lamp_jax.config_changes import describe_changes
from lamp_jax.config_checks import check_sources, validate_config
from lamp_jax.hosts import (
    PreemptionNotice,
    is_main,
    main_log,
    return_free_memory,
    sync,
    to_host,
)
from lamp_jax.masks import pruned_fraction
from lamp_jax.phase_clock import PhaseClock
from lamp_jax.ranking import RankingResult
from lamp_jax.results import final_report, log_report
from lamp_jax.run_dir import RunDirectory, manifest
from lamp_jax.setup import setup_training
from lamp_jax.summaries import ScalarWriter
from lamp_jax.workdir_lock import hold_workdir


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=print) -> dict[str, Any]:
    """Learns one mask per relation, selects by dev macro P@1, reports held-out test metrics.

    Resumes from ``workdir/checkpoints`` when a run was interrupted. Writes ``run.json``,
    ``metrics.json``, ``masks.npz`` and ``plots/*.png`` into ``workdir`` and returns the metrics
    (``{"stopped_at": step, "preempted": bool, ...}`` when ``config.stop_after`` or a
    preemption notice stopped it first). Holds the workdir's lock while it runs
    (:mod:`lamp_jax.workdir_lock`: another run there is refused with a UsageError); a failed
    write to it raises :class:`~lamp_jax.errors.StorageError`."""
    validate_config(config)  # before anything is written
    check_sources(config)  # the model and data are there, and the data holds the relations
    # Before JAX starts its backends (a no-op once they have, e.g. later in a notebook).
    placement.use_cpu_devices(config.cpu_devices)
    log, clock = main_log(log), PhaseClock()
    directory = RunDirectory(workdir)
    directory.create()
    # One run at a time in a workdir: a second is refused here, before it loads anything.
    with hold_workdir(directory.path, log) as lock:
        directory.ensure_writable()  # fail now, not at the first checkpoint
        return _train_and_evaluate(config, directory, lock, log, clock)


def _train_and_evaluate(config: ml_collections.ConfigDict, directory: RunDirectory, lock: Any,
                        log, clock: PhaseClock) -> dict[str, Any]:
    """:func:`train_and_evaluate` in a workdir this process holds (``lock``)."""
    # A resume under another configuration is refused before the model loads (unless the
    # model or the relations may differ: then check_resumable speaks first).
    directory.check_config(config, config.on_config_change,
                           max(saved_steps(directory.path / "checkpoints"), default=None),
                           before_loading=True)
    setup = setup_training(config, log, lap=clock.lap)

    # Restore or init. Nothing is written before a refused resume could stop the run.
    run_json = manifest(setup)
    directory.check_resumable(run_json)
    background = placement.saves_in_background(setup.state_bytes)
    states, restored = open_state_checkpoints(
        directory.path / "checkpoints", setup.state_layout(), background=background,
        on_unreadable=config.on_unreadable_checkpoints, start_over=directory.start_over, log=log)
    state = restored if restored is not None else setup.init_state(log)
    first = int(state.step)
    # The step actually resumed from may be older than the newest checkpoint (a damaged one).
    changes = directory.check_config(config, config.on_config_change,
                                     first if restored is not None else None)
    run_json["config_history"] = directory.next_config_history(config, first,
                                                               restored is not None, changes)
    best = BestMasks(directory.path, background=background)
    sync("run directory checked")  # before process 0 replaces run.json
    directory.write_manifest(run_json, setup.data.facts_by_split)
    history = directory.keep_records_until(first)
    if restored is not None:
        log(f"resumed from step {first}")
        directory.append_record({"step": first, "event": "resumed"})
    if changes:
        log(f"the configuration changed at step {first}, as config.on_config_change="
            f"'continue' allows: {'; '.join(describe_changes(changes))} (recorded in "
            "metrics.jsonl, run.json and metrics.json)")
        directory.append_record({"step": first, "event": "config_changed", "changes": changes})
    scalars = ScalarWriter(directory.path, first)
    clock.lap("setup")

    bar = tqdm(range(first, setup.num_steps), desc="training masks", unit="step",
               initial=first, total=setup.num_steps, disable=not is_main())
    pending = metrics = None
    # SIGTERM (a preemption notice) from here on saves the state at the next step and stops.
    with PreemptionNotice() as notice:
        for step in bar:
            state, metrics = setup.step_fn(state, setup.frozen, setup.train_batch(step),
                                           setup.learning_rate)
            done = step + 1
            # Checked one step late, so the host never stalls the device queue to look.
            if pending is not None:
                check_finite(pending, done - 1, setup.relations, config.on_nonfinite, log)
            pending = metrics
            if done % setup.eval_every == 0 or done == setup.num_steps:
                check_finite(pending, done, setup.relations, config.on_nonfinite, log)
                pending = None
                clock.lap("steps", state.mask_logits)
                dev = setup.scores(state.mask_logits, "dev")
                bar.set_postfix(dev_macro_p1=f"{dev.macro(1):.3f}")
                record = evaluation_record(done, metrics, dev)
                scalars.write(done, evaluation_scalars(
                    record, dev, to_host(pruned_fraction(state.mask_logits,
                                                         setup.mode.threshold))))
                clock.lap("evaluation")
                lock.check()  # a bucket's lock: still this run's
                if best.save(done, state.mask_logits, dev.macro(1)):
                    record["best"] = True
                record.update(checkpoint_fields(states.save(state, done)))
                if not background:
                    # The save's and the evaluation's host buffers are free now, but glibc
                    # kept them mapped: bert-base x 16 relations crept from 9.2 to 10.5 GiB
                    # between two steps on a CPU (bench/README.md, memory).
                    return_free_memory()
                clock.lap("checkpoints")
                history.append(record)
                directory.append_record(record)
            preempted, stop = stop_now(notice, done, first, setup.num_steps, config.stop_after)
            if stop:  # at the last step too: a rerun writes the reports
                bar.close()
                states.save(state, done)
                for closing in (scalars, states, best):
                    closing.close()
                if preempted:
                    log(f"preemption notice (SIGTERM): saved the state at step {done}; run the "
                        "same command again to resume")
                return {"stopped_at": done, "preempted": preempted, "history": history,
                        "resumed_from": directory.resumes()}
    bar.close()
    scalars.close()
    states.wait()
    clock.lap("checkpoints")

    # Report. The best masks replace the training state (bert-base x 16 relations: 8 GB freed
    # before the final evaluations).
    del state, metrics, pending
    best_masks = directory.best_masks(setup.mask_layout)
    report = final_report(setup, best_masks, "test")
    log_report(report, "test", config.seed, log)
    clock.lap("report")
    trained = sum(clock.seconds.get(k, 0.0) for k in ("steps", "evaluation", "checkpoints"))
    summary = dict(report.summary, history=history, best_dev_macro_P1=best.score(),
                   resumed_from=directory.resumes(),
                   config_changes=directory.recorded_config_changes(), train_seconds=trained,
                   steps=setup.num_steps, resources=clock.resources())
    lock.check()
    directory.write_masks(best_masks, setup.spec, setup.relations, setup.mode.threshold)
    if report.prompt_ranks is not None:
        directory.write_prompt_ranks(report.prompt_ranks, "test")
    if config.plots and is_main():
        plots.write_run_plots(directory.path / "plots", report.shown_relations, report.full,
                              report.pruned, report.sparsity, setup.spec, report.specialization)
    directory.write_metrics(summary)
    log(clock.summary())
    states.close()
    best.close()
    return summary


def stop_now(notice: PreemptionNotice, done: int, first: int, num_steps: int,
             stop_after: int) -> tuple[bool, bool]:
    """``(preempted, stop)`` after ``done`` steps of a loop that began at ``first``: stop when
    a preemption notice came (asked at every step, by every process: JAX's preemption protocol
    needs that) or after ``stop_after`` steps of this invocation (a drill), but before the
    end."""
    preempted = notice.reached(done)
    drill = bool(stop_after) and done - first >= stop_after and done < num_steps
    return preempted, preempted or drill


def check_finite(metrics: dict[str, Any], step: int, relations: tuple[str, ...],
                 on_nonfinite: str, log) -> None:
    """The step already refused non-finite updates; here we stop or say it was skipped."""
    finite = to_host(metrics["finite"])[..., : len(relations)]
    if finite.all():
        return
    bad = sorted({relations[r] for r in np.argwhere(~finite)[:, -1]})
    message = (f"non-finite loss or gradient at step {step} for relation(s) {bad}; their masks "
               "were left unchanged")
    if on_nonfinite == "stop":
        raise FloatingPointError(message + " (config.on_nonfinite='skip' skips such updates)")
    log("warning: " + message)


def evaluation_record(step: int, metrics: dict[str, Any], dev: RankingResult) -> dict[str, Any]:
    """A dev evaluation's line of ``metrics.jsonl``: the step, the training cross-entropy of
    the last step (mean over relations that had data) and dev P@1."""
    seen = to_host({k: metrics[k] for k in ("ce", "count")})
    num = len(dev.relations)
    ce = seen["ce"][:num][seen["count"][:num] > 0]
    return {"step": step, "train_ce": float(ce.mean()) if ce.size else None,
            "dev_macro_P@1": dev.macro(1), "dev_micro_P@1": dev.micro(1)}


def evaluation_scalars(record: dict[str, Any], dev: RankingResult, pruned: np.ndarray
                       ) -> dict[str, float | None]:
    """What TensorBoard shows of an evaluation (``pruned``: each relation's pruned fraction)."""
    return {"train/ce": record["train_ce"], "dev/macro_P1": record["dev_macro_P@1"],
            "dev/micro_P1": record["dev_micro_P@1"],
            **{f"dev_P1/{r}": p for r, p in zip(dev.relations, dev.precision_at(1),
                                                 strict=True)},
            **{f"sparsity/{r}": float(p) for r, p in zip(dev.relations, pruned, strict=False)}}


def checkpoint_fields(saved: dict[str, float] | None) -> dict[str, float]:
    """What an evaluation's record says of the state saved with it (nothing if not saved)."""
    if not saved:
        return {}
    return {"checkpoint_GB": round(saved["bytes"] / 1e9, 3),
            "checkpoint_s": round(saved["seconds"], 2)}
