"""``python -m lamp_jax.sweep``: ``lamp-jax sweep`` (:mod:`lamp_jax.cli`)."""

import sys

from lamp_jax.cli import sweep

sys.exit(sweep())
