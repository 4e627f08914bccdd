"""Device placement: CPU device count, run meshes, relation chunks per device, sharded prefix."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.models import ModelConfig, init_params
from lamp_jax.placement import (
    activation_bytes,
    available_cores,
    budget_for,
    cpu_device_count,
    make_mesh,
    memory_relation_chunk,
    replicate,
    run_mesh,
    run_relation_chunk,
    step_transient_bytes,
    transient_budget,
    transient_bytes_per_relation,
)
from lamp_jax.prefix import prefix_hidden_states
from lamp_jax.relation_map import map_relations

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16)


def test_cpu_device_count_is_one_per_core_unless_asked_or_forced():
    assert cpu_device_count(0, cores=6) == 6
    assert cpu_device_count(2, cores=6) == 2
    assert cpu_device_count(0, cores=0) == 1
    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    # A count forced through XLA_FLAGS (the user's, or these tests' 8 fake devices) wins.
    assert cpu_device_count(0, 6, "--xla_force_host_platform_device_count=8") is None
    with pytest.raises(ValueError, match="cpu_devices must be >= 0"):
        cpu_device_count(-1, cores=6)


def _fresh_process(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | env
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def test_use_cpu_devices_sets_the_count_before_jax_starts_and_never_after():
    first = ("from lamp_jax.placement import use_cpu_devices; n = use_cpu_devices(3); "
             "import jax; print(n, jax.device_count())")
    assert _fresh_process(first) == "3 3"
    late = ("import jax, jax.numpy as jnp; jnp.ones(1).block_until_ready(); "
            "from lamp_jax.placement import use_cpu_devices; print(use_cpu_devices(3), "
            "jax.device_count())")
    assert _fresh_process(late) == "None 1"
    forced = _fresh_process(first, XLA_FLAGS="--xla_force_host_platform_device_count=5")
    assert forced == "None 5"


def test_run_mesh_keeps_each_relations_batch_on_one_cpu_device():
    assert jax.default_backend() == "cpu" and jax.device_count() == 8
    # make_mesh would split 3 relations' batches over 4 devices each; on a CPU that only adds a
    # sum of gradients across devices, so run_mesh keeps whole relations per device.
    assert dict(make_mesh(3, 8).shape) == {"relation": 2, "data": 4}
    assert dict(run_mesh(3, 8).shape) == {"relation": 2, "data": 1}
    assert dict(run_mesh(13, 8).shape) == {"relation": 8, "data": 1}  # 3 inert slots
    assert dict(run_mesh(16, 8).shape) == {"relation": 8, "data": 1}
    assert dict(run_mesh(6, 8, relation_parallelism=2).shape) == {"relation": 2, "data": 1}


def test_activation_bytes_is_the_widest_activation_of_a_relations_batch():
    mib = 2**20
    # Small config, 16 prompts of 16 tokens: the FFN's 512 floats per row, 512 KiB per relation.
    assert activation_bytes(16 * 16, 512, 128, jnp.float32) == mib // 2
    assert activation_bytes(16 * 16, 512, 128, jnp.bfloat16) == mib // 4
    assert transient_bytes_per_relation(1000, mib, 2) == 24 * 1000 + 16 * mib


def test_run_relation_chunk_takes_a_requested_chunk_as_is():
    mesh = run_mesh(8, 16)
    assert run_relation_chunk(3, 8, mesh) == 3
    assert run_relation_chunk(0, 8, mesh) is None  # no budget given: all at once


def test_memory_relation_chunk_takes_the_largest_divisor_that_fits():
    gib = 2**30
    assert memory_relation_chunk(16, gib, 16 * gib) is None  # all fit
    assert memory_relation_chunk(16, gib, 8 * gib) == 8
    assert memory_relation_chunk(16, gib, 4 * gib) == 4
    assert memory_relation_chunk(12, gib, 5 * gib) == 4  # a divisor
    assert memory_relation_chunk(13, gib, 10 * gib) == 1  # prime: one at a time
    assert memory_relation_chunk(16, 10 * gib, gib) == 1  # not even one: still one
    # The smaller of the cache's and the memory's choice; a requested chunk is taken as is.
    relations = 2 * len(jax.devices())  # two per device
    mesh = run_mesh(relations, 16)
    assert run_relation_chunk(0, relations, mesh, per_relation_bytes=gib, budget=gib) == 1
    assert run_relation_chunk(0, relations, mesh, per_relation_bytes=gib, budget=2 * gib) is None
    assert run_relation_chunk(3, relations, mesh, per_relation_bytes=gib, budget=gib) == 3
    # A large state bounds a device's budget to a quarter of the state it holds; a small one
    # leaves 80% of the free memory (on a CPU, the host's available memory per device).
    assert transient_budget(mesh, 8 * gib * mesh.shape["relation"]) <= 2 * gib
    assert transient_budget(mesh, 2**20) > 2**20


def test_budget_for_holds_large_states_to_a_quarter_of_their_size():
    gib = 2**30
    assert budget_for(100 * gib, 8 * gib, relation_shards=2) == gib  # 4 GiB per device / 4
    assert budget_for(100 * gib, 8 * gib) == 2 * gib
    assert budget_for(gib, 8 * gib) == int(0.8 * gib)  # free memory is the tighter bound
    assert budget_for(10 * gib, gib // 2) == int(0.8 * 10 * gib)  # small state: speed first


def test_map_relations_can_write_new_values_into_its_first_argument():
    values = jnp.arange(8 * 3.0).reshape(8, 3)
    other = jnp.arange(8.0)
    for chunk, shards in ((None, 1), (2, 1), (3, 2), (1, 2)):
        (new_values, new_other), out = map_relations(
            lambda own, o: ((own[0] * 2 + own[1], own[1] + 1), own[0].sum() + o), chunk, shards,
            update_first_argument=True)((values, other), other)
        np.testing.assert_array_equal(new_values, values * 2 + other[:, None])
        np.testing.assert_array_equal(new_other, other + 1)
        np.testing.assert_array_equal(out, values.sum(1) + other)


@pytest.mark.parametrize("relations,chunk,shards", [(6, 2, 2), (8, 2, 2), (8, 3, 2), (6, 4, 1)])
def test_map_relations_returns_every_relation_in_order(relations, chunk, shards):
    values = jnp.arange(relations * 3.0).reshape(relations, 3)
    got = map_relations(lambda x: (x * x, x.sum()), chunk, shards)(values)
    np.testing.assert_array_equal(got[0], values * values)
    np.testing.assert_array_equal(got[1], values.sum(1))
    with pytest.raises(ValueError, match="equal shards"):
        map_relations(jnp.sum, chunk, 2)(jnp.ones((relations + 1, 2)))


def test_prefix_split_over_devices_equals_one_device():
    params = init_params(CONFIG, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(5, CONFIG.vocab_size, (13, 8)).astype(np.int32)
    mask = (np.arange(8) < rng.integers(3, 9, (13, 1))).astype(np.int32)
    one = prefix_hidden_states(params, ids, mask, model_config=CONFIG, stop_layer=1, chunk=4)
    mesh = make_mesh(6, 4, jax.devices()[:6], relation_parallelism=3)  # 3 x 2 devices
    # Chunks of 4 rows round up to 6 (one row per device); 13 rows: 3 chunks, the last padded.
    split = prefix_hidden_states(replicate(params, mesh), ids, mask, model_config=CONFIG,
                                 stop_layer=1, chunk=4, mesh=mesh)
    np.testing.assert_allclose(split, one, atol=1e-6)


def test_a_run_with_a_large_state_says_which_faster_chunk_would_fit():
    from lamp_jax.placement import relation_chunk_for

    mesh = run_mesh(2 * len(jax.devices()), 16)  # two relations per device
    said = []
    # 0.1 GiB per relation; a state of 0.5 GiB per device (1 GiB or more in all) leaves each
    # device's transients 128 MiB: one relation at a time.
    mask_params, state = 2**30 // 10 // 24, 2**29 * max(2, len(jax.devices()))
    per_relation = step_transient_bytes(CONFIG, 16, 8, mask_params, jnp.float32)
    chunk = relation_chunk_for(0, 2 * len(jax.devices()), mesh, per_relation, state,
                               log=said.append)
    assert chunk == 1
    assert len(said) == 1 and "--config.relation_chunk=2 fits in free memory" in said[0]
    said.clear()  # asked for: taken as is, nothing to say
    assert relation_chunk_for(2, 2 * len(jax.devices()), mesh, per_relation, state,
                              log=said.append) == 2 and not said


def test_an_accelerator_takes_all_relations_at_once_when_xlas_plan_fits(monkeypatch):
    """On an accelerator the memory-first chunk gives way to all relations at once when XLA's
    own plan of that step fits in the free memory. Run here on CPU devices presented as an
    accelerator, with the estimate's budget shrunk so that it asks for a chunk."""
    from lamp_jax import placement
    from lamp_jax.configs import default
    from lamp_jax.setup import setup_training

    said: list[str] = []
    assert placement.fastest_fitting_chunk(1, lambda: 10, 100, said.append) is None
    assert placement.fastest_fitting_chunk(1, lambda: 90, 100, said.append) == 1
    assert placement.fastest_fitting_chunk(None, lambda: 1 / 0, 100) is None  # no plan asked
    assert "all relations at once" in said[0] and "memory first" in said[1]

    config = default.get_config()
    config.epochs, config.data.relations = 1, ("AtLocation", "IsA", "MadeOf", "PartOf")
    monkeypatch.setattr(placement, "transient_budget", lambda *args, **kwargs: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    plans: list[int] = []
    real_plan = placement.planned_peak_bytes
    monkeypatch.setattr(placement, "planned_peak_bytes",
                        lambda *args: plans.append(real_plan(*args)) or plans[-1])
    run = setup_training(config, log=said.append)
    # XLA's plan holds at least the state and the frozen weights, and fits easily here.
    frozen = sum(x.nbytes for x in jax.tree.leaves(run.mlm.params))
    assert len(plans) == 1 and plans[0] > run.state_bytes / run.mesh.shape["relation"] + frozen
    assert run.chunk is None and any("all relations at once: XLA plans" in s for s in said)
    state = run.init_state(log=lambda *_: None)
    state, _ = run.step_fn(state, run.frozen, run.train_batch(0), run.learning_rate)
    assert int(state.step) == 1  # the planned step runs
