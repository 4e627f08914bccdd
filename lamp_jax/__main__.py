"""``python -m lamp_jax COMMAND ...``: the ``lamp-jax`` command (:mod:`lamp_jax.cli`)."""

import sys

from lamp_jax.cli import main

sys.exit(main())
