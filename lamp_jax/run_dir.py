"""Run directories: the one module that writes and reads them, and what a training loop keeps.

A run directory (``--workdir``, a local path or a ``gs://`` / ``s3://`` URL) holds::

    run.json          the model, data, relations, mask layout and configuration (RunInfo)
    split.json        per split, the facts it holds: anyone can recompute the metrics
    metrics.jsonl     one record per dev evaluation, and one per resume ("event": "resumed")
    metrics.json      the final report (test and dev metrics, sparsity, specialization, ...)
    masks.npz         the best binary masks, one bit per weight
    best/<step>/      the best mask logits by dev score (Orbax)
    checkpoints/      the latest training states, to resume from (Orbax; for a sweep's runs
                      these belong to their group, under the sweep's workdir)
    events.out.tfevents.*, plots/, report/, eval_<split>.json

:class:`RunDirectory` is the only reader of ``run.json``. :class:`Keeper` is what the loop
(:func:`lamp_jax.loop.fit`) is handed: where the latest states go, and one run directory per
run on the relation axis (one for ``train.py``, one per run of a sweep group). Files other than
checkpoints are written by process 0 only (:mod:`lamp_jax.hosts`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from lamp_jax import plots
from lamp_jax.checkpoint import (
    BestMasks,
    StateCheckpoints,
    UnreadableCheckpointsError,
    export_binary_masks,
    restore_best_masks,
    restore_latest_masks,
)
from lamp_jax.hosts import append_text, is_main, return_free_memory, sync, to_host, write_text
from lamp_jax.masks import MaskMode, MaskSpec, pruned_fraction
from lamp_jax.paths import run_dir
from lamp_jax.summaries import ScalarWriter

# Below this size of training state, checkpoints are saved in the background.
BACKGROUND_SAVE_BYTES = 2**30
# What a run directory holds about the training that made it (checkpoints, best masks, the
# logs of its steps), as opposed to what describes the run (run.json, split.json, plots):
# deleted when a run starts over.
RUN_RECORDS = ("checkpoints", "best", "best_score.json", "metrics.jsonl", "metrics.json",
               "masks.npz", "events.out.tfevents.*")


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """``run.json`` read back: how to rebuild the run's model, data and masks."""

    model: str
    data: str
    dtype: str
    relations: tuple[str, ...]
    labels: dict[str, str]
    spec: MaskSpec
    mode: MaskMode  # how the masks were trained
    eval_mode: MaskMode  # how they are read at inference (config.mask.eval_kind)
    config: ml_collections.ConfigDict


