"""Running per-relation work over a relation axis: chunked vmap and device sharding.

Every per-relation array (mask logits, optimiser state, batches) has the relation axis first.
Work over it is ``jax.vmap``-ed, optionally in chunks (``lax.map`` over groups of relations, for
memory-bound devices), and placed on a 2-D device mesh ``("relation", "data")``: relations are
split over the first mesh axis, each relation's batch over the second. The same jitted code
runs on 1 device, 8 fake CPU devices, a GPU box or a TPU pod slice (several processes: see
:mod:`lamp_jax.hosts`; every process builds the same global batch, and :func:`shard_batch` only
materialises the shards its own devices hold). A relation count the relation axis does not
divide is padded with inert relations (:func:`relation_slots`).

On a CPU, :func:`use_cpu_devices` presents the host as one JAX device per core, and
:func:`run_mesh` splits the relations over them: relations are independent, so each core runs
its own relations' forward, backward and update with no communication (small config, 2-core
CPU: training step 30 -> 25 ms, bench/README.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lamp_jax.hosts import to_host

RELATION, DATA = "relation", "data"


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


def available_cores() -> int:
    """Cores this process may run on (what XLA's CPU thread pool sizes itself to)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def cpu_device_count(requested: int, cores: int, xla_flags: str = "") -> int | None:
    """How many JAX devices to split the host CPU into: ``requested``, or one per core for 0.
    None when ``XLA_FLAGS`` already forces a count (the user's, or the tests' 8 fake devices)."""
    if requested < 0:
        raise ValueError(f"cpu_devices must be >= 0 (0 = one per core), got {requested}")
    if "xla_force_host_platform_device_count" in xla_flags:
        return None
    return requested or max(cores, 1)


def use_cpu_devices(requested: int = 0) -> int | None:
    """Presents the host CPU as :func:`cpu_device_count` JAX devices; returns that count, or
    None where it was left alone (``XLA_FLAGS`` forces a count, or JAX already ran something).

    Call it before any JAX computation (``train_and_evaluate`` does, first thing). It changes
    only the CPU backend: on a GPU or TPU host the accelerators stay the default devices. Every
    device a mesh uses holds a copy of the frozen weights (bert-base: 0.44 GB in float32).
    """
    count = cpu_device_count(requested, available_cores(), os.environ.get("XLA_FLAGS", ""))
    if count is None:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised: the count is fixed for this process
        return None
    return count


def activation_bytes(rows: int, intermediate_size: int, hidden_size: int, dtype: Any) -> int:
    """Bytes of one relation's largest activation: its ``rows`` (prompts x length) at the wider
    of the FFN and hidden widths (part of :func:`transient_bytes_per_relation`)."""
    return rows * max(intermediate_size, hidden_size) * jnp.dtype(dtype).itemsize


def transient_bytes_per_relation(mask_params: int, activation_bytes: int, layers: int) -> int:
    """Memory one relation's training step needs beside the state (an upper estimate): its
    gradient, masked weights, concrete noise and Adam's temporaries (24 bytes per mask
    weight) and its activations for the backward pass (8 of the widest per layer). XLA's plan
    of the bert-base step (16 relations, 32 x 20 tokens, float32) gives 1.05 GiB per relation
    of the chunk on the CPU; this estimate gives 1.3 GiB (bench/README.md, memory)."""
    return 24 * mask_params + 8 * layers * activation_bytes


def available_bytes(mesh: Mesh) -> int | None:
    """Memory each device of ``mesh`` has free now: an accelerator's allocator limit minus what
    is in use; on a CPU, the host's available memory shared by the mesh's devices (they run
    side by side). None where it cannot be read."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // mesh.devices.size
        except OSError:
            return None
        return None
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0)


# The share of an accelerator's free memory a step's transients may take.
ACCELERATOR_SHARE = 0.8
# From this size of training state up, a step's transients are also held to a quarter of the
# state each device holds, so that its peak stays within 1.25x (state + frozen weights).
MEMORY_BOUND_STATE_BYTES = 2**30


def transient_budget(mesh: Mesh, state_bytes: int, reserve_bytes: int = 0) -> int | None:
    """Bytes each device of ``mesh`` may give one step's transients (masked weights,
    gradients, activations of the relations it runs at a time), beside a state of
    ``state_bytes`` in all, from the memory the devices have free now less ``reserve_bytes``
    each (a state about to be placed; :func:`budget_for`)."""
    free = available_bytes(mesh)
    if free is None:
        return None
    return budget_for(free - reserve_bytes, state_bytes, mesh.shape[RELATION])


def budget_for(free_bytes: int, state_bytes: int, relation_shards: int = 1) -> int:
    """80% of a device's free memory; for a state of 1 GiB or more (``state_bytes`` over
    ``relation_shards`` devices), at most a quarter of the state the device holds.

    Memory first: bert-base x 16 relations then runs 1-2 relations at a time at about 1.1-1.25x
    the state's memory (H200: 2 at a time 0.044 s per bfloat16 step, all 16 at once 0.023 s
    at 1.6x). A small state runs all relations at once: chunks only cost time there (small
    config on 2 CPU cores: 1 at a time 0.038 s per step, all at once 0.030 s)."""
    budget = int(ACCELERATOR_SHARE * free_bytes)
    if state_bytes >= MEMORY_BOUND_STATE_BYTES:
        budget = min(budget, state_bytes // relation_shards // 4)
    return budget


def memory_relation_chunk(local_relations: int, per_relation_bytes: int, budget: int
                          ) -> int | None:
    """The most relations (a divisor of ``local_relations``) whose transients fit in
    ``budget`` bytes; None when all fit, 1 when not even one does."""
    if local_relations * per_relation_bytes <= budget:
        return None
    return max(c for c in range(1, local_relations + 1)
               if local_relations % c == 0 and (c == 1 or c * per_relation_bytes <= budget))


def run_relation_chunk(requested: int, num_relations: int, mesh: Mesh,
                       per_relation_bytes: int = 0, budget: int | None = None) -> int | None:
    """The relation chunk a run uses: ``requested`` when > 0; for 0, all of a device's
    relations at once, or the most that fit in ``budget`` bytes per device at
    ``per_relation_bytes`` each (:func:`transient_budget`, :func:`memory_relation_chunk`).

    No smaller chunk for speed: chunks sized to keep activations in a CPU's L2 cache were
    6-10% faster when chunks ran as ``lax.map``, but with the state written back in place a
    chunk costs a pass over its state (small config, 2-core AMD EPYC, 4 relations per device:
    chunks of 1 0.038 s per step, 2 0.036 s, all 4 at once 0.030 s). A sweep group on a CPU
    is the exception: its many slots per device run in chunks of one run's share
    (:func:`lamp_jax.run_setup.relation_chunk_for`)."""
    if requested:
        return requested
    if not per_relation_bytes or budget is None:
        return None
    local = relation_slots(num_relations, mesh) // mesh.shape[RELATION]
    return memory_relation_chunk(local, per_relation_bytes, budget)


def make_mesh(
    num_relations: int,
    batch_size: int,
    devices: Sequence[jax.Device] | None = None,
    relation_parallelism: int | None = None,
    split_batches: bool = True,
) -> Mesh:
    """A ``("relation", "data")`` mesh over ``devices`` (default: all, of every process).

    The relation axis gets ``relation_parallelism`` devices, or by default the largest divisor
    of the device count that is at most the number of relations: all devices when there are
    at least as many relations. A relation count it does not divide is padded with inert
    relations (:func:`relation_slots`), so 13 relations on 8 devices use all 8 (2 relations
    each, 3 of them inert) instead of 1. Each relation's batch is then split over as many of
    the remaining devices as divide the batch size (none with ``split_batches=False``); only
    devices that fit neither idle (``mesh.devices.size`` tells how many are used).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if relation_parallelism is None:
        rel = max(d for d in range(1, min(n, max(num_relations, 1)) + 1) if n % d == 0)
    else:
        rel = relation_parallelism
    if rel < 1 or n % rel:
        raise ValueError(f"relation_parallelism {rel} must divide the device count {n}")
    data = math.gcd(n // rel, batch_size) if split_batches else 1
    return Mesh(np.asarray(devices[: rel * data]).reshape(rel, data), (RELATION, DATA))


def relation_slots(num_relations: int, mesh: Mesh) -> int:
    """Length of the relation axis on ``mesh``: ``num_relations`` rounded up to a multiple of
    the devices on the relation axis. Slots past ``num_relations`` hold inert relations: no
    data (weight 0), so the step never updates them; results and files leave them out."""
    shards = mesh.shape[RELATION]
    return -(-num_relations // shards) * shards


def pad_relations(tree: Any, slots: int) -> Any:
    """Pads the leading relation axis of every host array to ``slots`` with zeros."""
    def pad(x):
        x = np.asarray(x)
        extra = slots - x.shape[0]
        if extra < 0:
            raise ValueError(f"{x.shape[0]} relations do not fit in {slots} slots")
        return np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]) if extra else x

    return jax.tree.map(pad, tree)


