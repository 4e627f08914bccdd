"""lamp_jax.threefry.uniform draws exactly jax.random.uniform's numbers (the stochastic masks'
noise must not change with the faster lowering), and falls back to it where it cannot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax import threefry


def _bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, jnp.uint32))


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 33, 17), (4, 128, 96)])
def test_uniform_is_jax_random_uniform_bit_for_bit(shape):
    key = jax.random.key(1234)
    want = jax.random.uniform(key, shape, jnp.float32, 1e-6, 1 - 1e-6)
    got = jax.jit(threefry.uniform, static_argnums=(1, 2, 3, 4))(
        key, shape, jnp.float32, 1e-6, 1 - 1e-6)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_uniform_under_vmap_and_split_keys():
    keys = jax.random.split(jax.random.key(7), 6)
    want = jax.vmap(lambda k: jax.random.uniform(k, (64, 40), minval=-2.0, maxval=3.0))(keys)
    got = jax.jit(jax.vmap(lambda k: threefry.uniform(k, (64, 40), minval=-2.0, maxval=3.0)))(keys)
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_hash_matches_the_published_test_vector():
    # Random123's known-answer test for Threefry-2x32-20: key (0x13198a2e, 0x03707344),
    # counter (0x243f6a88, 0x85a308d3) -> (0xc4923a9c, 0x483df7a0).
    x0, x1 = threefry.threefry2x32(*(jnp.uint32(v) for v in
                                     (0x13198A2E, 0x03707344, 0x243F6A88, 0x85A308D3)))
    assert (int(x0), int(x1)) == (0xC4923A9C, 0x483DF7A0)


def test_other_key_implementations_fall_back_to_jax():
    key = jax.random.key(3, impl="rbg")
    want = jax.random.uniform(key, (5, 6))
    np.testing.assert_array_equal(threefry.uniform(key, (5, 6)), want)
    raw = jax.random.PRNGKey(3)  # a legacy uint32 key
    np.testing.assert_array_equal(threefry.uniform(raw, (5, 6)), jax.random.uniform(raw, (5, 6)))


def test_non_partitionable_counters_fall_back_to_jax():
    key = jax.random.key(11)
    with jax.threefry_partitionable(False):
        want = jax.random.uniform(key, (9, 4))
        np.testing.assert_array_equal(threefry.uniform(key, (9, 4)), want)
