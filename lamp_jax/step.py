"""One jitted training step of one run: every relation's masks at once.

The loss of ONE relation is a pure function ``relation_loss(mask_logits_r, frozen, batch_r, rng)``;
the step vmaps its gradient over the relation axis R, clips each relation's gradient by its own
global norm, applies Adam with each relation's own state and its own warmup/decay schedule
(:mod:`lamp_jax.optim`), and leaves relations without data in this batch untouched.

Shapes: ``mask_logits`` leaves ``[R, in, out]``; batch ``input_ids``/``attention_mask``
``[R, B, L]``, ``mask_pos``/``obj_id``/``weight`` ``[R, B]`` (weight 0 marks padding rows); one
PRNG key; one peak learning rate. Several runs at once (a sweep) map this step over a leading
runs axis of their own (:mod:`lamp_jax.sweep`).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lamp_jax.masks import MaskMode, apply_masks, expected_density, sparsity_penalty
from lamp_jax.models import ModelConfig, mlm_forward
from lamp_jax.optim import OptimConfig, learning_rate, make_optimizer
from lamp_jax.prefix import check_start_layer
from lamp_jax.relation_map import map_relations

Batch = dict[str, jax.Array]


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
    step: jax.Array  # steps taken
    rng: jax.Array  # the key of the next step's noise


def init_train_state(mask_logits: Any, optimizer: optax.GradientTransformation,
                     total_steps: Any, rng: jax.Array) -> TrainState:
    """``total_steps``: ``[R]`` (or one int for all) updates in each relation's schedule."""
    num_relations = jax.tree.leaves(mask_logits)[0].shape[0]
    return TrainState(
        mask_logits=mask_logits,
        opt_state=jax.vmap(optimizer.init)(mask_logits),
        relation_steps=jnp.zeros((num_relations,), jnp.int32),
        total_steps=jnp.broadcast_to(jnp.asarray(total_steps, jnp.int32), (num_relations,)),
        step=jnp.zeros((), jnp.int32),
        rng=rng,
    )


def step_keys(rng: jax.Array, num_relations: int) -> tuple[jax.Array, jax.Array]:
    """The state's next key, and ``[num_relations]`` keys for this step's noise."""
    rng, step_rng = jax.random.split(rng)
    return rng, jax.random.split(step_rng, num_relations)


def relation_loss(
    mask_logits: Any,
    frozen_params: Any,
    batch: Batch,
    rng: jax.Array | None,
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy of the object token at [MASK] for ONE relation's batch; for
    answers of several tokens (``obj_mask`` ``[B, T]``: :mod:`lamp_jax.data.answers`), of the
    sum over the answer's tokens, each predicted at its position in ``mask_pos`` ``[B, T]``
    (masks of a masked LM, or the tokens before each answer token for a causal LM)."""
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
    # Rank 1 as lamp_jax.ranking counts it (no token scored strictly higher); also cheaper
    # than argmax, a variadic reduce that XLA:CPU does not vectorise.
    target = jnp.take_along_axis(logits, batch["obj_id"][..., None], axis=-1)[..., 0]
    top = target >= jnp.max(logits, axis=-1)
    if "obj_mask" in batch:  # an answer of several tokens: the sum over its tokens
        ce = jnp.sum(ce * batch["obj_mask"], axis=-1)
        top = jnp.all(top | (batch["obj_mask"] == 0), axis=-1)
    ce = jnp.sum(ce * weight) / jnp.maximum(count, 1.0)
    loss = ce
    if loss_config.sparsity_weight:
        loss = loss + sparsity_penalty(mask_logits, loss_config.mode, loss_config.sparsity_weight,
                                       loss_config.target_sparsity)
    correct = jnp.sum(top * weight)
    metrics = {"ce": ce, "loss": loss, "correct": correct, "count": count}
    return loss, metrics


def train_step(
    state: TrainState,
    frozen_params: Any,
    batch: Batch,
    peak_learning_rate: jax.Array,
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optim_config: OptimConfig,
    relation_chunk: int | None = None,
    relation_shards: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update of every relation's masks. Returns the new state and ``[R]`` metrics.

    Each relation's gradient, clipping, Adam update and schedule are one function of that
    relation's state (:func:`relation_update`), vmapped over the relations; every relation's
    schedule peaks at ``peak_learning_rate`` (a scalar array, an argument rather than a
    constant so that a sweep can map this step over runs with different rates).
    ``relation_chunk``: relations per device at a time (``relation_shards`` devices hold the
    relation axis); each chunk's new state is written into the old state's buffers, so with
    donation the step holds one state plus one chunk's gradients and masked weights
    (:func:`~lamp_jax.relation_map.map_relations`)."""
    num_relations = state.relation_steps.shape[0]
    rng, rngs = step_keys(state.rng, num_relations)
    peak = jnp.broadcast_to(jnp.asarray(peak_learning_rate, jnp.float32), (num_relations,))
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
    (:func:`~lamp_jax.optim.learning_rate`), peaking at ``peak_learning_rate`` (default: the
    config's).

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


def jit_train_step(*, model_config: ModelConfig, loss_config: LossConfig,
                   optim_config: OptimConfig, relation_chunk: int | None = None,
                   state_sharding: Any = None, donate: bool = False):
    """:func:`train_step` jitted with its configuration bound:
    ``(state, frozen_params, batch, peak_learning_rate) -> (state, metrics)``.

    ``state_sharding`` (:func:`lamp_jax.placement.state_shardings`) pins the new state to the
    old one's placement, so a multi-device run never gathers the masks on one device; the
    relation chunks then work within each device's block. ``donate``: reuse the old state's
    buffers for the new one (the old state is then unusable;
    :func:`lamp_jax.placement.donates_state` decides for a run)."""
    shards = 1
    if state_sharding is not None:
        sharding = state_sharding.relation_steps
        axes = sharding.spec[0] if sharding.spec else None
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            shards *= sharding.mesh.shape[axis]
    step = partial(train_step, model_config=model_config, loss_config=loss_config,
                   optim_config=optim_config, relation_chunk=relation_chunk,
                   relation_shards=shards)
    out_shardings = None if state_sharding is None else (state_sharding, None)
    return jax.jit(step, donate_argnums=0 if donate else (), out_shardings=out_shardings)
