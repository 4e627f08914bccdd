"""Hyperparameter sweeps as one program: every (configuration, seed) run shares the frozen model
and trains on the relation axis beside the others, in one jitted step.

    python -m lamp_jax.sweep --grid mask.mode=stochastic,deterministic \\
        --grid optim.learning_rate=0.01,0.1,0.3 --seeds 3 --workdir runs/sweep
    python -m lamp_jax.sweep --config=configs/default.py --config.epochs=10 \\
        --grid optim.learning_rate=0.03,0.1 --seeds 2 --compare_sequential

The step already vmaps over relations, each with its own Adam state and schedule
(:mod:`lamp_jax.step`). A sweep widens that axis to (configuration, seed, relation) slots:
each run gets its own learning rate, mask init and seed (mask init, concrete noise and batch
order), and draws exactly the noise and batches it would draw alone. Settings that change the
program (the mask mode, temperature, epochs, the model, ...) run as separate groups, one after
another. A group is trained by train.py's own loop (:func:`lamp_jax.loop.fit`) and reported by
its own :func:`~lamp_jax.loop.final_report`: what differs is the keeper, which writes one run
directory per run (``<workdir>/runs/<run>/``, openable with ``load_run``, ``lamp_jax.report``,
``lamp_jax.evaluate`` and ``export_subnetwork``) and keeps the group's latest states under
``<workdir>/groups/<group>/checkpoints`` (kill -9 and rerun the same command: it resumes).

A run of the sweep computes what ``train.py`` with the same settings computes, up to rounding:
XLA's kernels over a wider relation axis may round the last bits differently, which a large
learning rate with hard thresholds can turn into different masks (README). Runs are selected
as train.py selects (dev macro P@1 of ``mask.eval_kind``), then reported on test with binary
and soft masks; they write no plots (``sweep.png`` shows them all). Written to ``--workdir``:
``sweep.json`` (every run), ``sweep.md`` (mean +- std over seeds per configuration, with links
to the runs), ``sweep.png``. ``--compare_sequential`` also runs every (configuration, seed) with
train.py's own function, one after another, and compares the two: wall time, metrics and the
bytes of ``masks.npz``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lamp_jax.hosts import is_main, main_log, write_text
from lamp_jax.loop import PhaseClock, final_report, fit
from lamp_jax.parallel import use_cpu_devices
from lamp_jax.paths import run_dir
from lamp_jax.run_dir import Keeper, RunDirectory
from lamp_jax.run_setup import SLOT_KEYS, setup_run


@dataclasses.dataclass(frozen=True)
class Run:
    """One (configuration, seed) of a sweep: ``overrides`` are the grid's values for it."""

    overrides: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides) or "base config"

    @property
    def name(self) -> str:
        """Its run directory's name under ``<workdir>/runs``."""
        return _slug(",".join([*(f"{k}={v}" for k, v in self.overrides), f"seed={self.seed}"]))

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Its configuration: the base with the grid's values and its seed (no plots: the
        sweep's own figure shows every run)."""
        return with_overrides(base, dict(self.overrides, seed=self.seed, plots=False))


