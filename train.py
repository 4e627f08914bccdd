"""Learn relation-specific subnetworks (LAMP) for every relation at once.

    python train.py                                        # embedded toy world, CPU, minutes
    python train.py --config=configs/bert_base_conceptnet.py --workdir=runs/bert
    python train.py --config=configs/default.py --config.epochs=2 --config.mask.mode=deterministic

The same as the installed ``lamp-jax-train`` (flags and the multi-process options:
:mod:`lamp_jax.cli`); the run itself is :func:`lamp_jax.trainer.train_and_evaluate`.
"""

from lamp_jax.cli import train

if __name__ == "__main__":
    train()
