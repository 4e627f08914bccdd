"""Stability of what the masks found: how much the pruned sets of two binary masks overlap,
against what two random masks of the same sparsities would share.

For one masked matrix of ``n`` weights, masks A and B pruning ``k1`` and ``k2`` of them:

* observed: the Jaccard overlap ``J = |A & B| / |A | B|`` of the pruned sets (NaN when neither
  prunes anything);
* chance: ``E[J]`` for independent, uniformly random pruned sets of sizes ``k1`` and ``k2``
  (:func:`expected_jaccard`). We report ``E[J]`` itself, not the ratio of expectations
  ``E|A & B| / E|A | B|``: ``|A & B|`` is hypergeometric (mean ``k1 k2 / n``), and ``E[J]`` is
  its exact sum ``sum_i P(i) i / (k1 + k2 - i)`` over the terms within 40 standard deviations
  + 60 of the mean (the rest weigh less than 1e-38: Bernstein's bound, which holds for sampling
  without replacement, Hoeffding 1963);
* their ratio ``J / E[J]``: 1 is chance level, above 1 more shared than chance (NaN where
  ``E[J]`` is 0 or undefined: one mask or both prune nothing).

``total`` pools every masked matrix of a relation: ``J`` of the union of its pruned sets, and as
chance the ratio of expectations ``sum E|A & B| / sum E|A | B|`` over matrices (its exact
``E[J]`` would need the convolution of the matrices' hypergeometrics; the mean pooled J of 4000
pairs of random masks over 288 weights agrees with the ratio within 4 standard errors,
tests/test_stability.py, and the gap shrinks as the matrices grow).

Compared: the relations of one run (:func:`overlap_between_relations`, an ``R x R`` matrix per
matrix and ``total``; the diagonal is a mask with itself, J = 1) and the seeds of one
configuration (:func:`overlap_across_seeds`, per relation, for every pair of seeds).
``matrix`` names are :func:`lamp_jax.masks.sparsity_stats`' ``"layer_<i>/<matrix>"``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lamp_jax.hosts import to_host
from lamp_jax.masks import MaskSpec, iter_masks, logit


@dataclasses.dataclass(frozen=True)
class Overlap:
    """Jaccard overlaps, their chance level and ratio, all of one shape."""

    jaccard: np.ndarray
    expected: np.ndarray
    ratio: np.ndarray


def pruned_sets(mask_logits: Mapping[str, Any], spec: MaskSpec, threshold: float = 0.5,
                relations: int | None = None) -> dict[str, np.ndarray]:
    """``{"layer_<i>/<matrix>": [R, n] bool}``: the entries each relation's binary mask
    prunes (``G <= logit(threshold)``, as :func:`lamp_jax.masks.sparsity_stats`), for the
    first ``relations`` of the leading axis (default: all; a run's inert slots left out). One
    leaf at a time comes to the host, as 1 byte per weight."""
    return {f"layer_{i}/{m}": (to_host(leaf)[:relations] <= logit(threshold)).reshape(
                min(relations or leaf.shape[0], leaf.shape[0]), -1)
            for i, m, leaf in iter_masks(mask_logits, spec)}


def expected_intersection(k1: float, k2: float, n: float) -> float:
    """``E|A & B|`` for independent uniformly random sets of sizes k1, k2 out of n."""
    return k1 * k2 / n


def expected_jaccard(k1: int, k2: int, n: int) -> float:
    """``E[|A & B| / |A | B|]`` for independent uniformly random subsets of sizes ``k1``, ``k2``
    of ``n`` elements (module docstring); NaN when ``k1 = k2 = 0``."""
    k1, k2, n = int(k1), int(k2), int(n)
    if not (0 <= k1 <= n and 0 <= k2 <= n):
        raise ValueError(f"set sizes {k1}, {k2} must lie in [0, {n}]")
    if k1 == 0 and k2 == 0:
        return float("nan")
    lowest, highest = max(0, k1 + k2 - n), min(k1, k2)
    mean = k1 * k2 / n
    sd = math.sqrt(mean * (1 - k1 / n) * (n - k2) / max(n - 1, 1))
    lo = max(lowest, math.floor(mean - 40 * sd - 60))
    hi = min(highest, math.ceil(mean + 40 * sd + 60))
    i = np.arange(lo, hi + 1, dtype=np.float64)
    # log P(i) up to a constant, by the ratio P(i+1) / P(i) of the hypergeometric distribution.
    step = (np.log(k1 - i[:-1]) + np.log(k2 - i[:-1])
            - np.log(i[:-1] + 1) - np.log(n - k1 - k2 + i[:-1] + 1))
    log_p = np.concatenate([[0.0], np.cumsum(step)])
    p = np.exp(log_p - log_p.max())
    return float(np.sum(p * i / (k1 + k2 - i)) / np.sum(p))


def _jaccard(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / np.maximum(union, 1), np.nan)


def _ratio(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(expected > 0, observed / np.where(expected > 0, expected, 1), np.nan)


def _pairwise(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray], pairs
              ) -> dict[str, Overlap]:
    """Overlap of ``first[name][a]`` and ``second[name][b]`` for every ``(a, b)`` in ``pairs``,
    per matrix and ``total``."""
    out: dict[str, Overlap] = {}
    sums = {key: np.zeros(len(pairs)) for key in ("inter", "union", "e_inter", "e_union")}
    for name, a_sets in first.items():
        b_sets = second[name]
        n = a_sets.shape[1]
        counts_a, counts_b = a_sets.sum(axis=1), b_sets.sum(axis=1)
        inter = np.array([np.count_nonzero(a_sets[a] & b_sets[b]) for a, b in pairs], float)
        k1 = np.array([counts_a[a] for a, _ in pairs], float)
        k2 = np.array([counts_b[b] for _, b in pairs], float)
        union = k1 + k2 - inter
        jaccard = _jaccard(inter, union)
        expected = np.array([expected_jaccard(x, y, n) for x, y in zip(k1, k2, strict=True)])
        out[name] = Overlap(jaccard, expected, _ratio(jaccard, expected))
        e_inter = k1 * k2 / n
        for key, value in (("inter", inter), ("union", union), ("e_inter", e_inter),
                           ("e_union", k1 + k2 - e_inter)):
            sums[key] += value
    jaccard = _jaccard(sums["inter"], sums["union"])
    expected = _jaccard(sums["e_inter"], sums["e_union"])
    out["total"] = Overlap(jaccard, expected, _ratio(jaccard, expected))
    return out


def overlap_between_relations(mask_logits: Mapping[str, Any], spec: MaskSpec,
                              threshold: float = 0.5, relations: int | None = None
                              ) -> dict[str, Overlap]:
    """Per matrix and ``total``: ``[R, R]`` overlaps of relation a's and relation b's pruned
    sets in one run (symmetric), for the first ``relations`` (default: all)."""
    sets = pruned_sets(mask_logits, spec, threshold, relations)
    num = next(iter(sets.values())).shape[0]
    pairs = list(itertools.combinations_with_replacement(range(num), 2))
    flat = _pairwise(sets, sets, pairs)
    out = {}
    for name, overlap in flat.items():
        fields = {}
        for field in ("jaccard", "expected", "ratio"):
            matrix = np.full((num, num), np.nan)
            for (a, b), value in zip(pairs, getattr(overlap, field), strict=True):
                matrix[a, b] = matrix[b, a] = value
            fields[field] = matrix
        out[name] = Overlap(**fields)
    return out


def overlap_across_seeds(mask_logits_per_seed: Sequence[Mapping[str, Any]], spec: MaskSpec,
                         threshold: float = 0.5) -> tuple[list[tuple[int, int]],
                                                          dict[str, Overlap]]:
    """For every pair ``(s, t)``, ``s < t``, of the runs (same configuration, other seeds): the
    overlap of each relation's pruned sets in run s and in run t. Returns the pairs and, per
    matrix and ``total``, ``[pairs, R]`` arrays (average over axis 0 for one number per
    relation)."""
    if len(mask_logits_per_seed) < 2:
        raise ValueError("need the masks of at least two seeds")
    sets = [pruned_sets(tree, spec, threshold) for tree in mask_logits_per_seed]
    num = next(iter(sets[0].values())).shape[0]
    seed_pairs = list(itertools.combinations(range(len(sets)), 2))
    per_pair = [_pairwise(sets[s], sets[t], [(r, r) for r in range(num)]) for s, t in seed_pairs]
    names = per_pair[0].keys()
    return seed_pairs, {name: Overlap(*(np.stack([getattr(p[name], f) for p in per_pair])
                                        for f in ("jaccard", "expected", "ratio")))
                        for name in names}