def with_overrides(base: ml_collections.ConfigDict, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def parse_grid(base: ml_collections.ConfigDict, grid: Sequence[str]) -> dict[str, list[Any]]:
    """``["optim.learning_rate=0.01,0.1", ...]`` -> ``{"optim.learning_rate": [0.01, 0.1]}``,
    each value converted to the type of the config's field."""
    out: dict[str, list[Any]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid {item!r}: expected key=value1,value2,...")
        try:
            current = with_overrides(base, {})
            for part in key.split("."):
                current = current[part]
        except (KeyError, AttributeError) as err:
            raise ValueError(f"--grid {item!r}: the config has no field {key!r}") from err
        if key in out:
            raise ValueError(f"--grid {key} is given twice")
        if key == "seed":
            raise ValueError("--grid seed=...: use --seeds N (seeds config.seed .. + N - 1)")
        out[key] = [_convert(v.strip(), current, key) for v in values.split(",")]
    return out


def _convert(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"--grid {key}: {text!r} is not true/false")
        return text.lower() == "true"
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float) or current is None:
        try:
            return float(text)
        except ValueError:
            if current is not None:
                raise ValueError(f"--grid {key}: {text!r} is not a number") from None
    return text


def plan_groups(base: ml_collections.ConfigDict, grid: dict[str, list[Any]], seeds: int
                ) -> list[tuple[dict[str, Any], list[Run]]]:
    """``[(program overrides, runs)]``: one group per combination of the grid's program
    settings; in each, every combination of its value settings x seeds."""
    program = {k: v for k, v in grid.items() if k not in SLOT_KEYS}
    values = {k: v for k, v in grid.items() if k in SLOT_KEYS}
    groups = []
    for combo in itertools.product(*program.values()):
        fixed = dict(zip(program, combo, strict=True))
        runs = [Run(tuple(fixed.items()) + tuple(zip(values, v, strict=True)),
                    base.seed + s)
                for v in itertools.product(*values.values()) for s in range(seeds)]
        groups.append((fixed, runs))
    return groups


def train_group(base: ml_collections.ConfigDict, workdir: str | Path, fixed: dict[str, Any],
                runs: Sequence[Run], log=print) -> dict[str, Any]:
    """Trains (or resumes) the runs of one group side by side, each into its own run
    directory; ``{"stopped": {"stopped_at": step, "preempted": bool, ...}}`` when
    ``config.stop_after`` or a preemption notice (SIGTERM) stopped it first."""
    directories = [RunDirectory(run_dir(workdir) / "runs" / run.name) for run in runs]
    if all(d.metrics() is not None for d in directories):
        log(f"group {fixed or '(one)'}: its {len(runs)} runs finished earlier")
        return {"steps": None}
    log(f"group {fixed or '(one)'}: {len(runs)} runs side by side")
    name = _slug(",".join(f"{k}={v}" for k, v in fixed.items()) or "base")
    keeper = Keeper(run_dir(workdir) / "groups" / name, directories,
                    group={"overrides": fixed, "runs": [run.name for run in runs]})
    keeper.prepare()
    clock = PhaseClock()
    setup = setup_run([run.config(base) for run in runs], log,
                      run_names=[run.label for run in runs], lap=clock.lap)
    best = fit(setup, keeper, log, clock)
    if best is None:
        return {"stopped": keeper.stopped}
    reports = final_report(setup, best, log)
    clock.lap("report")
    keeper.write_reports(setup, best, reports, {"steps": setup.num_steps,
                                                "resources": clock.resources()})
    keeper.close()
    return {"steps": setup.num_steps, "phase_seconds": dict(clock.seconds)}


def run_record(run: Run, config: ml_collections.ConfigDict, directory: RunDirectory
               ) -> dict[str, Any]:
    """One run's line of ``sweep.json``, read from its run directory's ``metrics.json``."""
    metrics = directory.metrics()
    kind = config.mask.eval_kind
    binary = "pruned" if kind == "threshold" else "pruned_threshold"
    soft = "pruned" if kind == "expectation" else "pruned_expectation"
    steps = [h["step"] for h in metrics["history"] if h.get("best")]
    return {
        "label": run.label, "overrides": dict(run.overrides), "seed": config.seed,
        "mode": config.mask.mode, "learning_rate": config.optim.learning_rate,
        "run_dir": str(Path("runs") / run.name),
        "selected_by": f"dev macro P@1, {kind}", "best_step": steps[-1] if steps else None,
        "dev_binary": metrics["dev"][binary]["macro_P@1"],
        "dev_soft": metrics["dev"][soft]["macro_P@1"],
        "test_binary": metrics["test"][binary]["macro_P@1"],
        "test_soft": metrics["test"][soft]["macro_P@1"],
        "test_full": metrics["test"]["full"]["macro_P@1"],
        "test_binary_summary": metrics["test"][binary],
        "sparsity": float(np.mean(metrics["sparsity"]["total"])),
        "steps": metrics["steps"],
    }


COLUMNS = (("dev_binary", "dev P@1 binary"), ("dev_soft", "dev P@1 soft"),
           ("test_binary", "test P@1 binary"), ("test_soft", "test P@1 soft"),
           ("sparsity", "sparsity"))


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
            values = np.array([r[key] for r in runs])
            row[key] = (float(values.mean()),
                        float(values.std(ddof=1)) if len(values) > 1 else float("nan"))
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], full: float) -> str:
    head = "| configuration | seeds | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    best = max(rows, key=lambda r: r["dev_binary"][0])["label"]
    for row in rows:
        cells = [f"{m:.3f} +- {s:.3f}" if np.isfinite(s) else f"{m:.3f} (one seed)"
                 for m, s in (row[k] for k, _ in COLUMNS)]
        label = f"**{row['label']}**" if row["label"] == best else row["label"]
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    lines.append(f"\nFull model (no masks), test macro P@1: {full:.3f}. Bold: the best dev "
                 "macro P@1 (binary), averaged over seeds.")
    runs = [(row["label"], seed, link) for row in rows
            for seed, link in zip(row["seeds"], row.get("run_dirs", ()), strict=False)]
    if runs:
        lines.append("\nRun directories (`lamp_jax.load_run`, `python -m lamp_jax.report "
                     "--workdir`, `python -m lamp_jax.evaluate --workdir`):\n")
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


