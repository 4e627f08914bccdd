"""Control masks: binary masks that prune exactly as many weights as a learned mask, chosen
without learning, the subnetworks a learned one must beat to show that *which* weights it
prunes matters, not only how many.

For every (relation, masked matrix) leaf the learned binary mask (``hard_mask``: kept where
``G > logit(threshold)``, the run's threshold inference) prunes ``k`` entries; a control prunes
exactly ``k`` entries of the same matrix:

* :func:`random_mask_draws`: ``K`` uniformly random sets of ``k`` entries (every ``k``-subset
  equally likely), a fresh one per draw, relation and matrix; :func:`random_masks` is one draw.
* :func:`magnitude_masks`: the ``k`` entries of smallest ``|W|`` of the frozen kernel (ties: the
  lower flat index ``i * out + j`` is pruned first).

Both return 0/1 multiplier trees shaped like the mask logits (``[R, in, out]`` leaves, float32);
one relation's multipliers (:func:`relation_multipliers`) go to
:func:`lamp_jax.masks.multiply_masks`. Everything here is jittable (``threshold`` and ``draws``
static); the pruned counts are data, so one compilation serves every learned mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

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


@partial(jax.jit, static_argnames=("draws", "threshold"))
def random_mask_draws(key: jax.Array, mask_logits: Mapping[str, Any], draws: int = 5,
                      threshold: float = 0.5) -> Any:
    """``draws`` independent uniformly random binary masks with each (relation, leaf)'s learned
    pruned count: leaves ``[draws, R, in, out]``.

    Selecting the ``k`` lowest of i.i.d. uniform scores makes every ``k``-subset equally likely;
    each leaf draws its scores with its own key split from ``key``, every (draw, relation) its
    own scores.
    """
    leaves, treedef = jax.tree.flatten(mask_logits)
    counts = jax.tree.leaves(pruned_counts(mask_logits, threshold))
    prune = jax.vmap(jax.vmap(prune_lowest), in_axes=(0, None))  # over draws, then relations
    out = [prune(jax.random.uniform(leaf_key, (draws, *g.shape)), k)
           for leaf_key, g, k in zip(jax.random.split(key, len(leaves)), leaves, counts,
                                     strict=True)]
    return jax.tree.unflatten(treedef, out)


def random_masks(key: jax.Array, mask_logits: Mapping[str, Any], threshold: float = 0.5) -> Any:
    """One draw of :func:`random_mask_draws`: leaves ``[R, in, out]``."""
    return jax.tree.map(lambda m: m[0], random_mask_draws(key, mask_logits, 1, threshold))


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
