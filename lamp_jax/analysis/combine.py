"""Combining relation subnetworks for multi-relation use, and choosing which to combine.

A combination is a tree of multipliers (no relation axis) applied with ``multiply_masks``:
``or`` / ``and`` / ``vote`` of the binary masks, or ``soft``: the weighted mean of the relations'
expectation masks ``sigmoid(G_r)``. :func:`choose_combination` searches every subset of up to
``max_size`` candidate relations and every method, scoring each on a validation metric you pass
in; restricting ``candidates`` (e.g. to the relations a dataset's questions are about, the paper's
use of dataset statistics) keeps the search small.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from lamp_jax.masks import combine_masks, hard_mask

METHODS = ("or", "and", "vote", "soft")


def combine(mask_logits: Any, relations: Sequence[int], method: str = "or",
            threshold: float = 0.5, weights: Sequence[float] | None = None) -> Any:
    """One multiplier tree from the masks of ``relations`` (indices into the relation axis)."""
    if method == "soft":
        w = jnp.asarray(weights if weights is not None else [1.0] * len(relations), jnp.float32)
        w = w / w.sum()
        idx = jnp.asarray(list(relations))
        return jax.tree.map(
            lambda g: jnp.tensordot(w, jax.nn.sigmoid(g[idx]), axes=1), mask_logits)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    binary = jax.tree.map(lambda g: hard_mask(g, threshold), mask_logits)
    return combine_masks(binary, relations, method)


def combinations_to_score(candidates: Sequence[int], max_size: int = 2,
                          methods: Sequence[str] = METHODS) -> list[tuple[tuple[int, ...], str]]:
    """Every (subset of ``candidates`` of size 1..max_size, method) that
    :func:`choose_combination` scores, in its order."""
    out = []
    for size in range(1, max_size + 1):
        for subset in itertools.combinations(candidates, size):
            # For one relation every method gives its own mask (soft: its expectation).
            out += [(subset, method) for method in (methods if size > 1 else ("or", "soft"))
                    if method in methods]
    return out


def choose_combination(
    score: Callable[[Any], float],
    mask_logits: Any,
    candidates: Sequence[int],
    max_size: int = 2,
    methods: Sequence[str] = METHODS,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Scores every (subset of ``candidates`` of size 1..max_size, method) with ``score`` on its
    multiplier tree; returns the best and the whole search, best first."""
    search = []
    for subset, method in combinations_to_score(candidates, max_size, methods):
        value = float(score(combine(mask_logits, subset, method, threshold)))
        search.append({"relations": list(subset), "method": method, "score": value})
    search.sort(key=lambda row: -row["score"])
    return {"best": search[0], "search": search}
