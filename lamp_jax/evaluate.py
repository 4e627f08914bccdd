"""Re-evaluates a saved run: ``python -m lamp_jax.evaluate --workdir DIR [--split test]``.

Rebuilds the data split exactly as training did (from ``DIR/run.json``), restores the best masks
onto this process's devices (whatever devices or processes trained them) and prints/writes the
full-vs-pruned metrics, the specialization matrix and the plots. Under
``python -m lamp_jax.launch`` it runs as one job over all the processes. ``DIR`` may be a URL
(``gs://bucket/runs/x``, :mod:`lamp_jax.paths`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections

from lamp_jax.checkpoint import restore_best_masks
from lamp_jax.data import RelationBatcher
from lamp_jax.hosts import (
    initialize_if_requested,
    is_main,
    main_log,
    stop_with_peers,
    write_text,
)
from lamp_jax.masks import MaskMode, MaskSpec
from lamp_jax.models.params import load_mlm
from lamp_jax.parallel import (
    pad_relations,
    relation_slots,
    replicate,
    run_mesh,
    shard_relations,
    use_cpu_devices,
)
from lamp_jax.paths import as_path
from lamp_jax.trainer import DTYPES, final_report, prepare_data


def reevaluate(workdir: str | os.PathLike, split: str = "test", model: str | None = None,
               log=print) -> dict[str, Any]:
    """Metrics of the run in ``workdir`` on ``split``; also written to ``DIR/eval_<split>.json``."""
    workdir, log = as_path(workdir), main_log(log)
    run = json.loads((workdir / "run.json").read_text())
    config = ml_collections.ConfigDict(run["config"])
    mlm = load_mlm(model or run["model"], dtype=DTYPES[run["dtype"]])
    relations, data, _ = prepare_data(config, mlm.tokenizer, Path(run["data"]), log)
    if list(relations) != run["relations"]:
        raise ValueError(f"the data now yields relations {relations}, the run has "
                         f"{run['relations']}")
    mask = run["mask"]
    spec = MaskSpec(tuple(mask["layers"]), tuple(mask["matrices"]))
    mode = MaskMode(mask["mode"], mask["tau"], mask["threshold"], mask["ste_grad"])
    mesh = run_mesh(len(relations), config.batch_size, config.relation_parallelism or None)
    best = restore_best_masks(workdir, len(relations))
    best = shard_relations(pad_relations(best, relation_slots(len(relations), mesh)), mesh)
    eval_sets = {"test": list(RelationBatcher(data[split], config.batch_size).eval_batches())}
    summary = final_report(config, workdir, mlm.config, best, replicate(mlm.params, mesh),
                           eval_sets, relations, spec, mode, mesh, log,
                           labels=data[split].relation_labels)
    write_text(workdir / f"eval_{split}.json", json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    parser.add_argument("--model", default=None, help="load the frozen model from here instead")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU only: JAX devices to split the host into (0 = one per core)")
    args = parser.parse_args(argv)
    initialize_if_requested()  # started by lamp_jax.launch: every process takes part
    use_cpu_devices(args.cpu_devices)
    with stop_with_peers():
        reevaluate(args.workdir, args.split, args.model)
    if is_main():
        print(f"devices: {jax.device_count()} in {jax.process_count()} process(es); wrote "
              f"{as_path(args.workdir) / f'eval_{args.split}.json'}")


if __name__ == "__main__":
    main()
