"""Run directories: the one module that writes and reads them.

A run directory (``--workdir``, a local path or a ``gs://`` / ``s3://`` URL) holds::

    run.json          the model, data, relations, mask layout and configuration (RunManifest),
                      and every configuration it trained under with the step each began
                      ("config_history")
    split.json        per split, the facts it holds: anyone can recompute the metrics
    metrics.jsonl     one record per dev evaluation, one per resume ("event": "resumed") and
                      one per resume under a changed configuration ("event": "config_changed")
    metrics.json      the final report (test and dev metrics, sparsity, specialization, ...)
    masks.npz         the best binary masks, one bit per weight
    best/<step>/      the best mask logits by dev score (Orbax)
    checkpoints/      the latest training states, to resume from (Orbax; for a sweep's runs
                      these belong to their group, under the sweep's workdir)
    events.out.tfevents.*, plots/, report/, eval_<split>.json
    .lock             who trains in it now (lamp_jax.workdir_lock)

:class:`RunDirectory` is the only reader of ``run.json``. Files other than checkpoints are
written by process 0 only (:mod:`lamp_jax.hosts`).
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

from lamp_jax.checkpoint import export_binary_masks, restore_best_masks, restore_latest_masks
from lamp_jax.config_changes import (
    config_changes,
    config_record,
    describe_changes,
    may_change_layout,
)
from lamp_jax.config_checks import with_defaults
from lamp_jax.errors import MissingFileError, StorageError, UsageError
from lamp_jax.hosts import append_text, is_main, sync, write_text
from lamp_jax.masks import MaskMode, MaskSpec
from lamp_jax.paths import absolute, load_npz, save_npz, unwritable_workdir

# What a run directory holds about the training that made it (checkpoints, best masks, the
# logs of its steps), as opposed to what describes the run (run.json, split.json, plots):
# deleted when a run starts over.
RUN_RECORDS = ("checkpoints", "best", "best_score.json", "metrics.jsonl", "metrics.json",
               "masks.npz", "prompt_ranks_*.npz", "events.out.tfevents.*")


@dataclasses.dataclass(frozen=True)
class RunManifest:
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
        self.path = absolute(path)

    def __repr__(self) -> str:
        return f"RunDirectory({self.path})"

    def create(self) -> None:
        """Creates the directory (and its parents)."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unwritable(err) from err

    def ensure_writable(self) -> None:
        """Creates the directory and proves it writable now, not at the first checkpoint."""
        probe = self.path / f".write_test.{jax.process_index()}"  # one per process: no races
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"x" * 4096)
            probe.unlink()
        except OSError as err:
            raise self._unwritable(err) from err

    def _unwritable(self, err: OSError) -> StorageError:
        return unwritable_workdir(self.path, err)

    # run.json and split.json
    def run_json(self) -> dict[str, Any]:
        """``run.json`` as written."""
        path = self.path / "run.json"
        if not path.exists():
            raise MissingFileError(f"{self.path} is not a lamp-jax run directory (no run.json)")
        return json.loads(path.read_text())

    def manifest(self) -> RunManifest:
        run = self.run_json()
        mask = run["mask"]
        mode = MaskMode(mask["mode"], tau=mask["tau"], threshold=mask["threshold"],
                        ste_grad=mask["ste_grad"])
        return RunManifest(run["model"], run["data"], run.get("dtype", "float32"),
                       tuple(run["relations"]), dict(run.get("relation_labels", {})),
                       MaskSpec(tuple(mask["layers"]), tuple(mask["matrices"])), mode,
                       mode.for_inference(mask["eval_kind"]),
                       with_defaults(run["config"]))

    def check_resumable(self, manifest: dict[str, Any]) -> None:
        """Refuses a directory whose earlier run used another model, relation set or mask
        layout (its checkpoints could not be resumed into this configuration), naming every
        mismatch at once. Every process checks, so that every process stops."""
        if not (self.path / "run.json").exists():
            return
        previous = self.run_json()
        mismatches = [f"{key}: {previous.get(key)} here, {manifest[key]} now"
                      for key in ("model_config", "relations")
                      if previous.get(key) != manifest[key]]
        mismatches += [f"mask {key}: {previous['mask'][key]} here, {manifest['mask'][key]} now"
                       for key in ("layers", "matrices", "mode")
                       if previous["mask"][key] != manifest["mask"][key]]
        if mismatches:
            raise UsageError(f"{self.path} holds another run; its checkpoints do not fit this "
                             "configuration:\n  " + "\n  ".join(mismatches)
                             + "\nUse another --workdir or delete that one.")

    # The configurations a run trained under (lamp_jax.config_changes)
    def config_history(self) -> list[dict[str, Any]]:
        """``run.json``'s ``config_history``: ``[{"step": 0, "config": {...}}, {"step": N,
        "config": {...}, "changes": {...}}, ...]``, the configurations the run trained under and
        the step each began at (empty without run.json; one entry for run.json files written
        before the history was kept)."""
        if not (self.path / "run.json").exists():
            return []
        run = self.run_json()
        return run.get("config_history") or [{"step": 0, "config": run["config"]}]

    def config_changes_at(self, config: Any, resume_step: int | None,
                          before_loading: bool = False) -> dict[str, dict[str, Any]]:
        """The trajectory fields in which ``config`` differs from the configuration the run
        trained under at ``resume_step`` (None: not resuming, nothing to compare).
        ``before_loading``: nothing yet when the model or the relation set may have changed
        (:data:`~lamp_jax.config_changes.LAYOUT_SOURCES`): check_resumable speaks first."""
        history = [h for h in self.config_history()
                   if resume_step is not None and h["step"] <= resume_step]
        if not history or (before_loading and may_change_layout(history[-1]["config"], config)):
            return {}
        return config_changes(history[-1]["config"], config)

    def check_config(self, config: Any, policy: str, resume_step: int | None,
                     before_loading: bool = False) -> dict[str, dict[str, Any]]:
        """:meth:`config_changes_at`; with ``policy`` "stop" a change raises UsageError listing
        every difference, with "continue" the changes are returned, to be recorded."""
        changes = self.config_changes_at(config, resume_step, before_loading)
        if changes and policy != "continue":
            raise config_change_refused({self.path: changes}, resume_step)
        return changes

    def next_config_history(self, config: Any, first: int, resumed: bool,
                            changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """The history to record once the run starts at step ``first``: its past up to that
        step (nothing when not resumed), and ``config`` from ``first`` on when it is new or
        changed."""
        past = [h for h in self.config_history() if h["step"] <= first] if resumed else []
        if not past:
            return [{"step": first, "config": config_record(config)}]
        if changes:
            return past + [{"step": first, "config": config_record(config), "changes": changes}]
        return past

    def recorded_config_changes(self) -> list[dict[str, Any]]:
        """Every change of configuration the run went through: ``[{"step", "changes"}]``."""
        return [{"step": h["step"], "changes": h["changes"]} for h in self.config_history()
                if h.get("changes")]

    def write_manifest(self, manifest: dict[str, Any], facts_by_split: dict[str, Any]) -> None:
        write_text(self.path / "run.json", json.dumps(manifest, indent=2, default=str))
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

    def write_prompt_ranks(self, ranks: dict[str, np.ndarray], split: str) -> None:
        """Every system's rank of each held-out prompt of ``split``, with the prompt's relation
        index and fact (``prompt_ranks_<split>.npz``): what the controls' intervals were computed
        from, so that a report or a sweep can recompute and combine them."""
        if is_main():
            save_npz(self.path / f"prompt_ranks_{split}.npz", **ranks)

    def prompt_ranks(self, split: str = "test") -> dict[str, np.ndarray] | None:
        path = self.path / f"prompt_ranks_{split}.npz"
        if not path.exists():
            return None
        with load_npz(path) as data:
            return {key: data[key] for key in data.files}

    def write_masks(self, mask_logits: Any, spec: MaskSpec, relations: Sequence[str],
                    threshold: float) -> None:
        export_binary_masks(self.path / "masks.npz", mask_logits, spec, tuple(relations),
                            threshold)

    def best_masks(self, template_logits: Any | None = None) -> Any:
        """The best mask logits: numpy ``[relations, ...]``, or laid out like
        ``template_logits`` (on devices, the relation axis truncated or zero-padded)."""
        if template_logits is not None:
            return restore_best_masks(self.path, template_logits=template_logits)
        return restore_best_masks(self.path, len(self.run_json()["relations"]))

    def latest_masks(self) -> Any:
        """The mask logits of the newest training state, numpy ``[relations, ...]``."""
        return restore_latest_masks(self.path, len(self.run_json()["relations"]))

    def start_over(self, log=print) -> None:
        """Deletes the records of the training that made this run (:data:`RUN_RECORDS`)."""
        if is_main():
            for name in RUN_RECORDS:
                for path in sorted(self.path.glob(name)):
                    path.rmtree() if path.is_dir() else path.unlink()
                    log(f"deleted {path}")
        sync("start over: old records deleted")


def config_change_refused(changes: dict[Any, dict[str, dict[str, Any]]], resume_step: int
                          ) -> UsageError:
    """The refusal of a resume at ``resume_step`` under other settings: every difference of
    every run directory (``{path: changes}``) at once, old and new value."""
    runs = [(path, lines) for path, c in changes.items() if (lines := describe_changes(c))]
    if len(runs) == 1:
        path, lines = runs[0]
        listed, it, was, trains = "\n  ".join(lines), "it", f"{path} was", "trains"
    else:
        listed = "\n  ".join(f"{path}:\n    " + "\n    ".join(lines) for path, lines in runs)
        it, was, trains = "they", "these runs were", "train"
    return UsageError(
        f"{was} trained to step {resume_step} under another configuration; resuming with this "
        f"one would change how {it} {trains}:\n  {listed}\nRerun with the values {it} trained "
        "with, or with --config.on_config_change=continue to resume under the new ones (the "
        "change is recorded in metrics.jsonl, run.json and metrics.json), or use another "
        "--workdir.")


def manifest(setup: Any, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """What ``run.json`` records of a run set up by :mod:`lamp_jax.setup` with ``config``
    (default: the setup's): everything needed to rebuild its model, data and masks (read back
    by :meth:`RunDirectory.manifest`)."""
    from lamp_jax.data import labels_entry

    config = config or setup.config
    return {
        "model": setup.model_source,
        "model_config": setup.mlm.config.to_hf_dict(),
        "data": str(setup.data_path),
        "dtype": config.dtype,
        "relations": list(setup.relations),
        **labels_entry(setup.relations, setup.data.labels),
        "mask": {"layers": list(setup.spec.layers), "matrices": list(setup.spec.matrices),
                 "mode": setup.mode.kind, "tau": setup.mode.tau,
                 "threshold": setup.mode.threshold, "ste_grad": setup.mode.ste_grad,
                 "eval_kind": setup.eval_mode.kind},
        "config": config.to_dict(),
    }
