"""Opens runs the way a user would, on whatever devices/processes this process was started with.

    python tests/topology_probe.py OUT.json NAME=WORKDIR [NAME=WORKDIR ...]

For each (interrupted) run: ``load_run`` + ``predict``, ``lamp_jax.evaluate``, the report, and
finally resuming the training to its end. Writes what each step produced (or the error) to
OUT.json on process 0. Used by tests/test_topology.py under 1, 2 and 8 devices and 2 processes.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import ml_collections


def probe(workdir: Path) -> dict:
    from lamp_jax import load_run
    from lamp_jax.evaluate import reevaluate
    from lamp_jax.report import write_report
    from lamp_jax.trainer import train_and_evaluate

    quiet = lambda *args, **kwargs: None  # noqa: E731
    result: dict = {}
    for step, action in (
        ("load_run", lambda: load_run(workdir).predict(
            "the boat is a kind of [MASK] .", relation="IsA", k=3)),
        ("evaluate", lambda: reevaluate(workdir, log=quiet)["test"]["pruned"]["macro_P@1"]),
        ("report", lambda: str(write_report(workdir, max_size=1, log=quiet) / "index.md")),
        ("resume", lambda: _resume(workdir, train_and_evaluate, quiet)),
    ):
        start = time.perf_counter()
        try:
            result[step] = {"ok": True, "value": action(),
                            "seconds": round(time.perf_counter() - start, 2)}
        except Exception as err:  # reported per cell, so one failure does not hide the others
            result[step] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
    return result


def _resume(workdir: Path, train_and_evaluate, log) -> dict:
    config = ml_collections.ConfigDict(json.loads((workdir / "run.json").read_text())["config"])
    config.stop_after = 0  # the same command without the interruption
    summary = train_and_evaluate(config, workdir, log=log)
    return {"test_macro_P@1": summary["test"]["pruned"]["macro_P@1"], "steps": summary["steps"]}


def main(argv: list[str]) -> None:
    from lamp_jax import hosts

    hosts.initialize_if_requested()  # started by lamp_jax.launch
    import jax

    out, runs = Path(argv[0]), dict(arg.split("=", 1) for arg in argv[1:])
    results = {"devices": jax.device_count(), "processes": jax.process_count(),
               "runs": {name: probe(Path(workdir)) for name, workdir in runs.items()}}
    hosts.write_text(out, json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
