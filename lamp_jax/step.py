"""One jitted training step for all relations at once.

The loss of ONE relation is a pure function ``relation_loss(mask_logits_r, frozen, batch_r, rng)``;
the step vmaps its gradient over the relation axis R, clips each relation's gradient by its own
global norm, applies Adam with each relation's own state and its own linear warmup/decay schedule
(relations may have different amounts of data, as in the reference, where every relation had
its own optimiser and scheduler), and leaves relations without data in this batch untouched.

Shapes: ``mask_logits`` leaves ``[R, in, out]``; batch ``input_ids``/``attention_mask``
``[R, B, L]``, ``mask_pos``/``obj_id``/``weight`` ``[R, B]`` (weight 0 marks padding rows).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamp_jax import threefry
from lamp_jax.masks import MaskMode, apply_masks, expected_density, sparsity_penalty
from lamp_jax.models import ModelConfig, mlm_forward
from lamp_jax.parallel import RELATION, map_relations, put_global, relation_sharding, replicated
from lamp_jax.prefix import check_start_layer

Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Adam(W) on the mask logits, per relation (the reference: lr 3e-4, warmup 20%, clip 5)."""

    learning_rate: float = 3e-4
    warmup_fraction: float = 0.2  # of each relation's own number of updates (linear only)
    clip_norm: float | None = 5.0  # per-relation global gradient norm; None disables clipping
    weight_decay: float = 0.0  # > 0 gives AdamW's decoupled decay (pulls logits towards 0)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    # Storage of both Adam moments. "bfloat16" takes 8 bytes per mask weight instead of 12
    # (bert-base x 16 relations: 5.4 GB of state instead of 8.2); the logits stay float32.
    moment_dtype: str = "float32"
    # "linear": warmup then linear decay to 0, per relation; "constant": the learning rate
    # throughout (what the reference ran: its per-relation scheduler.step() is commented out).
    schedule: str = "linear"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the step optimises: masked-LM cross-entropy at [MASK] + optional sparsity penalty."""

    mode: MaskMode = MaskMode()
    sparsity_weight: float = 0.0  # 0 disables the L0-style expected-density penalty
    target_sparsity: float | None = None  # with a weight: hold the density at 1 - target
    compute_dtype: Any = jnp.float32
    # > 0: batches carry ``hidden``, the frozen output of layer start_layer - 1 for each prompt
    # (lamp_jax.prefix), and the forward pass starts there instead of at the embeddings.
    start_layer: int = 0


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes in training; all leaves but ``step`` and ``rng`` are ``[R, ...]``."""

    mask_logits: Any
    opt_state: Any
    relation_steps: jax.Array  # [R] updates applied so far to each relation
    total_steps: jax.Array  # [R] updates each relation will get (its schedule's length)
    step: jax.Array  # global step count
    # One key, or ``[runs]`` keys when the relation axis holds several runs side by side (a
    # sweep, :mod:`lamp_jax.sweep`): each run then draws the noise it would draw alone.
    rng: jax.Array
    # None: every slot uses the OptimConfig's learning rate; else ``[R]`` peak step sizes.
    learning_rate: Any = None


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Clip -> Adam -> (decay); the learning rate is applied per relation by the step."""
    parts = []
    if cfg.clip_norm is not None:
        parts.append(clip_by_global_norm(cfg.clip_norm))
    parts.append(scale_by_adam(cfg.b1, cfg.b2, cfg.eps, jnp.dtype(cfg.moment_dtype)))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    return optax.chain(*parts)


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype: Any = jnp.float32
                  ) -> optax.GradientTransformation:
    """Adam's scaling (``optax.scale_by_adam``) with both moments stored in ``moment_dtype``.

    float32 is optax's own transform. For bfloat16 the moments are widened to float32, updated
    and bias-corrected exactly as optax does, and stored with stochastic rounding (optax's
    ``mu_dtype`` narrows the first moment only, to nearest). To nearest, the second moment
    stops moving: 0.999 x rounds back to x in bfloat16's 8 bits, and so does adding a
    gradient square under 1/512 of it. Measured on the embedded default (test macro P@1, seeds
    0/1/2, bench/README.md): float32 0.609 +- 0.028, bfloat16 with stochastic rounding 0.610
    +- 0.021; on the earlier deterministic default, rounding to nearest lost 0.028 (0.448 +-
    0.014 against 0.476 +- 0.007), stochastic rounding 0.007."""
    if jnp.dtype(moment_dtype) == jnp.float32:
        return optax.scale_by_adam(b1, b2, eps)

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)  # noqa: E731
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=jax.tree.map(zeros, params),
                                      nu=jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        wide = lambda t: t.astype(jnp.float32)  # noqa: E731
        mu = jax.tree.map(lambda g, m: (1 - b1) * g + b1 * wide(m), updates, state.mu)
        nu = jax.tree.map(lambda g, v: (1 - b2) * jnp.square(g) + b2 * wide(v), updates,
                          state.nu)
        count = optax.safe_increment(state.count)
        mu_hat = 1 - b1 ** count.astype(jnp.float32)
        nu_hat = 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / mu_hat) / (jnp.sqrt(v / nu_hat) + eps), mu, nu)
        leaves_mu, treedef = jax.tree.flatten(mu)
        stored = [_store_pair(m, v, count, i, moment_dtype)
                  for i, (m, v) in enumerate(zip(leaves_mu, jax.tree.leaves(nu), strict=True))]
        return out, optax.ScaleByAdamState(
            count=count, mu=jax.tree.unflatten(treedef, [a for a, _ in stored]),
            nu=jax.tree.unflatten(treedef, [b for _, b in stored]))

    return optax.GradientTransformation(init, update)


def _store_pair(mu: jax.Array, nu: jax.Array, count: jax.Array, leaf: int, dtype: Any
                ) -> tuple[jax.Array, jax.Array]:
    """Both moments of one leaf rounded stochastically to ``dtype`` (bfloat16), with random
    bits from Threefry keyed by the update count and the leaf, one hash for the two."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        raise ValueError(f"moment dtype {jnp.dtype(dtype)}: float32 or bfloat16")
    counter = jax.lax.iota(jnp.uint32, mu.size).reshape(mu.shape)
    hi, lo = threefry.threefry2x32(count.astype(jnp.uint32), jnp.uint32(leaf),
                                   jnp.zeros(mu.shape, jnp.uint32), counter)
    return round_to_bfloat16(mu, hi), round_to_bfloat16(nu, lo)


