"""A smoke run of the default in well under a minute (one epoch, no plots or specialization)."""

from lamp_jax.configs import default


def get_config():
    c = default.get_config()
    c.epochs = 5
    c.specialization = False
    c.plots = False
    return c
