"""Where a run's arrays live and how much memory its steps may take: the one module of placement
and memory policy.

* **Mesh**: a ``("relation", "data")`` device mesh; relations are split over the first axis,
  each relation's batch over the second (:func:`make_mesh`, :func:`run_mesh`). The same jitted
  code runs on 1 device, 8 fake CPU devices, a GPU box or a TPU pod slice (several processes:
  every process builds the same global batch, and :func:`shard_batch` materialises only the
  shards of its own devices).
* **Padding**: a relation count the relation axis does not divide is padded with inert
  relations, which have no data and never change (:func:`relation_slots`).
* **Sharding** of the frozen weights (replicated), the training state and the batches.
* **Chunk**: how many relations each device runs at a time, from the memory it has
  (:func:`relation_chunk_for`, :func:`fastest_fitting_chunk`).
* **Donation**, the **background-save threshold** and the **allocator hint**: what a large
  state changes about memory.

On a CPU, :func:`use_cpu_devices` presents the host as one JAX device per core and
:func:`run_mesh` splits the relations over them: relations are independent, so each core runs
its own relations' forward, backward and update with no communication (small config, 2-core
CPU: training step 30 -> 25 ms, bench/README.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lamp_jax.hosts import put_global
from lamp_jax.models import family_of
from lamp_jax.step import TrainState, init_train_state

RELATION, DATA = "relation", "data"


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
    chunks of 1 0.038 s per step, 2 0.036 s, all 4 at once 0.030 s)."""
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
    sharding = batch_sharding(mesh)
    return {k: put_global(v, sharding) for k, v in batch.items()}


def step_transient_bytes(model_config: Any, batch_size: int, length: int, mask_params: int,
                         dtype: Any) -> int:
    """One relation's transients in a training step (:func:`transient_bytes_per_relation`)
    for batches of ``batch_size`` prompts padded to ``length`` tokens (every split of a run
    shares it) and ``mask_params`` mask weights per relation."""
    width = model_config.intermediate_size * (2 if family_of(model_config).gated_ffn else 1)
    size = activation_bytes(batch_size * length, width, model_config.hidden_size, dtype)
    return transient_bytes_per_relation(mask_params, size, model_config.num_layers)


def relation_chunk_for(requested: int, num_relations: int, mesh: Mesh, per_relation_bytes: int,
                       state_bytes: int, log=None, placed: bool = True) -> int | None:
    """``requested`` (``config.relation_chunk``) when > 0; for 0 the automatic choice for
    relations of ``per_relation_bytes`` transients each (:func:`step_transient_bytes`), in the
    memory the devices have left beside ``state_bytes`` of training state (already on the
    devices, or with ``placed=False`` about to be). With ``log``: says when a larger chunk
    would fit in free memory and run faster."""
    reserve = 0 if placed else state_bytes // mesh.devices.size
    budget = transient_budget(mesh, state_bytes, reserve)
    chunk = run_relation_chunk(requested, num_relations, mesh, per_relation_bytes, budget)
    free = available_bytes(mesh)
    if log is None or requested or free is None:
        return chunk
    fastest = run_relation_chunk(0, num_relations, mesh, per_relation_bytes,
                                 int(ACCELERATOR_SHARE * (free - reserve)))
    local = relation_slots(num_relations, mesh) // mesh.shape[RELATION]
    if (fastest or local) > (chunk or local):
        extra = ((fastest or local) - chunk) * per_relation_bytes
        log(f"memory first: {chunk} relation(s) per device at a time keep the step within "
            f"1.25x the state; --config.relation_chunk={fastest or local} fits in free memory "
            f"too: faster steps for about {extra / 2**30:.1f} GiB more per device")
    return chunk


def fastest_fitting_chunk(memory_first: int | None, plan_all_at_once: Callable[[], int],
                          free_bytes: int | None, log=print) -> int | None:
    """On an accelerator: all relations at once (None) when XLA's plan of that step, in bytes
    per device (``plan_all_at_once()``, the state and frozen weights included), fits in
    :data:`ACCELERATOR_SHARE` of the device's free memory (before the state
    is placed); else the ``memory_first`` chunk. bert-base x 16 relations on an H200: all at
    once 0.023 s per bfloat16 step at 1.6x the state, one at a time 0.054 s at 1.11x."""
    if memory_first is None or free_bytes is None:
        return memory_first
    peak = plan_all_at_once()
    if peak <= ACCELERATOR_SHARE * free_bytes:
        log(f"all relations at once: XLA plans {peak / 2**30:.2f} GiB per device for the step, "
            f"within {ACCELERATOR_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB free")
        return None
    log(f"memory first: all relations at once would take {peak / 2**30:.2f} GiB per device "
        f"(XLA's plan), more than {ACCELERATOR_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB "
        f"free; {memory_first} relation(s) per device at a time")
    return memory_first


