"""bench.profile_step reads a real jax.profiler trace and tells matmuls from the rest and the
forward pass from the backward pass."""

import jax
import jax.numpy as jnp

from bench.profile_step import category, describe, op_times


def test_profile_categorises_a_real_trace(tmp_path):
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    grad = jax.jit(jax.grad(loss))
    w, x = jnp.ones((128, 128)) * 0.01, jnp.ones((256, 128))
    jax.block_until_ready(grad(w, x))
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            jax.block_until_ready(grad(w, x))
    hlo_text = grad.lower(w, x).compile().as_text()
    times = op_times(str(tmp_path), steps=2, hlo_text=hlo_text)
    described = {op: describe(hlo_text, op) for op in times}
    assert times and all(us >= 0 for us in times.values())
    assert all(shape for shape, _ in described.values()), "every traced op is found in the HLO"
    categories = {category(op, source) for op, (_, source) in described.items()}
    assert ("matmul", "forward") in categories
    assert ("matmul", "backward") in categories
