"""Re-evaluates a saved run: ``lamp-jax evaluate --workdir DIR [--split test]``.

Rebuilds the data split exactly as training did (from ``DIR/run.json``), restores the best masks
onto this process's devices (whatever devices or processes trained them) and prints and writes
(``DIR/eval_<split>.json``) the full-vs-pruned metrics on that split, with both inference kinds,
and the specialization matrix. Under ``lamp-jax launch`` it runs as one job over all
the processes. ``DIR`` may be a URL (``gs://bucket/runs/x``, :mod:`lamp_jax.paths`).
``python -m lamp_jax.evaluate`` is ``lamp-jax evaluate`` (:mod:`lamp_jax.cli`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lamp_jax.errors import UsageError
from lamp_jax.hosts import main_log
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
        raise UsageError(f"the data now yields relations {list(setup.relations)}, the run has "
                         f"{list(manifest.relations)} ({manifest.data})")
    report = final_report(setup, directory.best_masks(setup.mask_layout), split)
    log_report(report, split, manifest.config.seed, log)
    directory.write_metrics(report.summary, f"eval_{split}.json")
    if report.prompt_ranks is not None:
        directory.write_prompt_ranks(report.prompt_ranks, split)
    return report.summary


if __name__ == "__main__":
    import sys

    from lamp_jax.cli import evaluate

    sys.exit(evaluate())
