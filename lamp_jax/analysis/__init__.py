"""Analyses of a trained run beyond probing (the paper's section 5): specialization, mask
combination, knowledge-base completion, representations. ``python -m lamp_jax.report`` runs them.
"""
