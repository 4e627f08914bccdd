"""bench.profile_step reads a real jax.profiler trace and tells matmuls from the rest and the
forward pass from the backward pass."""

import jax
import jax.numpy as jnp

from bench.profile_step import category, describe, op_events, op_times, phase_timeline, split_steps


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

    # The two traced steps come apart at the gap between them, and the timeline of one step
    # keeps all of its op time, forward before backward.
    events = op_events(str(tmp_path), hlo_text)
    steps = split_steps(events, 2)
    assert len(steps) == 2 and sum(map(len, steps)) == len(events)
    assert max(e["ts"] + e["dur"] for e in steps[0]) <= steps[1][0]["ts"]
    phase_of = {op: category(op, source)[1] for op, (_, source) in described.items()}
    timeline = phase_timeline(steps[1], phase_of, slices=4)
    total = sum(sum(counter.values()) for _, _, counter in timeline)
    assert abs(total - sum(e["dur"] for e in steps[1])) < 1e-6 * total + 1e-3
    centre = {phase: sum((lo + hi) / 2 * c[phase] for lo, hi, c in timeline)
              / sum(c[phase] for _, _, c in timeline) for phase in ("forward", "backward")}
    assert centre["forward"] < centre["backward"]
