"""Learn relation-specific subnetworks (LAMP) for every relation at once: ``lamp-jax train``.

    python train.py                                        # embedded toy world, CPU, seconds
    python train.py --config=configs/bert_base_conceptnet.py --workdir=runs/bert
    python train.py --config=configs/default.py --config.epochs=2 --config.mask.mode=deterministic

The same as ``lamp-jax train`` and ``lamp-jax-train`` (flags: ``python train.py --help``;
every config field: ``--help-config``); the run itself is
:func:`lamp_jax.loop.train_and_evaluate`.
"""

import sys

from lamp_jax.cli import train

if __name__ == "__main__":
    sys.exit(train())