class RunDirectory:
    """One run's directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = run_dir(path)

    def __repr__(self) -> str:
        return f"RunDirectory({self.path})"

    def ensure_writable(self) -> None:
        """Creates the directory and proves it writable now, not at the first checkpoint."""
        probe = self.path / f".write_test.{jax.process_index()}"  # one per process: no races
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as err:
            raise OSError(f"cannot write to the workdir {self.path}: {err.strerror or err} "
                          "(checkpoints, metrics and plots go there; pick another --workdir or "
                          "free space)") from err

    # run.json and split.json
    def record(self) -> dict[str, Any]:
        """``run.json`` as written."""
        path = self.path / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} is not a lamp-jax run directory (no run.json)")
        return json.loads(path.read_text())

    def info(self) -> RunInfo:
        run = self.record()
        mask = run["mask"]
        mode = MaskMode(mask["mode"], tau=mask["tau"], threshold=mask["threshold"],
                        ste_grad=mask["ste_grad"])
        return RunInfo(run["model"], run["data"], run.get("dtype", "float32"),
                       tuple(run["relations"]), dict(run.get("relation_labels", {})),
                       MaskSpec(tuple(mask["layers"]), tuple(mask["matrices"])), mode,
                       mode.for_inference(mask["eval_kind"]),
                       ml_collections.ConfigDict(run["config"]))

    def check_resumable(self, record: dict[str, Any]) -> None:
        """Refuses a directory whose earlier run used another model, relation set or mask
        layout (its checkpoints could not be resumed into this configuration), naming every
        mismatch at once. Every process checks, so that every process stops."""
        if not (self.path / "run.json").exists():
            return
        previous = self.record()
        mismatches = [f"{key}: {previous.get(key)} here, {record[key]} now"
                      for key in ("model_config", "relations")
                      if previous.get(key) != record[key]]
        mismatches += [f"mask {key}: {previous['mask'][key]} here, {record['mask'][key]} now"
                       for key in ("layers", "matrices", "mode")
                       if previous["mask"][key] != record["mask"][key]]
        if mismatches:
            raise ValueError(f"{self.path} holds another run; its checkpoints do not fit this "
                             "configuration:\n  " + "\n  ".join(mismatches)
                             + "\nUse another --workdir or delete that one.")

    def write_record(self, record: dict[str, Any], facts_by_split: dict[str, Any]) -> None:
        write_text(self.path / "run.json", json.dumps(record, indent=2, default=str))
        # Which facts were held out: anyone can recompute the metrics from this, the masks and
        # the model, without our code.
        write_text(self.path / "split.json", json.dumps(facts_by_split, indent=1))

    # metrics.jsonl
    def log_records(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def keep_records_until(self, step: int) -> list[dict[str, Any]]:
        """Drops records of steps after the resumed one: they will be recomputed, not
        duplicated. Returns the evaluations kept (process 0; elsewhere nothing)."""
        if not is_main():
            return []
        kept = [r for r in self.log_records() if r["step"] <= step]
        if (self.path / "metrics.jsonl").exists():
            write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        return [r for r in kept if "event" not in r]

    def append_record(self, record: dict[str, Any]) -> None:
        append_text(self.path / "metrics.jsonl", json.dumps(record) + "\n")

    def resumes(self) -> list[int]:
        """The steps this run was resumed from, in order: its own record of every resume."""
        return [r["step"] for r in self.log_records() if r.get("event") == "resumed"]

    # final files
    def write_metrics(self, summary: dict[str, Any], name: str = "metrics.json") -> None:
        write_text(self.path / name, json.dumps(summary, indent=2))

    def metrics(self) -> dict[str, Any] | None:
        path = self.path / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_masks(self, mask_logits: Any, spec: MaskSpec, relations: Sequence[str],
                    threshold: float) -> None:
        export_binary_masks(self.path / "masks.npz", mask_logits, spec, tuple(relations),
                            threshold)

    def best_masks(self, template_logits: Any | None = None) -> Any:
        """The best mask logits: numpy ``[relations, ...]``, or laid out like
        ``template_logits`` (on devices, the relation axis truncated or zero-padded)."""
        if template_logits is not None:
            return restore_best_masks(self.path, template_logits=template_logits)
        return restore_best_masks(self.path, len(self.record()["relations"]))

    def latest_masks(self) -> Any:
        """The mask logits of the newest training state, numpy ``[relations, ...]``."""
        return restore_latest_masks(self.path, len(self.record()["relations"]))

    def start_over(self, log=print) -> None:
        """Deletes the records of the training that made this run (:data:`RUN_RECORDS`)."""
        if is_main():
            for name in RUN_RECORDS:
                for path in sorted(self.path.glob(name)):
                    path.rmtree() if path.is_dir() else path.unlink()
                    log(f"deleted {path}")
        sync("start over: old records deleted")


class Keeper:
    """What the training loop keeps and where: the latest states of the relation axis under
    ``state_dir/checkpoints`` (to resume), and per run on that axis its run directory (run.json,
    metrics, TensorBoard scalars, best masks, final files)."""

    def __init__(self, state_dir: str | Path, runs: Sequence[RunDirectory],
                 group: dict[str, Any] | None = None):
        """``group``: for the runs of a sweep group, what they are (``group.json`` in
        ``state_dir``), checked before resuming."""
        self.state_dir, self.runs, self.group = run_dir(state_dir), list(runs), group
        self.history: list[list[dict[str, Any]]] = [[] for _ in self.runs]
        self.stopped: dict[str, Any] | None = None  # where config.stop_after stopped

    @classmethod
    def for_run(cls, workdir: str | Path) -> Keeper:
        """train.py's: one run, whose directory also holds its checkpoints."""
        directory = RunDirectory(workdir)
        return cls(directory.path, [directory])

    def prepare(self) -> None:
        """Fails fast, before anything loads, when a directory cannot be written."""
        for directory in self.runs:
            directory.ensure_writable()

    def open(self, run, log=print):
        """Checks that every directory may take this run, restores the latest state or builds
        a fresh one, and only then writes: a refused resume changes nothing. Returns the
        state to train from."""
        records = [run.run_record(v) for v in range(run.num_runs)]
        for directory, record in zip(self.runs, records, strict=True):
            directory.check_resumable(record)
        self._check_group()
        # A background save must first copy the whole state off the devices (the next step
        # overwrites the donated buffers): bert-base x 16 relations on a GPU took 18 GB of host
        # memory to save. Large states are saved in place, 1 GB at a time, while training waits.
        self.background = run.state_bytes < BACKGROUND_SAVE_BYTES
        self.large_state = not self.background
        state = run.init_state(log)
        self.states = StateCheckpoints(self.state_dir / "checkpoints", background=self.background)
        try:
            restored = self.states.restore_latest(state, log)
        except UnreadableCheckpointsError as err:
            if run.config.on_unreadable_checkpoints != "start_over":
                raise
            log(f"warning: {str(err).splitlines()[0]}; starting over, as "
                "config.on_unreadable_checkpoints='start_over' asks")
            self.states.close()
            for directory in {d.path: d for d in (*self.runs, RunDirectory(self.state_dir))
                              }.values():
                directory.start_over(log)
            self.states = StateCheckpoints(self.state_dir / "checkpoints",
                                           background=self.background)
            restored = None
        self.best = [BestMasks(d.path, background=self.background) for d in self.runs]
        sync("run directories checked")  # before process 0 replaces run.json
        for directory, record in zip(self.runs, records, strict=True):
            directory.write_record(record, run.data.facts_by_split)
        if self.group is not None:
            write_text(self.state_dir / "group.json", json.dumps(self.group, indent=1))
        step = int(restored.step) if restored is not None else 0
        self.history = [d.keep_records_until(step) for d in self.runs]
        if restored is not None:
            log(f"resumed from step {step}")
            for directory in self.runs:  # the run's own record of every resume
                directory.append_record({"step": step, "event": "resumed"})
        self.scalars = [ScalarWriter(d.path, step) for d in self.runs]
        return restored if restored is not None else state

    def evaluated(self, step: int, state, dev: Sequence, metrics: dict[str, Any], run,
                  clock) -> None:
        """Logs an evaluation (metrics.jsonl, TensorBoard), keeps each run's best masks and
        the latest state."""
        seen = to_host({k: metrics[k] for k in ("ce", "count")})
        pruned = to_host(pruned_fraction(state.mask_logits, run.mode.threshold))
        num, records = len(run.relations), []
        for v, result in enumerate(dev):
            rows = slice(v * num, (v + 1) * num)
            ce = seen["ce"][rows][seen["count"][rows] > 0]
            record = {"step": step, "train_ce": float(ce.mean()) if ce.size else None,
                      "dev_macro_P@1": result.macro(1), "dev_micro_P@1": result.micro(1)}
            self.scalars[v].write(step, {
                "train/ce": record["train_ce"], "dev/macro_P1": result.macro(1),
                "dev/micro_P1": result.micro(1),
                **{f"dev_P1/{r}": p for r, p in zip(run.relations, result.precision_at(1),
                                                      strict=True)},
                **{f"sparsity/{r}": p for r, p in zip(run.relations, pruned[rows],
                                                      strict=True)}})
            records.append(record)
        clock.lap("evaluation")
        improved = [v for v, (best, result) in enumerate(zip(self.best, dev, strict=True))
                    if best.beats(result.macro(1))]
        if improved:
            # A sweep's runs take their slots from one host copy: slicing the sharded logits
            # run by run dispatched a gather per matrix and run (12 s of a 12-run group's
            # 160 s). One run saves straight from its devices, as it always did.
            logits = state.mask_logits if len(self.runs) == 1 else to_host(state.mask_logits)
            for v in improved:
                self.best[v].save(step, _run_slots(logits, v, num, len(self.runs)),
                                  dev[v].macro(1), wait=False)
                records[v]["best"] = True
            for v in improved:
                self.best[v].commit()
        saved = self.states.save(state)
        if saved:
            for record in records:
                record["checkpoint_GB"] = round(saved["bytes"] / 1e9, 3)
                record["checkpoint_s"] = round(saved["seconds"], 2)
        if self.large_state:
            # The save's and the evaluation's host buffers are free now, but glibc kept
            # them mapped: bert-base x 16 relations crept from 9.2 to 10.5 GiB between
            # two steps on a CPU (bench/README.md, memory).
            return_free_memory()
        clock.lap("checkpoints")
        for directory, history, record in zip(self.runs, self.history, records, strict=True):
            history.append(record)
            directory.append_record(record)

    def stop(self, state, step: int, preempted: bool = False) -> dict[str, Any]:
        """``config.stop_after`` or a preemption notice: saves the state, waits for the save
        and closes; rerunning resumes."""
        self.states.save(state)
        self.close()
        return {"stopped_at": step, "preempted": preempted, "history": self.history[0],
                "resumed_from": self.runs[0].resumes()}

    def finish(self) -> None:
        """Training is over: the scalars are flushed, the last save is written."""
        for writer in self.scalars:
            writer.close()
        self.states.wait()

    def best_masks(self, run) -> Any:
        """Every run's best masks on the relation axis, laid out like the training state's
        logits (the state itself is gone by then)."""
        if len(self.runs) == 1:
            return self.runs[0].best_masks(run.mask_layout)
        from lamp_jax.parallel import pad_relations, shard_relations

        parts = [d.best_masks() for d in self.runs]
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        return shard_relations(pad_relations(joined, run.slots), run.mesh)

    def best_scores(self) -> list[float | None]:
        return [best.score() for best in self.best]

    def write_reports(self, run, best, reports: Sequence, extra: dict[str, Any]) -> None:
        """Each run's final files: metrics.json (its report, history and ``extra``),
        masks.npz and, with ``config.plots``, its plots."""
        num = len(run.relations)
        for v, (directory, report) in enumerate(zip(self.runs, reports, strict=True)):
            summary = dict(report.summary, history=self.history[v],
                           best_dev_macro_P1=self.best[v].score(),
                           resumed_from=directory.resumes(), **extra)
            directory.write_masks(_run_slots(best, v, num, len(self.runs), host=True),
                                  run.spec, run.relations, run.mode.threshold)
            if run.configs[v].plots and is_main():
                plots.write_run_plots(directory.path / "plots", report.shown_relations,
                                      report.full, report.pruned, report.sparsity, run.spec,
                                      report.specialization)
            directory.write_metrics(summary)
            report.summary = summary

    def close(self) -> None:
        for writer in getattr(self, "scalars", []):
            writer.close()
        if hasattr(self, "states"):
            self.states.wait()
            self.states.close()
        for best in getattr(self, "best", []):
            best.close()

    def _check_group(self) -> None:
        path = self.state_dir / "group.json"
        if self.group is None or not path.exists():
            return
        previous = json.loads(path.read_text())
        if previous != json.loads(json.dumps(self.group)):
            raise ValueError(f"{self.state_dir} holds the checkpoints of another sweep group "
                             f"({previous}); this one is {self.group}. Use another --workdir.")


def _run_slots(tree: Any, run: int, relations: int, runs: int, host: bool = False) -> Any:
    """Run ``run``'s slots of the relation axis; the whole axis when there is one run (its
    inert slots included, as train.py always saved them)."""
    if runs == 1:
        return tree
    rows = slice(run * relations, (run + 1) * relations)
    return jax.tree.map(lambda x: (to_host(x) if host else x)[rows], tree)


def sweep_run_dir(workdir: str | Path, name: str) -> RunDirectory:
    """Where a sweep writes run ``name``'s directory."""
    return RunDirectory(epath.Path(run_dir(workdir)) / "runs" / name)

