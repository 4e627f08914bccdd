"""Running per-relation work over a relation axis: chunked vmap and device sharding.

Every per-relation array (mask logits, optimiser state, batches) has the relation axis first.
Work over it is ``jax.vmap``-ed, optionally in chunks (``lax.map`` over groups of relations, for
memory-bound devices), and placed on a 2-D device mesh ``("relation", "data")``: relations are
split over the first mesh axis, each relation's batch over the second. The same jitted code
runs on 1 device, 8 fake CPU devices, a GPU box or a TPU pod slice (multi-host: call
``jax.distributed.initialize()`` first; every host builds the same global batch, and
:func:`shard_batch` only materialises the shards its own devices hold).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

RELATION, DATA = "relation", "data"


def map_relations(fn: Callable[..., Any], chunk_size: int | None = None) -> Callable[..., Any]:
    """``jax.vmap(fn)`` over the leading relation axis of every argument.

    With ``chunk_size`` the relations are processed ``chunk_size`` at a time with ``lax.map``,
    so only that many masked copies of the model are alive at once. The relation count need not
    divide evenly: the last chunk is then padded with copies of the last relation, whose results
    are dropped (at the price of a copy of every per-relation argument: prefer a divisor).
    """
    vmapped = jax.vmap(fn)
    if not chunk_size:
        return vmapped

    def chunked(*args):
        num = jax.tree.leaves(args)[0].shape[0]
        if chunk_size >= num:
            return vmapped(*args)
        groups = math.ceil(num / chunk_size)
        # When the chunk divides the relations, grouping is a reshape (no copy); otherwise the
        # gather that pads the last group copies every per-relation argument (the mask logits).
        index = None if num % chunk_size == 0 else \
            jnp.minimum(jnp.arange(groups * chunk_size), num - 1)

        def to_groups(x):
            x = x if index is None else x[index]
            return x.reshape(groups, chunk_size, *x.shape[1:])

        out = jax.lax.map(lambda a: vmapped(*a), jax.tree.map(to_groups, args))
        return jax.tree.map(lambda y: y.reshape(groups * chunk_size, *y.shape[2:])[:num], out)

    return chunked


def make_mesh(
    num_relations: int,
    batch_size: int,
    devices: Sequence[jax.Device] | None = None,
    relation_parallelism: int | None = None,
) -> Mesh:
    """A ``("relation", "data")`` mesh over ``devices`` (default: all).

    Relations get as many devices as evenly divide them (or ``relation_parallelism``), and each
    relation's batch is split over as many of the remaining devices as divide the batch size.
    Devices that fit neither are left idle (``mesh.devices.size`` tells how many are used), so
    a run never fails for an awkward device count; pick sizes that divide evenly to use them all.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    rel = math.gcd(num_relations, n) if relation_parallelism is None else relation_parallelism
    if n % rel or num_relations % rel:
        raise ValueError(
            f"relation_parallelism {rel} must divide both the device count {n} and the "
            f"relation count {num_relations}"
        )
    data = math.gcd(n // rel, batch_size)
    return Mesh(np.asarray(devices[: rel * data]).reshape(rel, data), (RELATION, DATA))


def relation_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RELATION))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Places a host array (identical on every host) as a global array with ``sharding``."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_global(jax.random.key_data(x), sharding))
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(jax.device_get(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_relations(tree: Any, mesh: Mesh) -> Any:
    """Every leaf split over devices along its leading relation axis."""
    return jax.tree.map(lambda x: put_global(x, relation_sharding(mesh)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf on every device of the mesh (the frozen model params)."""
    return jax.tree.map(lambda x: put_global(x, replicated(mesh)), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """``[R, B, ...]`` arrays split over relations and, within a relation, over the batch."""
    sharding = NamedSharding(mesh, P(RELATION, DATA))
    return {k: put_global(v, sharding) for k, v in batch.items()}