def pad_batch(batch: dict[str, np.ndarray], slots: int) -> dict[str, np.ndarray]:
    """A ``[R, B, ...]`` batch with inert relations appended up to ``slots``: copies of the
    first relation's rows (real tokens, so no all-padding attention rows) with weight 0."""
    extra = slots - batch["weight"].shape[0]
    if extra <= 0:
        return batch
    out = {}
    for key, value in batch.items():
        filler = np.zeros_like(value[:1]) if key == "weight" else value[:1]
        if key == "index":
            filler = np.full_like(value[:1], -1)
        out[key] = np.concatenate([value, np.repeat(filler, extra, axis=0)])
    return out


def run_mesh(num_relations: int, batch_size: int, relation_parallelism: int | None = None
             ) -> Mesh:
    """The mesh a run trains and evaluates on: :func:`make_mesh` over all devices, except that
    CPU devices never split a relation's batch. They share one machine's memory, so a split
    buys no capacity, and summing the gradient across devices made the step slower (small
    config, one relation, 2-core CPU: 4.6 ms on one device, 5.3 ms split over two)."""
    return make_mesh(num_relations, batch_size, relation_parallelism=relation_parallelism,
                     split_batches=jax.default_backend() != "cpu")


def relation_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(RELATION))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """Places an array (identical on every process) as a global array with ``sharding``; each
    process materialises only the shards of its own devices."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_global(jax.random.key_data(x), sharding))
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = to_host(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def shard_relations(tree: Any, mesh: Mesh) -> Any:
    """Every leaf split over devices along its leading relation axis."""
    return jax.tree.map(lambda x: put_global(x, relation_sharding(mesh)), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf on every device of the mesh (the frozen model params)."""
    return jax.tree.map(lambda x: put_global(x, replicated(mesh)), tree)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh, slots: int | None = None
                ) -> dict[str, jax.Array]:
    """``[R, B, ...]`` arrays split over relations and, within a relation, over the batch;
    with ``slots``, padded with inert relations first (:func:`pad_batch`)."""
    if slots is not None:
        batch = pad_batch(batch, slots)
    sharding = NamedSharding(mesh, P(RELATION, DATA))
    return {k: put_global(v, sharding) for k, v in batch.items()}
