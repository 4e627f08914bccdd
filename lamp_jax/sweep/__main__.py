"""``python -m lamp_jax.sweep``: :func:`lamp_jax.sweep.main`."""

from lamp_jax.sweep import main

main()
