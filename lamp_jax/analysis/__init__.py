"""Analyses of a trained run beyond probing (the paper's section 5): specialization, mask
combination, knowledge-base completion, representations. ``lamp-jax report`` runs them.

The evidence a reviewer asks for: control masks (``control_masks``), mask-free baselines
(``baselines``), confidence intervals over held-out facts and seeds (``evidence``) and the
stability of the pruned sets (``stability``).
"""