def run_sweep(base: ml_collections.ConfigDict, grid: Sequence[str], seeds: int,
              workdir: str | Path, compare_sequential: bool = False, log=print
              ) -> dict[str, Any]:
    """Every grid configuration x seed, side by side per group; writes every run's directory,
    the table and the plot. Rerun after an interruption, it resumes where it stopped."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1")
    groups = plan_groups(base, parse_grid(base, grid), seeds)
    use_cpu_devices(base.cpu_devices)  # before JAX starts its backends
    log = main_log(log)
    workdir = run_dir(workdir)
    RunDirectory(workdir).ensure_writable()
    records, group_seconds, group_info = [], [], []
    for fixed, runs in groups:
        start = time.perf_counter()
        group_base = with_overrides(base, fixed)
        trained = train_group(group_base, workdir, fixed, runs, log)
        if "stopped" in trained:
            if not trained["stopped"]["preempted"]:
                log("stopped after config.stop_after steps; run the same command again to "
                    "resume")
            return {"stopped": True, "preempted": trained["stopped"]["preempted"]}
        group_seconds.append(time.perf_counter() - start)
        group_info.append(trained)
        records += [run_record(run, run.config(group_base),
                               RunDirectory(workdir / "runs" / run.name)) for run in runs]
    out: dict[str, Any] = {"grid": list(grid), "seeds": seeds, "runs": records,
                           "sweep_seconds": sum(group_seconds), "group_seconds": group_seconds,
                           "groups": group_info}
    if compare_sequential:
        out["sequential"] = sequential(base, groups, records, workdir, log)
        out["speedup"] = out["sequential"]["seconds"] / out["sweep_seconds"]
    rows = summarize(records)
    out["table"] = rows
    table = markdown_table(rows, records[0]["test_full"])
    write_text(workdir / "sweep.json", json.dumps(out, indent=1))
    write_text(workdir / "sweep.md", table + "\n")
    if is_main():
        plot(rows, records[0]["test_full"], workdir / "sweep.png")
    log(table)
    log(f"sweep: {len(records)} runs in {out['sweep_seconds']:.1f} s")
    if compare_sequential:
        seq = out["sequential"]
        log(f"one after another (train.py's function): {seq['seconds']:.1f} s; the sweep is "
            f"{out['speedup']:.2f}x faster; {seq['identical_runs']} of {len(records)} runs gave "
            f"identical masks.npz and metrics, the largest metric difference was "
            f"{seq['max_difference']:.2g}")
    log(f"written: {workdir / 'sweep.md'}, {workdir / 'sweep.json'}, {workdir / 'sweep.png'}, "
        f"and a run directory per run under {workdir / 'runs'}")
    return out


def sequential(base: ml_collections.ConfigDict, groups, records, workdir: Path,
               log=print) -> dict[str, Any]:
    """The same runs, one after another, each as train.py runs it (same configuration), into
    ``workdir/sequential/<run>``; compared with the sweep's run directories byte for byte
    (``masks.npz``) and metric by metric."""
    from lamp_jax.loop import train_and_evaluate

    start, differences, identical = time.perf_counter(), [], 0
    pairs = [(with_overrides(base, fixed), run) for fixed, runs in groups for run in runs]
    for i, ((group_base, run), record) in enumerate(zip(pairs, records, strict=True)):
        alone = workdir / "sequential" / run.name
        summary = train_and_evaluate(run.config(group_base), alone, log=lambda *_: None)
        swept = RunDirectory(workdir / "runs" / run.name).metrics()
        difference = max(_max_difference(swept[key], summary[key])
                         for key in ("test", "dev", "sparsity"))
        difference = max(difference, abs(swept["best_dev_macro_P1"]
                                         - summary["best_dev_macro_P1"]))
        same_masks = ((workdir / "runs" / run.name / "masks.npz").read_bytes()
                      == (alone / "masks.npz").read_bytes())
        identical += same_masks and difference == 0
        differences.append(difference)
        log(f"one by one {i + 1}/{len(pairs)}: {run.label}, seed {run.seed}: test binary "
            f"{record['test_binary']:.3f}; masks.npz {'identical' if same_masks else 'differ'}")
    return {"seconds": time.perf_counter() - start, "max_difference": max(differences),
            "differences": differences, "identical_runs": identical}


def _max_difference(a: Any, b: Any) -> float:
    """The largest absolute difference between the numbers of two equal-shaped trees."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return float("inf")
        return max((_max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max((_max_difference(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, int | float) and isinstance(b, int | float):
        both_nan = a != a and b != b
        return 0.0 if both_nan or a == b else abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def _slug(text: str) -> str:
    """A directory name for a label: characters other than letters, digits and ``.,=+-``
    become ``_``."""
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", text)


def main(argv: list[str] | None = None) -> None:
    import sys

    from absl import app, flags, logging
    from ml_collections import config_flags

    from lamp_jax.cli import CONFIG_DIR, resolve_config_argument

    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "default.py"),
                                    "Base configuration: a file, or a packaged config's name.")
    flags.DEFINE_multi_string("grid", [], "key=v1,v2,...: values of one config field "
                              "(repeat for more fields; the sweep takes every combination)")
    flags.DEFINE_integer("seeds", 3, "seeds per configuration: config.seed, +1, ...")
    flags.DEFINE_string("workdir", "runs/sweep", "where sweep.json, sweep.md, sweep.png go")
    flags.DEFINE_bool("compare_sequential", False, "also run every configuration one after "
                      "another as train.py does, and report the wall-time ratio")

    def run(_):
        from lamp_jax import hosts

        logging.set_verbosity(logging.WARNING)
        hosts.initialize_if_requested()  # started by lamp_jax.launch: every process takes part
        f = flags.FLAGS
        with hosts.stop_with_peers():
            out = run_sweep(f.config, f.grid, f.seeds, f.workdir, f.compare_sequential)
        if out.get("preempted"):  # every process: the group's state is saved
            sys.exit(hosts.PREEMPTED_EXIT)

    argv = sys.argv if argv is None else argv
    app.run(run, argv=resolve_config_argument(list(argv)))


if __name__ == "__main__":
    main()
