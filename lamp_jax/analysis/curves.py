"""Which weights matter, beyond how many: a sparsity curve and a necessity test of the learned
masks, each against masks chosen without learning.

* :func:`sparsity_curve`: at each sparsity ``s``, every (relation, matrix) keeps its learned
  logits' top ``1 - s`` (the lowest-logit fraction ``s`` pruned), against random and magnitude
  masks pruning the same count of the same matrix; the score of each, and the area under each
  curve (trapezoids over ``s``).
* :func:`necessity`: the weights *specific* to relation r (kept by r's mask and pruned by most
  other relations' masks) removed from the full model, one relation at a time: P@1 on every
  relation. A relation whose specific weights carry its knowledge loses more on its own prompts
  than on the others'; the same count of random weights removed is the control.

Scores come from ``score(multipliers)``: the caller's ranking of per-relation 0/1 multiplier
trees (``[R, in, out]`` leaves), e.g. :func:`lamp_jax.controls.as_mask_logits` through a run's
threshold ranking.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lamp_jax.analysis.control_masks import random_subset_mask
from lamp_jax.masks import logit

Score = Callable[[Any], float]


def prune_lowest_fraction(scores: np.ndarray, fraction: float) -> np.ndarray:
    """0/1 float32 per row of ``scores`` ``[R, ...]``: the ``round(fraction * n)`` lowest
    entries of each row pruned (ties: lower flat index first)."""
    rows = scores.reshape(scores.shape[0], -1)
    count = int(round(fraction * rows.shape[1]))
    order = np.argsort(rows, axis=1, kind="stable")[:, :count]
    out = np.ones(rows.shape, np.float32)
    np.put_along_axis(out, order, 0.0, axis=1)
    return out.reshape(scores.shape)


def sparsity_curve(score: Score, mask_logits: Mapping[str, Any], frozen_params: Any,
                   sparsities: Sequence[float], seed: int = 0) -> dict[str, Any]:
    """``{"sparsity": [...], "learned" | "random" | "magnitude": [score per sparsity],
    "auc": {...}}`` (module docstring). ``mask_logits``: host ``[R, in, out]`` leaves."""
    rng = np.random.default_rng((seed, 11))

    def magnitude(path, g, s):
        kernel = frozen_params
        for entry in path:
            kernel = kernel[entry.key]
        weights = np.broadcast_to(np.abs(np.asarray(kernel, np.float32)), g.shape)
        return prune_lowest_fraction(weights, s)

    def random(g, s):
        n = int(np.prod(g.shape[1:]))
        return np.stack([random_subset_mask(rng, n, int(round(s * n))).reshape(g.shape[1:])
                         for _ in range(g.shape[0])])

    curves: dict[str, list[float]] = {"learned": [], "random": [], "magnitude": []}
    for s in sparsities:
        curves["learned"].append(score(jax.tree.map(
            lambda g, s=s: prune_lowest_fraction(np.asarray(g), s), mask_logits)))
        curves["random"].append(score(jax.tree.map(lambda g, s=s: random(g, s), mask_logits)))
        curves["magnitude"].append(score(jax.tree_util.tree_map_with_path(
            lambda p, g, s=s: magnitude(p, g, s), mask_logits)))
    x = np.asarray(sparsities, np.float64)
    return {"sparsity": list(map(float, x)), **curves,
            "auc": {k: _trapezoid(np.asarray(v), x) for k, v in curves.items()}}


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def specific_weights(mask_logits: Mapping[str, Any], threshold: float = 0.5,
                     majority: float = 0.5) -> Any:
    """Per relation r, 0/1 leaves ``[R, in, out]``: 1 where r's mask keeps the weight and more
    than ``majority`` of the other relations' masks prune it."""
    cut = logit(threshold)

    def leaf(g):
        kept = np.asarray(g) > cut
        num = kept.shape[0]
        pruned_by_others = (num - 1 - (kept.sum(axis=0) - kept)) / max(num - 1, 1)
        return (kept & (pruned_by_others > majority)).astype(np.float32)

    return jax.tree.map(leaf, mask_logits)


def necessity(score_with: Callable[[Any], np.ndarray], mask_logits: Mapping[str, Any],
              threshold: float = 0.5, seed: int = 0) -> dict[str, Any]:
    """For every relation r: ``score_with(multipliers)`` (per-relation P@1 ``[R]`` of the full
    model times one multiplier tree for every relation) with r's specific weights removed
    (``matrix[r]``), and with as many random weights of each matrix removed (``control[r]``).
    ``own_change`` / ``other_change``: the mean change of P@1 from the full model's (ablated
    minus full) on r's own prompts and on the others'."""
    specific = specific_weights(mask_logits, threshold)
    num = jax.tree.leaves(specific)[0].shape[0]
    rng = np.random.default_rng((seed, 13))
    full = np.asarray(score_with(jax.tree.map(lambda m: np.ones_like(m[0]), specific)))
    matrix, control, removed = np.zeros((num, num)), np.zeros((num, num)), []
    for r in range(num):
        own = jax.tree.map(lambda m, r=r: 1.0 - m[r], specific)
        matrix[r] = score_with(own)
        control[r] = score_with(jax.tree.map(
            lambda m: random_subset_mask(rng, m.size, int(m.size - m.sum())).reshape(m.shape),
            own))
        removed.append(int(sum(int((1 - m).sum()) for m in jax.tree.leaves(own))))
    off = ~np.eye(num, dtype=bool)

    def changes(m):
        change = m - full[None, :]
        return float(np.nanmean(np.diag(change))), float(np.nanmean(change[off]))

    own, other = changes(matrix)
    random_own, random_other = changes(control)
    return {"full": full.tolist(), "matrix": matrix.tolist(), "random_control": control.tolist(),
            "removed_weights": removed, "own_change": own, "other_change": other,
            "random_own_change": random_own, "random_other_change": random_other}
