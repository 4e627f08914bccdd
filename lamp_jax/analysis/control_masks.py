"""Control masks: binary masks that prune exactly as many weights as a learned mask, chosen
without learning, the subnetworks a learned one must beat to show that *which* weights it
prunes matters, not only how many.

For every (relation, masked matrix) leaf the learned binary mask (``hard_mask``: kept where
``G > logit(threshold)``, the run's threshold inference) prunes ``k`` entries; a control prunes
exactly ``k`` entries of the same matrix:

* :func:`random_mask_draws`: ``K`` uniformly random sets of ``k`` entries (every ``k``-subset
  equally likely), a fresh one per draw, relation and matrix; :func:`random_masks` is one draw,
  drawn on the host in time linear in the weights (:func:`random_subset_mask`).
* :func:`magnitude_masks`: the ``k`` entries of smallest ``|W|`` of the frozen kernel (ties: the
  lower flat index ``i * out + j`` is pruned first).

Both return 0/1 multiplier trees shaped like the mask logits (``[R, in, out]`` leaves, float32);
one relation's multipliers (:func:`relation_multipliers`) go to
:func:`lamp_jax.masks.multiply_masks`. The magnitude masks are jitted (``threshold`` static; the
pruned counts are data, so one compilation serves every learned mask).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.hosts import to_host
from lamp_jax.masks import logit


def pruned_counts(mask_logits: Mapping[str, Any], threshold: float = 0.5) -> Any:
    """Per leaf, ``[R]`` int32: how many entries each relation's binary mask prunes."""
    cut = logit(threshold)
    return jax.tree.map(
        lambda g: jnp.sum((g <= cut).reshape(g.shape[0], -1), axis=1, dtype=jnp.int32),
        mask_logits)


def prune_lowest(scores: jax.Array, count: jax.Array) -> jax.Array:
    """0/1 float32 of ``scores``' shape with exactly ``count`` zeros, at the ``count`` lowest
    scores; equal scores are pruned in flat-index order (a stable sort)."""
    flat = scores.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
    return (rank >= count).astype(jnp.float32).reshape(scores.shape)


def random_subset_mask(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``[size]`` float32 0/1 with exactly ``count`` zeros at a uniformly random set.

    A Bernoulli draw with the right mean, then its excess removed (or its shortfall added) by
    uniformly chosen entries: every step treats positions alike, so the law of the result does
    not change under any permutation of them, and the only such law on the sets of ``count``
    entries is the uniform one. Linear in ``size``, where selecting the ``count`` lowest of
    random scores sorts them (bert-base's 42M weights per relation: the difference between a
    second and a minute per draw on a CPU)."""
    pruned = rng.random(size) < count / size if size else np.zeros(0, bool)
    excess = int(pruned.sum()) - count
    if excess:
        pool = np.flatnonzero(pruned if excess > 0 else ~pruned)
        pruned[rng.choice(pool, abs(excess), replace=False)] = excess < 0
    return (~pruned).astype(np.float32)


def random_masks(seed: int | np.random.Generator, mask_logits: Mapping[str, Any],
                 threshold: float = 0.5) -> Any:
    """One uniformly random binary mask per (relation, leaf) with the learned mask's pruned
    count (:func:`random_subset_mask`): numpy leaves ``[R, in, out]``. ``seed``: an int or a
    ``numpy.random.Generator`` (successive calls on one generator give independent draws)."""
    rng = np.random.default_rng(seed)
    counts = to_host(pruned_counts(mask_logits, threshold))

    def leaf(g, k):
        shape = g.shape[1:]
        return np.stack([random_subset_mask(rng, int(np.prod(shape)), int(k_r)).reshape(shape)
                         for k_r in k])

    return jax.tree.map(leaf, mask_logits, counts)


def random_mask_draws(seed: int | np.random.Generator, mask_logits: Mapping[str, Any],
                      draws: int = 5, threshold: float = 0.5) -> Any:
    """``draws`` independent :func:`random_masks`: numpy leaves ``[draws, R, in, out]`` (one
    copy of the masks per draw: for large models call :func:`random_masks` once per draw)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda *d: np.stack(d),
                        *[random_masks(rng, mask_logits, threshold) for _ in range(draws)])


@partial(jax.jit, static_argnames="threshold")
def magnitude_masks(frozen_params: Mapping[str, Any], mask_logits: Mapping[str, Any],
                    threshold: float = 0.5) -> Any:
    """Binary masks pruning, per (relation, leaf), the learned count of smallest-``|W|`` entries
    of the frozen kernel at the leaf's path (ties: lower flat index first)."""
    counts = pruned_counts(mask_logits, threshold)

    def leaf(path, g, k):
        kernel = frozen_params
        for entry in path:
            kernel = kernel[entry.key]
        if kernel.shape != g.shape[1:]:
            raise ValueError(f"mask logits at {'/'.join(e.key for e in path)} have shape "
                             f"{g.shape}, the kernel {kernel.shape}: expected [R, *kernel]")
        magnitude = jnp.abs(kernel.astype(jnp.float32))
        return jax.vmap(lambda r_k: prune_lowest(magnitude, r_k))(k)

    return jax.tree_util.tree_map_with_path(leaf, mask_logits, counts)


def relation_multipliers(masks: Any, relation: int) -> Any:
    """One relation's multipliers (the leading axis dropped), for ``multiply_masks``."""
    return jax.tree.map(lambda m: m[relation], masks)
