"""The pieces every model family builds on; none of them knows a family.

* :class:`DenseParams` and :func:`dense`: a dense layer whose params are ``nn.Dense``'s and
  whose matmul runs on rows, so several kernels can be applied as one;
* :func:`activation`: the activations by their transformers names, GELU as PyTorch's exact erf;
* :func:`rotary_tables` / :func:`rotary_tables_of` / :func:`apply_rotary`: rotary position
  embeddings (the ``rotate_half`` convention of transformers' BERT-style encoders and of its
  Llama-style decoders; the scaled variants' frequencies are in ``lamp_jax.models.rope``);
* :func:`additive_bias`: an attention bias from a boolean "may attend" array;
* :func:`run_layers` and :func:`rows_at`: the layer loop every ``mlm_forward`` shares, which can
  start from a cached hidden state, stop early (the frozen prefix) and compute the model's last
  layer only at the rows the head reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def exact_gelu(x: jax.Array) -> jax.Array:
    # x * Phi(x) through erf, as PyTorch writes it. jax.nn.gelu(approximate=False) goes through
    # erfc, whose XLA:CPU expansion made the backward pass of a LAMP step 1.5x slower (measured).
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation transformers calls ``name``; ValueError for one we do not implement."""
    if name == "gelu":
        return exact_gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")


class DenseParams(nn.Module):
    """One dense layer's ``kernel`` [in, out] and ``bias`` [out], with ``nn.Dense``'s names and
    init. The layer itself is :func:`dense`, so that several kernels can be applied as one."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (in_features, self.features))
        if not self.use_bias:
            return kernel, None
        return kernel, self.param("bias", nn.initializers.zeros, (self.features,))


def dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype: Any,
          name: str = "dense") -> jax.Array:
    """``x @ kernel + bias`` computed on ``x`` flattened to rows [N, in]; ``name`` labels its ops
    in profiles (``bench.profile_step``).

    Why flatten: the kernel's gradient is then one contraction over the N = B*L rows. On a
    [B, L, in] input XLA:CPU contracts over two axes and fed every weight gradient through a
    transposing copy of the activations' gradient (measured on a LAMP step: 48 -> 34 ms).
    """
    with jax.named_scope(name):
        rows = x.reshape(-1, x.shape[-1]).astype(dtype)
        y = (rows @ kernel.astype(dtype)).reshape(*x.shape[:-1], kernel.shape[-1])
        return y if bias is None else y + bias.astype(dtype)


def concat_dense(*layers: tuple[jax.Array, jax.Array | None]
                 ) -> tuple[jax.Array, jax.Array | None]:
    """Kernels side by side [in, sum(out)], biases likewise; the layers must all have biases,
    or none (then the bias is None)."""
    kernels, biases = zip(*layers, strict=True)
    if all(b is None for b in biases):
        return jnp.concatenate(kernels, axis=-1), None
    return jnp.concatenate(kernels, axis=-1), jnp.concatenate(biases, axis=-1)


def take_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x`` [B, L, H], ``positions`` [B, K] -> [B, K, H]."""
    return jnp.take_along_axis(x, positions[..., None], axis=1)


def default_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """Rotary inverse frequencies ``1 / theta^(2j / d)``, ``j < d / 2``, in float32 as
    transformers computes them."""
    return 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                        / np.float32(head_dim)))


