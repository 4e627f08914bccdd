"""Re-evaluates a saved run: ``python -m lamp_jax.evaluate --workdir DIR [--split test]``.

Rebuilds the data split exactly as training did (from ``DIR/run.json``), restores the best masks
onto this process's devices (whatever devices or processes trained them) and prints and writes
(``DIR/eval_<split>.json``) the full-vs-pruned metrics on that split, with both inference kinds,
and the specialization matrix. Under ``python -m lamp_jax.launch`` it runs as one job over all
the processes. ``DIR`` may be a URL (``gs://bucket/runs/x``, :mod:`lamp_jax.paths`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import jax

from lamp_jax.hosts import initialize_if_requested, is_main, main_log, stop_with_peers
from lamp_jax.paths import as_path
from lamp_jax.placement import use_cpu_devices
from lamp_jax.results import final_report, log_report
from lamp_jax.run_dir import RunDirectory
from lamp_jax.setup import setup_evaluation


def reevaluate(workdir: str | os.PathLike, split: str = "test", model: str | None = None,
               log=print) -> dict[str, Any]:
    """Metrics of the run in ``workdir`` on ``split``; also written to ``DIR/eval_<split>.json``
    (keyed by the split: ``--split dev`` reports dev as dev)."""
    log = main_log(log)
    directory = RunDirectory(workdir)
    manifest = directory.manifest()
    setup = setup_evaluation(manifest.config, log, splits=(split,),
                             sources=(model or manifest.model, Path(manifest.data)))
    if setup.relations != manifest.relations:
        raise ValueError(f"the data now yields relations {list(setup.relations)}, the run has "
                         f"{list(manifest.relations)}")
    report = final_report(setup, directory.best_masks(setup.mask_layout), split)
    log_report(report, split, manifest.config.seed, log)
    directory.write_metrics(report.summary, f"eval_{split}.json")
    if report.prompt_ranks is not None:
        directory.write_prompt_ranks(report.prompt_ranks, split)
    return report.summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a run directory written by train.py")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"))
    parser.add_argument("--model", default=None, help="load the frozen model from here instead")
    parser.add_argument("--cpu-devices", type=int, default=0,
                        help="CPU only: JAX devices to split the host into (0 = one per core)")
    args = parser.parse_args(argv)
    initialize_if_requested()  # started by lamp_jax.launch: every process takes part
    use_cpu_devices(args.cpu_devices)  # first: the setup's own call is then a no-op
    with stop_with_peers():
        reevaluate(args.workdir, args.split, args.model)
    if is_main():
        print(f"devices: {jax.device_count()} in {jax.process_count()} process(es); wrote "
              f"{as_path(args.workdir) / f'eval_{args.split}.json'}")


if __name__ == "__main__":
    main()
