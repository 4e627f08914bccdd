"""Hyperparameter sweeps as one program: every (configuration, seed) run shares the frozen model
and trains on the relation axis beside the others, in one jitted step.

    python -m lamp_jax.sweep --grid mask.mode=stochastic,deterministic \\
        --grid optim.learning_rate=0.01,0.1,0.3 --seeds 3 --workdir runs/sweep
    python -m lamp_jax.sweep --config=configs/default.py --config.epochs=10 \\
        --grid optim.learning_rate=0.03,0.1 --seeds 2 --compare_sequential

The step already vmaps over relations, each with its own Adam state and schedule
(:mod:`lamp_jax.training`). A sweep widens that axis to (configuration, seed, relation) slots:
each run gets its own learning rate, mask init and seed (mask init, concrete noise and batch
order), and draws exactly the noise and batches it would draw alone. A run of the sweep
therefore computes what ``train.py`` with the same settings computes, up to rounding: XLA's
kernels over a wider relation axis may round the last bits differently, which a large learning
rate with hard thresholds can turn into different masks (the README's 24-run comparison: 18
identical, 6 at learning rate 1.0 within 0.033 P@1). Settings that change the program (the
mask mode, temperature, epochs, the model, ...) run as separate groups, one after another.

Each run keeps its own best-dev masks (selected as ``train.py`` selects: dev macro P@1 of
``mask.eval_kind``), then its test metrics are taken with binary and soft masks. Written to
``--workdir``: ``sweep.json`` (every run), ``sweep.md`` (mean +- std over seeds per
configuration), ``sweep.png``. ``--compare_sequential`` also runs every (configuration, seed)
with train.py's own function, one after another, and reports the wall-time ratio and the
largest difference between the two sets of results.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lamp_jax import evaluation
from lamp_jax.config_checks import validate_config
from lamp_jax.data import RelationBatcher
from lamp_jax.masks import init_mask_logits, sparsity_stats
from lamp_jax.parallel import (
    RELATION,
    pad_relations,
    put_global,
    relation_sharding,
    relation_slots,
    replicate,
    run_mesh,
    shard_batch,
    use_cpu_devices,
)
from lamp_jax.training import (
    init_placed_state,
    jit_train_step,
    make_optimizer,
    state_nbytes,
    state_shardings,
)

# Settings that only change values, not the program: they vary per run inside one group.
SLOT_KEYS = ("seed", "optim.learning_rate", "mask.init", "mask.init_value", "mask.init_std",
             "mask.init_low", "mask.init_high", "mask.init_sparsity")


@dataclasses.dataclass(frozen=True)
class Run:
    """One (configuration, seed) of a sweep: ``overrides`` are the grid's values for it."""

    overrides: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides) or "base config"

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        return with_overrides(base, dict(self.overrides, seed=self.seed))


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


