"""Work over the relation axis: every per-relation array (mask logits, optimiser state, batches)
has the relation axis first, and one relation's function is ``jax.vmap``-ed over it, optionally
in chunks so that only a chunk's transients are alive at once (:func:`map_relations`).

The axis may be split over devices (:mod:`lamp_jax.placement` places it); the chunking here
works within each device's block, so every device works in every chunk and no data moves
between devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def map_relations(fn: Callable[..., Any], chunk_size: int | None = None, shards: int = 1, *,
                  update_first_argument: bool = False) -> Callable[..., Any]:
    """``jax.vmap(fn)`` over the leading relation axis of every argument.

    With ``chunk_size`` the relations are processed ``chunk_size`` per shard at a time in a
    loop, so only that many relations' transients (masked copies of the model, activations,
    gradients) are alive at once on each device. ``shards``: the devices the relation axis is
    split over (in contiguous blocks, as :func:`relation_sharding` splits it). Every iteration
    slices ``chunk_size`` relations out of every block, so all devices work in every iteration
    and no data moves between them. (Grouping neighbouring relations instead made XLA gather
    the state across devices: 2 CPU devices, 8 relations, chunks of 2, small config: 39 ms per
    step against 22.) A chunk that does not divide a shard's relations leaves a shorter last
    chunk, run once after the loop.

    ``update_first_argument``: ``fn`` returns ``(new first argument, outputs)``, and the new
    values are written into the first argument's buffers chunk by chunk, reading each chunk
    from those same buffers. With the argument donated to the jitted caller, the new training
    state then takes no memory beside the old one: bert-base x 16 relations keeps one 8 GB
    state, not two (bench/README.md, memory).
    """
    vmapped = jax.vmap(fn)
    if not chunk_size:
        return vmapped

    def chunked(*args):
        num = jax.tree.leaves(args)[0].shape[0]
        if num % shards:
            raise ValueError(f"{num} relations do not split into {shards} equal shards")
        local = num // shards
        if chunk_size >= local:
            return vmapped(*args)
        # [R, ...] -> [shards, local, ...] is a reshape within each device's block.
        blocks = jax.tree.map(lambda x: x.reshape(shards, local, *x.shape[1:]), args)

        def take(tree, start, size):
            return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)
                                .reshape(shards * size, *x.shape[2:]), tree)

        def put(buffers, values, start):
            return jax.tree.map(lambda b, v: jax.lax.dynamic_update_slice_in_dim(
                b, v.reshape(shards, -1, *v.shape[1:]).astype(b.dtype), start, axis=1),
                buffers, values)

        def run(buffers, start, size, always_true):
            inputs = ((buffers[0],) + blocks[1:]) if update_first_argument else blocks
            part = take(inputs, start, size)
            if update_first_argument:
                # ``always_true`` is a runtime value XLA cannot fold. Behind the conditional,
                # the chunk's new values are complete buffers before any is written back, so
                # XLA updates every state buffer in place. Without it XLA:CPU copied the
                # whole state once per step: the new logits read the old moments' slices,
                # and it found no order for the in-place writes (bench/README.md, memory).
                values = jax.lax.cond(always_true, lambda p: vmapped(*p), unchanged, part)
            else:
                values = vmapped(*part)
            return put(buffers, values, start)

        def unchanged(part):  # never taken
            rows = jax.tree.leaves(part)[0].shape[0]
            return part[0], jax.tree.map(lambda s: jnp.zeros((rows, *s.shape[1:]), s.dtype),
                                         shapes[1])

        shapes = jax.eval_shape(vmapped, *take(blocks, 0, chunk_size))
        buffers = jax.tree.map(
            lambda s: jnp.zeros((shards, local, *s.shape[1:]), s.dtype), shapes)
        if update_first_argument:
            buffers = (blocks[0], buffers[1])
        groups, rest = divmod(local, chunk_size)

        def body(g, carry):
            done, b = carry
            return done + 1, run(b, g * chunk_size, chunk_size, g < groups)

        done, buffers = jax.lax.fori_loop(0, groups, body, (jnp.int32(0), buffers))
        if rest:  # the shorter last chunk
            buffers = run(buffers, groups * chunk_size, rest, done == groups)
        return jax.tree.map(lambda y: y.reshape(num, *y.shape[2:]), buffers)

    return chunked
