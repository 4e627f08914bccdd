"""Command-line entry points, installed by pip as ``lamp-jax-train``, ``lamp-jax-evaluate`` and
``lamp-jax-report`` (``python train.py`` in a checkout is ``lamp-jax-train``).

    lamp-jax-train                                         # the embedded default
    lamp-jax-train --config=bert_base_conceptnet --workdir=runs/bert_base
    lamp-jax-train --config=my_configs/sweep.py --config.epochs=2
    lamp-jax-train --workdir=gs://my-bucket/runs/default   # any run directory may be a URL

``--config`` takes a config file's path or the name of a packaged one (``lamp_jax/configs``:
default, runlocal, bert_base_conceptnet, roberta_base_conceptnet, distilbert_conceptnet,
modernbert_conceptnet).

Several processes (a pod, or one machine): run the same command in every process with
``--distributed``. The coordinator is auto-detected where JAX can (TPU, SLURM, Open MPI, ...);
elsewhere pass ``--coordinator_address``/``--num_processes``/``--process_id`` (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
``python -m lamp_jax.launch --processes 2 -- lamp-jax-train`` does that for N local processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with ``--config NAME`` / ``--config=NAME`` turned into the packaged config's
    path when NAME is not a file (``:arg`` suffixes of ml_collections are kept)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            out += [arg, _config_path(argv[i + 1])]
            i += 2
            continue
        if arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={_config_path(value)}"
        out.append(arg)
        i += 1
    return out


def _config_path(value: str) -> str:
    path, sep, suffix = value.partition(":")
    if Path(path).is_file():
        return value
    name = path.removesuffix(".py")
    packaged = CONFIG_DIR / f"{Path(name).name}.py"
    if packaged.is_file() and (not Path(path).parent.parts or path.startswith("configs/")):
        return str(packaged) + sep + suffix
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")
    raise SystemExit(f"--config {value!r}: no such file, and not a packaged config "
                     f"(packaged: {', '.join(known)})")


def _train_main(argv):
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from lamp_jax import hosts

    f = flags.FLAGS
    hosts.initialize_if_requested(f.distributed, f.coordinator_address, f.num_processes,
                                  f.process_id)
    from lamp_jax.loop import train_and_evaluate

    with hosts.stop_with_peers():
        summary = train_and_evaluate(f.config, f.workdir)
    if summary.get("preempted"):  # every process: the state is saved, a rerun resumes
        sys.exit(hosts.PREEMPTED_EXIT)
    if not hosts.is_main():
        return
    if "stopped_at" in summary:
        print(f"stopped after {summary['stopped_at']} steps; run the same command again to "
              "resume")
        return
    print(f"done: test macro P@1 full {summary['test']['full']['macro_P@1']:.3f} -> "
          f"pruned {summary['test']['pruned']['macro_P@1']:.3f}; outputs in {f.workdir}")


def train(argv: list[str] | None = None) -> None:
    """``lamp-jax-train`` / ``python train.py``: learn every relation's mask, then report."""
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", str(CONFIG_DIR / "default.py"),
                                    "Run configuration: a file, or a packaged config's name.")
    flags.DEFINE_string("workdir", "runs/default",
                        "Checkpoints, metrics and plots go here: a local path or a gs:// or "
                        "s3:// URL (lamp_jax.paths).")
    flags.DEFINE_bool("distributed", False,
                      "Join the other processes of the run (jax.distributed.initialize) "
                      "first; implied when JAX_PROCESS_ID is set, as lamp_jax.launch does.")
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 (default: auto-detect / environment)")
    flags.DEFINE_integer("num_processes", None, "processes in the run")
    flags.DEFINE_integer("process_id", None, "this process's index, 0-based")
    argv = sys.argv if argv is None else argv
    app.run(_train_main, argv=resolve_config_argument(list(argv)))


def evaluate() -> None:
    """``lamp-jax-evaluate``: :func:`lamp_jax.evaluate.main`."""
    from lamp_jax.evaluate import main

    main()


def report() -> None:
    """``lamp-jax-report``: :func:`lamp_jax.report.main`."""
    from lamp_jax.report import main

    main()
