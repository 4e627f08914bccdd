"""Learn relation-specific subnetworks (LAMP) for every relation at once.

    python train.py                                        # embedded toy world, CPU, minutes
    python train.py --config=configs/bert_base_conceptnet.py --workdir=runs/bert
    python train.py --config=configs/default.py --config.epochs=2 --config.mask.mode=deterministic

Multi-host TPU pods: run the same command on every host with --distributed.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Run configuration.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and plots go here.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    import jax

    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    from lamp_jax.trainer import train_and_evaluate

    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    print(f"done: test macro P@1 full {summary['test']['full']['macro_P@1']:.3f} -> "
          f"pruned {summary['test']['pruned']['macro_P@1']:.3f}; outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