def round_to_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """float32 -> bfloat16 rounded up with probability equal to the dropped fraction (the
    expected result is ``x``): 16 random bits are added below bfloat16's last bit, then
    truncated away."""
    raw = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    raw = (raw + (bits >> np.uint32(16))) & np.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(raw, jnp.float32).astype(jnp.bfloat16)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` (same state, same result up to rounding), scaling by
    ``min(1, max_norm / norm)`` instead of dividing every element by the norm: XLA:CPU fuses a
    multiply by a scalar into Adam's passes, but wrote the divided gradient out as one more pass
    over every mask (training step 2% faster, bench/README.md)."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / optax.global_norm(updates))
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def linear_warmup_decay(
    count: jax.Array, total: jax.Array, peak: float, warmup_fraction: float
) -> jax.Array:
    """Learning rate of update ``count`` (0-based) out of ``total``: linear up, then down to 0.

    Warmup lasts ``ceil(warmup_fraction * total)`` updates and its first update already uses
    ``peak / warmup`` (Hugging Face's schedule spends its first update at lr 0).
    """
    count = count.astype(jnp.float32)
    total = jnp.maximum(total.astype(jnp.float32), 1.0)
    warmup = jnp.maximum(jnp.ceil(warmup_fraction * total), 1.0)
    up = (count + 1.0) / warmup
    down = jnp.clip((total - count) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    return peak * jnp.where(count < warmup, up, down)


def learning_rate(count: jax.Array, total: jax.Array, cfg: OptimConfig,
                  peak: Any = None) -> jax.Array:
    """The step size of update ``count`` out of ``total`` under ``cfg.schedule``, peaking at
    ``peak`` (default ``cfg.learning_rate``)."""
    peak = cfg.learning_rate if peak is None else peak
    if cfg.schedule == "constant":
        return jnp.broadcast_to(jnp.asarray(peak, jnp.float32), jnp.shape(count))
    if cfg.schedule != "linear":
        raise ValueError(f"unknown schedule {cfg.schedule!r}: 'linear' or 'constant'")
    return linear_warmup_decay(count, total, peak, cfg.warmup_fraction)


def max_logit_travel(total_steps: int, cfg: OptimConfig) -> float:
    """How far a mask logit can move over ``total_steps`` updates: Adam's update is about 1 in
    size at most, so the sum of the step sizes (weight decay, pulling towards 0, aside)."""
    counts = jnp.arange(max(int(total_steps), 1))
    return float(jnp.sum(learning_rate(counts, jnp.full_like(counts, total_steps), cfg)))


def init_train_state(
    mask_logits: Any, optimizer: optax.GradientTransformation, total_steps: Any, rng: jax.Array,
    learning_rate: Any = None,
) -> TrainState:
    """``total_steps``: ``[R]`` (or one int for all) updates in each relation's schedule.
    ``rng``: one key, or ``[runs]`` keys for runs side by side (:func:`slot_rngs`).
    ``learning_rate``: None (the OptimConfig's), or ``[R]`` per-slot peak step sizes."""
    num_relations = jax.tree.leaves(mask_logits)[0].shape[0]
    total = jnp.broadcast_to(jnp.asarray(total_steps, jnp.int32), (num_relations,))
    if learning_rate is not None:
        learning_rate = jnp.broadcast_to(jnp.asarray(learning_rate, jnp.float32),
                                         (num_relations,))
    return TrainState(
        mask_logits=mask_logits,
        opt_state=jax.vmap(optimizer.init)(mask_logits),
        relation_steps=jnp.zeros((num_relations,), jnp.int32),
        total_steps=total,
        step=jnp.zeros((), jnp.int32),
        rng=rng,
        learning_rate=learning_rate,
    )


def state_nbytes(state: TrainState) -> int:
    """Bytes of what training must hold per relation: the mask logits and optimiser state."""
    return sum(x.nbytes for x in jax.tree.leaves((state.mask_logits, state.opt_state)))


def slot_rngs(rng: jax.Array, num_slots: int, relations_per_run: int | None = None
              ) -> tuple[jax.Array, jax.Array]:
    """The next state key(s) and ``[num_slots]`` keys for this step's noise.

    One key: split, and the step key split over the slots. ``[runs]`` keys (several runs on
    one relation axis, ``relations_per_run`` slots each, then inert padding): each run does
    exactly that with its own key, so slot ``r`` of run ``v`` draws what relation ``r`` of
    that run draws alone (``split(key, n)[i]`` does not depend on ``n`` with JAX's
    partitionable Threefry); padding slots reuse keys of real ones."""
    if rng.ndim == 0:
        rng, step_rng = jax.random.split(rng)
        return rng, jax.random.split(step_rng, num_slots)
    pairs = jax.vmap(jax.random.split)(rng)
    per_run = relations_per_run or num_slots // rng.shape[0]
    keys = jax.vmap(lambda k: jax.random.split(k, per_run))(pairs[:, 1]).reshape(-1)
    return pairs[:, 0], keys[jnp.arange(num_slots) % keys.shape[0]]


def relation_loss(
    mask_logits: Any,
    frozen_params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of the object token at [MASK] for ONE relation's batch."""
    check_start_layer(mask_logits, loss_config.start_layer)
    params = apply_masks(frozen_params, mask_logits, loss_config.mode, rng)
    logits = mlm_forward(
        params,
        batch["input_ids"],
        batch["attention_mask"],
        config=model_config,
        output_positions=batch["mask_pos"],
        dtype=loss_config.compute_dtype,
        hidden=batch["hidden"] if loss_config.start_layer else None,
        start_layer=loss_config.start_layer,
    )["logits"]
    weight = batch["weight"].astype(jnp.float32)
    count = weight.sum()
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["obj_id"])
    ce = jnp.sum(ce * weight) / jnp.maximum(count, 1.0)
    loss = ce
    if loss_config.sparsity_weight:
        loss = loss + sparsity_penalty(mask_logits, loss_config.mode, loss_config.sparsity_weight,
                                       loss_config.target_sparsity)
    # Rank 1 as lamp_jax.ranking counts it (no token scored strictly higher); also cheaper
    # than argmax, a variadic reduce that XLA:CPU does not vectorise.
    target = jnp.take_along_axis(logits, batch["obj_id"][:, None], axis=-1)[:, 0]
    correct = jnp.sum((target >= jnp.max(logits, axis=-1)) * weight)
    metrics = {"ce": ce, "loss": loss, "correct": correct, "count": count}
    return loss, metrics


def train_step(
    state: TrainState,
    frozen_params: Any,
    batch: Batch,
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optim_config: OptimConfig,
    relation_chunk: int | None = None,
    relation_shards: int = 1,
    relations_per_run: int | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of every relation's masks. Returns the new state and ``[R]`` metrics.

    Each relation's gradient, clipping, Adam update and schedule are one function of that
    relation's state (:func:`relation_update`), vmapped over the relations. ``relation_chunk``:
    relations per device at a time (``relation_shards`` devices hold the relation axis); each
    chunk's new state is written into the old state's buffers, so with donation the step holds
    one state plus one chunk's gradients and masked weights (:func:`map_relations`).
    ``relations_per_run``: with ``[runs]`` keys in ``state.rng``, the real slots of each run
    (:func:`slot_rngs`)."""
    num_relations = state.relation_steps.shape[0]
    rng, rngs = slot_rngs(state.rng, num_relations, relations_per_run)
    peak = state.learning_rate
    if peak is None:
        peak = jnp.full((num_relations,), optim_config.learning_rate, jnp.float32)
    update = partial(relation_update, frozen_params=frozen_params, model_config=model_config,
                     loss_config=loss_config, optim_config=optim_config)
    per_relation = (state.mask_logits, state.opt_state, state.relation_steps)
    (logits, opt_state, steps), metrics = map_relations(
        lambda own, total, lr, b, r: update(*own, total, b, r, peak_learning_rate=lr),
        relation_chunk, relation_shards, update_first_argument=True,
    )(per_relation, state.total_steps, peak, batch, rngs)
    new_state = state.replace(mask_logits=logits, opt_state=opt_state, relation_steps=steps,
                              step=state.step + 1, rng=rng)
    return new_state, metrics


def relation_update(
    mask_logits: Any,
    opt_state: Any,
    relation_steps: jax.Array,
    total_steps: jax.Array,
    batch: Batch,
    rng: jax.Array,
    *,
    frozen_params: Any,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optim_config: OptimConfig,
    peak_learning_rate: Any = None,
) -> tuple[tuple[Any, Any, jax.Array], dict[str, jax.Array]]:
    """ONE relation's update: gradient of :func:`relation_loss`, clipping by its global norm,
    Adam(W) with its own state, and the step size of its own schedule
    (:func:`learning_rate`), peaking at ``peak_learning_rate`` (default: the config's).

    A relation with no data in this batch (it finished its epochs) keeps its logits and state,
    and so does one whose loss or gradient is not finite: NaN never reaches the masks.
    Returns ``(new logits, new optimiser state, new update count)`` and the metrics."""
    grad_fn = jax.value_and_grad(partial(relation_loss, model_config=model_config,
                                         loss_config=loss_config), has_aux=True)
    (_, metrics), grads = grad_fn(mask_logits, frozen_params, batch, rng)
    updates, new_opt_state = make_optimizer(optim_config).update(grads, opt_state, mask_logits)
    lr = learning_rate(relation_steps, total_steps, optim_config, peak_learning_rate)
    new_logits = jax.tree.map(lambda g, u: g - lr * u.astype(g.dtype), mask_logits, updates)

    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    active = (metrics["count"] > 0) & finite
    keep = partial(jax.tree.map, lambda new, old: jnp.where(active, new, old))
    metrics = dict(metrics, lr=lr * active, grad_norm=grad_norm, finite=finite)
    if loss_config.sparsity_weight:
        metrics["density"] = expected_density(new_logits, loss_config.mode)
    new = (keep(new_logits, mask_logits), keep(new_opt_state, opt_state),
           relation_steps + active.astype(jnp.int32))
    return new, metrics


def jit_train_step(
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optim_config: OptimConfig,
    relation_chunk: int | None = None,
    state_sharding: Any = None,
    donate: bool | None = None,
    relations_per_run: int | None = None,
):
    """``train_step`` jitted with its configuration bound.

    ``state_sharding`` (e.g. from :func:`state_shardings`) pins the new state to the same
    placement as the old one, so a multi-device run never gathers the masks on one device.
    ``donate``: reuse the old state's buffers for the new one (the old state is then unusable);
    by default as :func:`donates_state` decides for a small state.
    """
    if donate is None:
        donate = donates_state(0)
    shards = 1 if state_sharding is None else state_sharding.relation_steps.mesh.shape[RELATION]
    step = partial(train_step, model_config=model_config, loss_config=loss_config,
                   optim_config=optim_config, relation_chunk=relation_chunk,
                   relation_shards=shards, relations_per_run=relations_per_run)
    out_shardings = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=0 if donate else (), out_shardings=out_shardings)


# From this size of training state up, a CPU run donates the old state to the step.
DONATE_ON_CPU_BYTES = 256 * 2**20


def donates_state(state_bytes: int, backend: str | None = None) -> bool:
    """Whether the step reuses the old state's buffers for the new one: on accelerators
    always (it halves the state's memory: bert-base x 16 relations holds 8 GB of logits and
    Adam moments), on a CPU from :data:`DONATE_ON_CPU_BYTES` up. XLA:CPU ran small donated
    steps 1.3-1.5x slower (bench/README.md); large ones need the memory."""
    backend = backend or jax.default_backend()
    return backend != "cpu" or state_bytes >= DONATE_ON_CPU_BYTES


def init_placed_state(mask_logits: Any, optimizer: optax.GradientTransformation,
                      total_steps: Any, rng: jax.Array, mesh: jax.sharding.Mesh,
                      learning_rate: Any = None) -> TrainState:
    """:func:`init_train_state` built where :func:`state_shardings` places it: the (host)
    logits are copied to their devices once and the moments are created there. Building the
    state on one device and then placing it held three copies of the logits and two of the
    moments at once (bert-base x 16 relations on a CPU: 15 GiB for an 8 GB state)."""
    logits = jax.tree.map(lambda x: put_global(x, relation_sharding(mesh)), mask_logits)
    build = partial(init_train_state, optimizer=optimizer, total_steps=total_steps, rng=rng,
                    learning_rate=learning_rate)
    placement = state_shardings(jax.eval_shape(build, logits), mesh)
    # Donated: the new state's logits are the placed ones, not a copy.
    return jax.jit(build, out_shardings=placement, donate_argnums=0)(logits)


def state_shardings(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Per-relation leaves split along the mesh's relation axis; step and rng replicated."""
    rel, rep = relation_sharding(mesh), replicated(mesh)
    return TrainState(
        mask_logits=jax.tree.map(lambda _: rel, state.mask_logits),
        opt_state=jax.tree.map(lambda _: rel, state.opt_state),
        relation_steps=rel,
        total_steps=rel,
        step=rep,
        rng=rep,
        learning_rate=None if state.learning_rate is None else rel,
    )


def place_state(state: TrainState, mesh: jax.sharding.Mesh) -> TrainState:
    """Puts a (host or single-device) state onto the mesh as :func:`state_shardings` says."""
    return jax.tree.map(put_global, state, state_shardings(state, mesh))
