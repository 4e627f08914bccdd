"""Learn relation-specific subnetworks (LAMP) for every relation at once.

    python train.py                                        # embedded toy world, CPU, minutes
    python train.py --config=configs/bert_base_conceptnet.py --workdir=runs/bert
    python train.py --config=configs/default.py --config.epochs=2 --config.mask.mode=deterministic

Several processes (a pod, or one machine): run the same command in every process with
--distributed. The coordinator is auto-detected where JAX can (TPU, SLURM, Open MPI, ...);
elsewhere pass --coordinator_address/--num_processes/--process_id (or set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID). `python -m lamp_jax.launch --processes 2 -- python train.py`
does that for N local processes.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and plots go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Join the other processes of the run (jax.distributed.initialize) "
    "first; implied when JAX_PROCESS_ID is set, as lamp_jax.launch does.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (default: auto-detect / environment)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the run")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0-based")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from lamp_jax import hosts

    if hosts.distributed_requested(_DISTRIBUTED.value):
        hosts.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    from lamp_jax.trainer import train_and_evaluate

    with hosts.stop_with_peers():
        summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if not hosts.is_main():
        return
    if "stopped_at" in summary:
        print(f"stopped after {summary['stopped_at']} steps; run the same command again to "
              "resume")
        return
    print(f"done: test macro P@1 full {summary['test']['full']['macro_P@1']:.3f} -> "
          f"pruned {summary['test']['pruned']['macro_P@1']:.3f}; outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
