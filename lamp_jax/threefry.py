"""``jax.random.uniform``, bit for bit, as one fusible expression.

The stochastic masks draw one uniform per mask logit per step (bert-base: 42.5 M per relation).
On the CPU, JAX lowers its Threefry hash as a rolled loop of five iterations, each writing its
two uint32 arrays to memory, so drawing the noise cost more than the step's matmuls (14 ms of a
50 ms step on the small benchmark config). Written out with ``jnp`` integer ops, the same hash
fuses into the op that consumes it: no intermediate arrays, and the same bits.

:func:`uniform` reproduces ``jax.random.uniform(key, shape, float32, minval, maxval)`` exactly
for Threefry keys under ``jax_threefry_partitionable`` (JAX's default since 0.5), where the
counters are the row-major index of each element. For any other key implementation, dtype or
setting it calls ``jax.random.uniform`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
    return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(key1: jax.Array, key2: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), the hash behind ``jax.random``."""
    keys = (key1, key2, key1 ^ key2 ^ _PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for block in range(5):
        for r in _ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + keys[(block + 1) % 3]
        x1 = x1 + keys[(block + 2) % 3] + np.uint32(block + 1)
    return x0, x1


def _same_bits_as_jax(key: jax.Array, shape: Sequence[int], dtype) -> bool:
    return (
        jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
        and str(jax.random.key_impl(key)) == "threefry2x32"
        # The flag may be retired once partitionable counters are the only kind.
        and getattr(jax.config, "jax_threefry_partitionable", True)
        and jnp.dtype(dtype) == jnp.float32
        and 0 < math.prod(shape) < 2**32
    )


def uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32, minval: float = 0.0,
            maxval: float = 1.0) -> jax.Array:
    """``jax.random.uniform(key, shape, dtype, minval, maxval)`` for ONE key (vmap for more)."""
    shape = tuple(shape)
    if not _same_bits_as_jax(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, minval, maxval)
    data = jax.random.key_data(key)
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    hi, lo = threefry2x32(data[0], data[1], jnp.zeros(shape, jnp.uint32), counter)
    bits = hi ^ lo
    # As jax.random: 23 random mantissa bits under the exponent of 1.0 give [1, 2); minus 1.
    mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)
    floats = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)
    low, high = np.float32(minval), np.float32(maxval)
    return jnp.maximum(low, floats * (high - low) + low)