def planned_peak_bytes(step_fn: Callable[..., Any], *abstract_args: Any) -> int:
    """XLA's plan of one call of the jitted ``step_fn``, in bytes per device: its arguments,
    outputs and temporaries, less what donated arguments lend the outputs. The arguments are
    ``jax.ShapeDtypeStruct`` trees with their shardings (:func:`abstract_placed`): nothing is
    allocated."""
    plan = step_fn.lower(*abstract_args).compile().memory_analysis()
    return int(plan.argument_size_in_bytes + plan.output_size_in_bytes
               + plan.temp_size_in_bytes - plan.alias_size_in_bytes)


def abstract_placed(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes with ``shardings`` (a tree of the same structure, or one
    sharding for every leaf), as ``jax.ShapeDtypeStruct``."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                        tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """``[R, B, ...]`` batches: relations over the relation axis, prompts over the data axis."""
    return NamedSharding(mesh, P(RELATION, DATA))


# From this size of training state up, a CPU run donates the old state to the step.
DONATE_ON_CPU_BYTES = 256 * 2**20
# Below this size of training state, checkpoints are saved in the background: a background save
# must first copy the whole state off the devices (the next step overwrites the donated
# buffers), and bert-base x 16 relations on a GPU took 18 GB of host memory to save that way.
# Larger states are saved in place, 1 GB at a time (lamp_jax.checkpoint), while training waits.
BACKGROUND_SAVE_BYTES = 2**30


def saves_in_background(state_bytes: int) -> bool:
    """Whether checkpoints of a training state of ``state_bytes`` are written in the background
    (:data:`BACKGROUND_SAVE_BYTES`)."""
    return state_bytes < BACKGROUND_SAVE_BYTES


def donates_state(state_bytes: int, backend: str | None = None) -> bool:
    """Whether the step reuses the old state's buffers for the new one: on accelerators
    always (it halves the state's memory: bert-base x 16 relations holds 8 GB of logits and
    Adam moments), on a CPU from :data:`DONATE_ON_CPU_BYTES` up. XLA:CPU ran small donated
    steps 1.3-1.5x slower (bench/README.md); large ones need the memory."""
    backend = backend or jax.default_backend()
    return backend != "cpu" or state_bytes >= DONATE_ON_CPU_BYTES


def init_placed_state(mask_logits: Any, optimizer: optax.GradientTransformation,
                      total_steps: Any, rng: jax.Array, mesh: Mesh) -> TrainState:
    """:func:`~lamp_jax.step.init_train_state` built where :func:`state_shardings` places it:
    the (host) logits are copied to their devices once and the moments are created there.
    Building the state on one device and then placing it held three copies of the logits and
    two of the moments at once (bert-base x 16 relations on a CPU: 15 GiB for an 8 GB state)."""
    logits = jax.tree.map(lambda x: put_global(x, relation_sharding(mesh)), mask_logits)
    build = partial(init_train_state, optimizer=optimizer, total_steps=total_steps, rng=rng)
    placement = state_shardings(jax.eval_shape(build, logits), mesh)
    # Donated: the new state's logits are the placed ones, not a copy.
    return jax.jit(build, out_shardings=placement, donate_argnums=0)(logits)


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Per-relation leaves split along the mesh's relation axis; step and rng replicated."""
    rel, rep = relation_sharding(mesh), replicated(mesh)
    return TrainState(
        mask_logits=jax.tree.map(lambda _: rel, state.mask_logits),
        opt_state=jax.tree.map(lambda _: rel, state.opt_state),
        relation_steps=rel,
        total_steps=rel,
        step=rep,
        rng=rep,
    )


def place_state(state: TrainState, mesh: Mesh) -> TrainState:
    """Puts a (host or single-device) state onto the mesh as :func:`state_shardings` says."""
    return jax.tree.map(put_global, state, state_shardings(state, mesh))


# glibc's malloc returns every large buffer of a step to the kernel and maps it again in the next
# one, which zeroes it page by page. These settings keep one heap and reuse it (README, Speed).
CPU_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                       "glibc.malloc.trim_threshold=68719476736")


def allocator_hint(mask_logit_bytes: int, backend: str, system: str,
                   environ: Mapping[str, str], devices: int = 1) -> str | None:
    """A tip for large masks on a Linux CPU under glibc's default malloc, else None.

    Measured with bert-base shapes (4 relations x 8 prompts), one device: 1.76-1.85 s per step
    without, 1.02 s with the settings. With the small benchmark config they were 8-12% slower,
    so the tip only appears from 256 MiB of mask logits up. Their single heap also serialises
    the allocations of several CPU devices (bert-base on 2 devices: 1.26 s without, 1.47 s
    with; on one device with them: 1.06 s), so with ``devices`` > 1 the tip says to use one.
    """
    if (backend != "cpu" or system != "Linux" or mask_logit_bytes < 256 * 2**20
            or "GLIBC_TUNABLES" in environ or "LD_PRELOAD" in environ):
        return None
    return (f"tip: {mask_logit_bytes / 2**30:.1f} GiB of mask logits on a CPU; starting with "
            f"GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}"
            + (" and --config.cpu_devices=1" if devices > 1 else "")
            + " made bert-base steps 1.7x faster here (README, Speed)")
