"""Opens runs the way a user would, on whatever devices/processes this process was started with.

    python tests/topology_probe.py OUT.json REPORT_NAME NAME=WORKDIR [NAME=WORKDIR ...]

For each (interrupted) run: ``load_run`` + ``predict`` (with the IsA subnetwork and with the full
model), ``lamp_jax.evaluate``, and finally resuming the training to its end; the report for the
run named REPORT_NAME only (one report per opener). Writes what each step produced (or the
error) to OUT.json on process 0. Used by tests/test_topology.py under 1, 2 and 8 devices and 2
processes.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path

import ml_collections

PROMPT = "the boat is a kind of [MASK] ."


def probe(workdir: Path, report: bool) -> dict:
    from lamp_jax import load_run
    from lamp_jax.evaluate import reevaluate
    from lamp_jax.loop import train_and_evaluate
    from lamp_jax.report import write_report

    quiet = lambda *args, **kwargs: None  # noqa: E731
    steps = [
        ("load_run", lambda: _predictions(load_run(workdir))),
        ("evaluate", lambda: reevaluate(workdir, log=quiet)["test"]),
    ]
    if report:
        steps.append(("report", lambda: _report(write_report(workdir, max_size=1, log=quiet))))
    steps.append(("resume", lambda: _resume(workdir, train_and_evaluate)))
    result: dict = {}
    for step, action in steps:
        start = time.perf_counter()
        try:
            result[step] = {"ok": True, "value": action(),
                            "seconds": round(time.perf_counter() - start, 2)}
        except Exception as err:  # reported per cell, so one failure does not hide the others
            result[step] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                            "traceback": traceback.format_exc()[-3000:]}
    return result


def _predictions(run) -> dict:
    return {"IsA": run.predict(PROMPT, relation="IsA", k=3), "full": run.predict(PROMPT, k=3),
            "sparsity": run.sparsity()["total"].tolist()}


def _report(out: Path) -> dict:
    return {name: json.loads((out / f"{name}.json").read_text())
            for name in ("specialization", "combination")}


def _resume(workdir: Path, train_and_evaluate) -> dict:
    config = ml_collections.ConfigDict(json.loads((workdir / "run.json").read_text())["config"])
    config.stop_after = 0  # the same command without the interruption
    said: list[str] = []
    summary = train_and_evaluate(config, workdir, log=said.append)
    slots = [int(m.group(1)) for line in said if (m := re.search(r"relation slots (\d+)", line))]
    return {"test": summary["test"], "steps": summary["steps"],
            "resumed_from": summary["resumed_from"], "slots": slots,
            "said_resumed": [line for line in said if line.startswith("resumed from step")]}


def main(argv: list[str]) -> None:
    from lamp_jax import hosts

    hosts.initialize_if_requested()  # started by lamp_jax.launch
    import jax

    out, report_name = Path(argv[0]), argv[1]
    runs = dict(arg.split("=", 1) for arg in argv[2:])
    results = {"devices": jax.device_count(), "processes": jax.process_count(),
               "runs": {name: probe(Path(workdir), name == report_name)
                        for name, workdir in runs.items()}}
    hosts.write_text(out, json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