def train_group(base: ml_collections.ConfigDict, runs: Sequence[Run], log=print
                ) -> list[dict[str, Any]]:
    """Trains every run of one group side by side; returns one record per run."""
    from lamp_jax import trainer  # the run's pieces, shared with train.py

    configs = [run.config(base) for run in runs]
    for config in configs:
        validate_config(config)
    config = configs[0]
    use_cpu_devices(config.cpu_devices)
    _, _, mlm, relations, data, _ = trainer.load_model_and_data(config, log)
    num_runs, num_relations = len(runs), len(relations)
    spec, mode, _ = trainer.mask_settings(config, mlm)

    mesh = run_mesh(num_runs * num_relations, config.batch_size,
                    config.relation_parallelism or None)
    slots = relation_slots(num_runs * num_relations, mesh)
    frozen = replicate(mlm.params, mesh)
    start_layer = min(spec.layers) if config.cache_frozen_prefix else 0
    features = {name: trainer.frozen_prefix(mlm.config, frozen, d, start_layer,
                                            trainer.DTYPES[config.dtype], mesh)
                for name, d in data.items()}
    batchers = {c.seed: RelationBatcher(data["train"], c.batch_size, c.seed, c.batching,
                                        c.epochs, row_features=features["train"])
                for c in configs}
    train = batchers[config.seed]

    # Each run's masks and noise come from its own seed, exactly as train.py draws them.
    keys = [jax.random.key(c.seed) for c in configs]
    logits = [init_mask_logits(spec, mlm.params, num_relations,
                               trainer.mask_settings(c, mlm)[2], mode, k)
              for c, k in zip(configs, keys, strict=True)]
    optim = trainer.optim_settings(config)
    warned = set()
    for run, c, run_logits in zip(runs, configs, logits, strict=True):
        warning = trainer.threshold_warning(
            run_logits, num_relations, max(train.steps_per_relation),
            dataclasses.replace(optim, learning_rate=c.optim.learning_rate), mode.threshold)
        if warning and run.label not in warned:  # once per configuration, not per seed
            warned.add(run.label)
            log(f"warning ({run.label}): {warning}")
    logits = pad_relations(jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                        *logits), slots)
    per_slot = lambda values: pad_relations(np.repeat(np.asarray(values), num_relations),  # noqa: E731
                                            slots)
    state = init_placed_state(
        logits, make_optimizer(optim),
        pad_relations(np.tile(np.asarray(train.steps_per_relation), num_runs), slots),
        jnp.stack([jax.random.fold_in(k, 1) for k in keys]), mesh,
        learning_rate=per_slot([c.optim.learning_rate for c in configs]).astype(np.float32))
    del logits
    state_bytes = state_nbytes(state)
    chunk = trainer.relation_chunk_for(
        config, mlm.config, num_runs * num_relations, mesh, data["train"].input_ids.shape[1],
        trainer.mask_params_per_relation(state.mask_logits), state_bytes, log)
    loss = trainer.loss_settings(config, mode, start_layer)
    step_fn = jit_train_step(
        model_config=mlm.config, loss_config=loss, optim_config=optim, relation_chunk=chunk,
        state_sharding=state_shardings(state, mesh), relations_per_run=num_relations,
        donate=trainer.donates_state(state_bytes))
    shards = mesh.shape[RELATION]
    rank_fns = {kind: evaluation.make_rank_fn(mlm.config, mode.for_inference(kind),
                                              relation_chunk=chunk, dtype=loss.compute_dtype,
                                              start_layer=start_layer, relation_shards=shards)
                for kind in ("threshold", "expectation")}
    put = lambda b: shard_batch(b, mesh, slots)  # noqa: E731
    # Every run meets the same evaluation prompts: the batches repeat along the relation axis.
    eval_sets = {name: [{k: np.concatenate([v] * num_runs) for k, v in b.items()}
                        for b in batches]
                 for name, batches in trainer.evaluation_batches(config, data, features).items()}

    def scores(mask_logits, split: str, kind: str) -> list[evaluation.RankingResult]:
        result = evaluation.evaluate(rank_fns[kind], mask_logits, frozen, eval_sets[split],
                                     relations * num_runs, put_batch=put)
        return [_rows(result, v * num_relations, relations) for v in range(num_runs)]

    take = jax.jit(lambda best, now, better: jax.tree.map(
        lambda b, n: jnp.where(better.reshape(-1, *[1] * (n.ndim - 1)), n, b), best, now),
        donate_argnums=0)
    eval_every = config.eval_every or max(1, train.num_steps // config.epochs)
    best, best_score = None, np.full(num_runs, -np.inf)
    best_step = np.zeros(num_runs, int)
    start = time.perf_counter()
    for step in tqdm(range(train.num_steps), desc=f"sweep: {num_runs} runs", unit="step"):
        by_seed = {seed: b.batch_at(step) for seed, b in batchers.items()}  # once per seed
        batch = {k: np.concatenate([by_seed[c.seed][k] for c in configs])
                 for k in by_seed[config.seed] if k != "index"}
        state, _ = step_fn(state, frozen, put(batch))
        done = step + 1
        if done % eval_every == 0 or done == train.num_steps:
            dev = np.array([r.macro(1) for r in scores(state.mask_logits, "dev",
                                                       config.mask.eval_kind)])
            better = dev > best_score  # strictly, as train.py's best checkpoint
            best_score = np.where(better, dev, best_score)
            best_step = np.where(better, done, best_step)
            better_slots = put_global(per_slot(better).astype(bool), relation_sharding(mesh))
            best = (jax.tree.map(jnp.copy, state.mask_logits) if best is None
                    else take(best, state.mask_logits, better_slots))
    del state
    train_seconds = time.perf_counter() - start

    result_sets = {(split, kind): scores(best, split, kind)
                   for split in ("dev", "test") for kind in ("threshold", "expectation")}
    full = scores(None, "test", "threshold")[0]
    total = sparsity_stats(best, spec, mode.threshold)["total"]
    records = []
    for v, (run, c) in enumerate(zip(runs, configs, strict=True)):
        get = lambda split, kind: result_sets[(split, kind)][v].macro(1)  # noqa: B023, E731
        records.append({
            "label": run.label, "overrides": dict(run.overrides), "seed": c.seed,
            "mode": c.mask.mode, "learning_rate": c.optim.learning_rate,
            "selected_by": f"dev macro P@1, {c.mask.eval_kind}", "best_step": int(best_step[v]),
            "dev_binary": get("dev", "threshold"), "dev_soft": get("dev", "expectation"),
            "test_binary": get("test", "threshold"), "test_soft": get("test", "expectation"),
            "test_full": full.macro(1),
            "test_binary_summary": result_sets[("test", "threshold")][v].summary(),
            "sparsity": float(np.mean(total[v * num_relations:(v + 1) * num_relations])),
            "steps": train.num_steps,
        })
    log(f"group of {num_runs} runs: {train.num_steps} steps in {train_seconds:.1f} s")
    return records


def _rows(result: evaluation.RankingResult, first: int, relations: Sequence[str]
          ) -> evaluation.RankingResult:
    rows = slice(first, first + len(relations))
    return evaluation.RankingResult(tuple(relations), result.ks, result.hits[rows],
                                    result.reciprocal_rank_sum[rows], result.count[rows])


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
        row = {"label": label, "seeds": [r["seed"] for r in runs]}
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
    """Every grid configuration x seed, vectorized per group; writes the table and plot."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: at least 1")
    groups = plan_groups(base, parse_grid(base, grid), seeds)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records, group_seconds = [], []
    for fixed, runs in groups:
        log(f"group {fixed or '(one)'}: {len(runs)} runs side by side")
        start = time.perf_counter()
        records += train_group(with_overrides(base, fixed), runs, log)
        group_seconds.append(time.perf_counter() - start)
    out: dict[str, Any] = {"grid": list(grid), "seeds": seeds, "runs": records,
                           "sweep_seconds": sum(group_seconds), "group_seconds": group_seconds}
    if compare_sequential:
        out["sequential"] = sequential(base, [r for _, rs in groups for r in rs], records,
                                       workdir / "sequential", log)
        out["speedup"] = out["sequential"]["seconds"] / out["sweep_seconds"]
    rows = summarize(records)
    out["table"] = rows
    table = markdown_table(rows, records[0]["test_full"])
    (workdir / "sweep.json").write_text(json.dumps(out, indent=1))
    (workdir / "sweep.md").write_text(table + "\n")
    plot(rows, records[0]["test_full"], workdir / "sweep.png")
    log(table)
    log(f"sweep: {len(records)} runs in {out['sweep_seconds']:.1f} s")
    if compare_sequential:
        seq = out["sequential"]
        log(f"one after another (train.py's function): {seq['seconds']:.1f} s; the sweep is "
            f"{out['speedup']:.2f}x faster; {seq['identical_runs']} of {len(records)} runs gave "
            f"identical dev/test P@1 and sparsity, the largest difference was "
            f"{seq['max_difference']:.2g}")
    log(f"written: {workdir / 'sweep.md'}, {workdir / 'sweep.json'}, {workdir / 'sweep.png'}")
    return out


def sequential(base: ml_collections.ConfigDict, runs: Sequence[Run], records, workdir: Path,
               log=print) -> dict[str, Any]:
    """The same runs, one after another, each as train.py runs it (without plots and the
    specialization matrix, which the sweep does not compute either)."""
    from lamp_jax.trainer import train_and_evaluate

    start, differences = time.perf_counter(), []
    for i, (run, record) in enumerate(zip(runs, records, strict=True)):
        config = with_overrides(run.config(base), {"plots": False, "specialization": False})
        summary = train_and_evaluate(config, workdir / f"run_{i}", log=lambda *_: None)
        # train.py reports its eval_kind as "pruned" and the other kind as "pruned_<kind>".
        test = dict(summary["test"])
        test[f"pruned_{config.mask.eval_kind}"] = test["pruned"]
        binary = test["pruned_threshold"]["macro_P@1"]
        soft = test["pruned_expectation"]["macro_P@1"]
        selected = "dev_binary" if config.mask.eval_kind == "threshold" else "dev_soft"
        sparsity = float(np.mean(summary["sparsity"]["total"]))
        differences.append(max(abs(binary - record["test_binary"]),
                               abs(soft - record["test_soft"]),
                               abs(summary["best_dev_macro_P1"] - record[selected]),
                               abs(sparsity - record["sparsity"])))
        log(f"one by one {i + 1}/{len(runs)}: {run.label}, seed {run.seed}: test binary "
            f"{binary:.3f} (sweep {record['test_binary']:.3f})")
    return {"seconds": time.perf_counter() - start, "max_difference": max(differences),
            "differences": differences,
            "identical_runs": sum(d == 0 for d in differences)}


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
        logging.set_verbosity(logging.WARNING)
        f = flags.FLAGS
        run_sweep(f.config, f.grid, f.seeds, f.workdir, f.compare_sequential)

    argv = sys.argv if argv is None else argv
    app.run(run, argv=resolve_config_argument(list(argv)))


if __name__ == "__main__":
    main()