def rotary_tables(positions: jax.Array, head_dim: int, theta: float
                  ) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` ``[..., head_dim]`` (float32) for integer ``positions`` ``[...]``, with
    the default inverse frequencies (:func:`default_inverse_frequencies`)."""
    return rotary_tables_of(positions, default_inverse_frequencies(head_dim, theta))


def rotary_tables_of(positions: jax.Array, inv_freq: np.ndarray, scaling: float = 1.0
                     ) -> tuple[jax.Array, jax.Array]:
    """``cos``, ``sin`` ``[..., 2 * len(inv_freq)]`` (float32) for integer ``positions``.

    As transformers: each angle ``position * inv_freq[j]`` is used for both halves of the head
    (the ``rotate_half`` convention, not interleaved pairs); ``scaling`` multiplies both tables
    (the ``attention_scaling`` of YaRN, 1 for every other rotary variant).
    """
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scaling != 1.0:
        cos, sin = cos * jnp.float32(scaling), sin * jnp.float32(scaling)
    return cos, sin


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x`` ``[B, Q, heads, d]`` rotated by ``cos``/``sin`` ``[B or 1, Q, d]``, in float32 (as
    transformers does whatever the compute dtype), returned in ``x``'s dtype."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def additive_bias(allowed: jax.Array) -> jax.Array:
    """Attention bias (float32): 0 where ``allowed``, the most negative float elsewhere, as
    transformers' eager attention adds it to the scores."""
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def first_hidden(hidden: jax.Array | None, start_layer: int, dtype: Any,
                 embed: Callable[[], jax.Array]) -> jax.Array:
    """What the first layer run reads: ``embed()``, or ``hidden`` when resuming at
    ``start_layer`` (a run from the embeddings cannot start past layer 0)."""
    if hidden is not None:
        return hidden.astype(dtype)
    if start_layer:
        raise ValueError(f"start_layer={start_layer} needs the hidden states entering it")
    return embed()


def check_stop_layer(stop_layer: int, num_layers: int) -> None:
    if not 0 <= stop_layer <= num_layers:
        raise ValueError(f"stop_layer {stop_layer} is outside 0..{num_layers}")


def output_rows(output_positions: jax.Array | None) -> jax.Array | None:
    """``output_positions`` [B] or [B, K] as [B, K] (None stays None)."""
    if output_positions is None:
        return None
    positions = jnp.asarray(output_positions)
    return positions if positions.ndim == 2 else positions[:, None]


LayerFn = Callable[[int, jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]


def run_layers(layer: LayerFn, x: jax.Array, layers: range, num_layers: int,
               rows: jax.Array | None, every_row: bool
               ) -> tuple[jax.Array, list[jax.Array], list[jax.Array], bool]:
    """Runs ``layer(i, x, query_rows) -> (x, attention probs)`` for each ``i`` in ``layers``.

    Only the head reads the model's last layer, and only at ``rows`` [B, K]: that layer (when
    run) computes only those rows' queries, attention output and FFN (about L times less of its
    work), unless ``every_row`` (hidden states or attentions were asked for).

    Returns the last output, the input and every output (hidden states), every layer's
    attention probs, and whether the last output holds only ``rows``.
    """
    rows_only = rows is not None and not every_row
    hidden_states, attentions, gathered = [x], [], False
    for i in layers:
        last = rows_only and i == num_layers - 1
        x, probs = layer(i, x, rows if last else None)
        gathered = gathered or last
        hidden_states.append(x)
        attentions.append(probs)
    return x, hidden_states, attentions, gathered


def rows_at(x: jax.Array, rows: jax.Array | None, output_positions: jax.Array | None,
            gathered: bool) -> jax.Array:
    """The rows of ``x`` [B, L, H] the head reads: [B, K, H] at ``rows``, [B, H] when
    ``output_positions`` was [B], all of ``x`` without positions. ``gathered``: ``x`` holds
    those rows already (:func:`run_layers`)."""
    if rows is None:
        return x
    # Gather before the head: the vocabulary projection is the costliest matmul and LAMP only
    # needs it at the [MASK] position(s).
    if not gathered:
        x = take_rows(x, rows)
    return x[:, 0] if jnp.ndim(output_positions) == 1 else x


def mlm_outputs(logits: jax.Array, hidden_states: list[jax.Array],
                attentions: list[jax.Array], output_hidden_states: bool,
                output_attentions: bool) -> dict[str, Any]:
    """``mlm_forward``'s result: ``logits`` and, when asked, the tuples of hidden states and
    attention probs."""
    out: dict[str, Any] = {"logits": logits}
    if output_hidden_states:
        out["hidden_states"] = tuple(hidden_states)
    if output_attentions:
        out["attentions"] = tuple(attentions)
    return out
