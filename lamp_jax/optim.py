"""The optimiser of the mask logits, per relation: clipping, Adam (float32 or bfloat16 moments
with stochastic rounding) and the learning-rate schedules.

Pure and per relation: :func:`lamp_jax.step.relation_update` applies one relation's update, and
the step vmaps it over the relation axis, so every relation has its own Adam state and its own
schedule (relations may have different amounts of data, as in the reference, where every
relation had its own optimiser and scheduler).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamp_jax import threefry


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
