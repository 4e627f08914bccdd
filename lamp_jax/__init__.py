"""lamp-jax: relation-specific subnetworks of masked language models (LAMP) in JAX.

``lamp_jax.load_run(workdir)`` opens a finished run in a notebook (see ``lamp_jax.api``); the
import is lazy so that ``import lamp_jax`` stays cheap.
"""

__version__ = "0.1.0"


def load_run(workdir, model=None):
    """See :func:`lamp_jax.api.load_run`."""
    from lamp_jax.api import load_run as _load_run

    return _load_run(workdir, model)
