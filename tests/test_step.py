"""The vmapped multi-relation step: equivalence with per-relation runs, devices, learning."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits, sparsity_stats
from lamp_jax.models import ModelConfig, init_params, mlm_forward
from lamp_jax.optim import (
    OptimConfig,
    clip_by_global_norm,
    learning_rate,
    linear_warmup_decay,
    make_optimizer,
    max_logit_travel,
    round_to_bfloat16,
    scale_by_adam,
)
from lamp_jax.placement import (
    make_mesh,
    place_state,
    relation_slots,
    replicate,
    shard_batch,
    state_shardings,
)
from lamp_jax.prefix import _jitted_encoder, batch_prefix_hidden_states, prefix_hidden_states
from lamp_jax.ranking import batch_rank_stats, evaluate, make_rank_fn
from lamp_jax.setup import threshold_warning
from lamp_jax.step import (
    LossConfig,
    init_train_state,
    jit_train_step,
    relation_loss,
    train_step,
)
from tests import by_hand

CONFIG = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
SPEC = MaskSpec.create(CONFIG, first_layer=0)


@pytest.fixture(scope="module")
def frozen():
    return init_params(CONFIG, jax.random.key(0))


def synthetic_batch(num_relations, batch_size, seq_len=8, seed=0, empty=()):
    """Random prompts with one [MASK] (id 4) each; relations in ``empty`` have no data."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, CONFIG.vocab_size, (num_relations, batch_size, seq_len)).astype(np.int32)
    lengths = rng.integers(4, seq_len + 1, (num_relations, batch_size))
    attention = (np.arange(seq_len) < lengths[..., None]).astype(np.int32)
    ids = np.where(attention == 1, ids, 0)
    mask_pos = rng.integers(1, 4, (num_relations, batch_size)).astype(np.int32)
    np.put_along_axis(ids, mask_pos[..., None], 4, axis=-1)
    weight = np.ones((num_relations, batch_size), np.float32)
    weight[:, -1] = 0.0  # a padding row in every relation
    for r in empty:
        weight[r] = 0.0
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "mask_pos": mask_pos,
        # Each relation has its own "answer" rule so the relations really differ.
        "obj_id": ((np.arange(num_relations)[:, None] * 7 + ids[..., 5]) % 40 + 5).astype(np.int32),
        "weight": weight,
    }


NORMAL_INIT = MaskInit("normal", value=1.0, std=1.0)


def _state(frozen, num_relations, init=NORMAL_INIT, total=10):
    logits = init_mask_logits(SPEC, frozen, num_relations, init, MaskMode(), jax.random.key(1))
    # Adam turns float noise in near-zero gradients into full-size steps; a larger epsilon keeps
    # the comparisons below about the algorithm rather than about summation order.
    optim = OptimConfig(learning_rate=0.05, warmup_fraction=0.3, clip_norm=0.05, eps=1e-3)
    return init_train_state(logits, make_optimizer(optim), total, jax.random.key(2)), optim


@pytest.mark.parametrize("scale", [0.1, 10.0])  # global norm below and above the limit
def test_clip_by_global_norm_matches_optax(scale):
    grads = {"a": jnp.arange(6.0).reshape(2, 3) * scale, "b": -jnp.ones(4) * scale}
    ours, optax_clip = clip_by_global_norm(5.0), optax.clip_by_global_norm(5.0)
    got, state = ours.update(grads, ours.init(grads))
    want, want_state = optax_clip.update(grads, optax_clip.init(grads))
    assert jax.tree.structure(state) == jax.tree.structure(want_state)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert np.isclose(float(optax.global_norm(got)), min(5.0, float(optax.global_norm(grads))))


def test_schedule_is_linear_warmup_then_linear_decay():
    lr = linear_warmup_decay(jnp.arange(12), jnp.full(12, 10), 1.0, 0.2)
    # Warmup of 2 updates; the 10th and last update (count 9) still has a non-zero rate.
    np.testing.assert_allclose(lr, [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125,
                                    0.0, 0.0])


@pytest.mark.parametrize("peak", [0.05, 0.02])  # the config's; another one given to the step
def test_vmapped_step_equals_separate_single_relation_steps(frozen, peak):
    """Reference: plain optax (clip + Adam) on each relation alone, lr by the formula, peaking
    at the learning rate the step is given."""
    loss = LossConfig(MaskMode("deterministic"))
    num_relations, steps = 3, 3
    state, optim = _state(frozen, num_relations, total=[10, 6, 8])
    batches = [synthetic_batch(num_relations, 6, seed=s, empty=(1,) if s == 1 else ())
               for s in range(steps)]
    step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim)
    initial = jax.tree.map(np.asarray, state.mask_logits)
    for batch in batches:
        state, metrics = step(state, frozen, batch, jnp.float32(peak))
    assert metrics["grad_norm"].min() > optim.clip_norm  # clipping was active
    np.testing.assert_array_equal(state.relation_steps, [3, 2, 3])

    grad = jax.jit(jax.grad(lambda x, b: relation_loss(x, frozen, b, None, model_config=CONFIG,
                                                       loss_config=loss)[0]))
    for r, total in enumerate([10, 6, 8]):
        g = jax.tree.map(lambda x, r=r: jnp.asarray(x[r]), initial)
        tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm),
                         optax.scale_by_adam(eps=optim.eps))
        opt_state, count = tx.init(g), 0
        for batch in batches:
            batch_r = {k: v[r] for k, v in batch.items()}
            if batch_r["weight"].sum() == 0:
                continue
            grads = grad(g, batch_r)
            updates, opt_state = tx.update(grads, opt_state)
            warmup = np.ceil(0.3 * total)
            decay = (total - count) / (total - warmup)
            lr = peak * ((count + 1) / warmup if count < warmup else decay)
            g = jax.tree.map(lambda p, u, lr=lr: p - lr * u, g, updates)
            count += 1
        for got, want in zip(jax.tree.leaves(state.mask_logits), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(got[r], want, atol=1e-5)


def test_inactive_relation_is_untouched(frozen):
    state, optim = _state(frozen, 2)
    before = state  # jitted without donation, so the old state stays readable
    step = jax.jit(lambda s, b: train_step(s, frozen, b, optim.learning_rate,
                                           model_config=CONFIG, loss_config=LossConfig(),
                                           optim_config=optim))
    new, metrics = step(state, synthetic_batch(2, 4, empty=(0,)))
    for old, cur in zip(jax.tree.leaves(before.mask_logits), jax.tree.leaves(new.mask_logits),
                        strict=True):
        np.testing.assert_array_equal(cur[0], old[0])
        assert np.abs(cur[1] - old[1]).max() > 0
    for old, cur in zip(jax.tree.leaves(before.opt_state), jax.tree.leaves(new.opt_state),
                        strict=True):
        np.testing.assert_array_equal(cur[0], old[0])
    np.testing.assert_array_equal(new.relation_steps, [0, 1])
    assert float(metrics["lr"][0]) == 0.0 and float(metrics["count"][0]) == 0.0


def test_cached_frozen_prefix_gives_the_same_steps(frozen):
    """Masks on layer 1 only: starting every step from the cached output of layer 0 gives the
    same updates and metrics as running the whole model."""
    spec = MaskSpec.create(CONFIG, first_layer=1)
    logits = init_mask_logits(spec, frozen, 3, NORMAL_INIT, MaskMode(), jax.random.key(1))
    optim = OptimConfig(learning_rate=0.05, clip_norm=0.05, eps=1e-3)
    batches = [synthetic_batch(3, 6, seed=s) for s in range(3)]
    states = {}
    for start in (0, 1):
        state = init_train_state(jax.tree.map(jnp.copy, logits), make_optimizer(optim), 10,
                                 jax.random.key(2))  # a copy: the step donates its state
        step = jit_train_step(model_config=CONFIG, optim_config=optim, loss_config=LossConfig(
            MaskMode("deterministic"), start_layer=start))
        for batch in batches:
            if start:
                batch = dict(batch, hidden=batch_prefix_hidden_states(
                    frozen, batch, model_config=CONFIG, stop_layer=1, chunk=8))  # 8, 8, 2 + pad
            state, metrics = step(state, frozen, batch, optim.learning_rate)
        states[start] = state, metrics
    (full, full_metrics), (cached, cached_metrics) = states[0], states[1]
    np.testing.assert_allclose(cached_metrics["loss"], full_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.mask_logits), jax.tree.leaves(cached.mask_logits),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # A mask below the cached prefix would be silently skipped: refused instead.
    below = init_mask_logits(SPEC, frozen, 3, NORMAL_INIT, MaskMode(), jax.random.key(1))
    with pytest.raises(ValueError, match="layer 0 is masked"):
        relation_loss(jax.tree.map(lambda g: g[0], below), frozen, batches[0], None,
                      model_config=CONFIG, loss_config=LossConfig(start_layer=1))


def test_evaluation_from_the_cached_prefix_gives_the_same_ranks(frozen):
    spec = MaskSpec.create(CONFIG, first_layer=1)
    logits = init_mask_logits(spec, frozen, 3, NORMAL_INIT, MaskMode(), jax.random.key(1))
    batch = synthetic_batch(3, 6, seed=4)
    cached = dict(batch, hidden=batch_prefix_hidden_states(frozen, batch, model_config=CONFIG,
                                                           stop_layer=1))
    for masks in (logits, None):
        want = batch_rank_stats(masks, frozen, batch, model_config=CONFIG,
                                mode=MaskMode("threshold"))
        got = make_rank_fn(CONFIG, MaskMode("threshold"), start_layer=1)(masks, frozen, cached)
        np.testing.assert_array_equal(got["rank"], want["rank"])
        np.testing.assert_array_equal(got["hits"], want["hits"])


# Uneven chunks leave a shorter last chunk; a divisor runs the loop only.
@pytest.mark.parametrize("relations,chunk", [(5, 2), (5, 3), (6, 3)])
def test_relation_chunks_equal_one_vmap(frozen, relations, chunk):
    loss = LossConfig(MaskMode("stochastic", tau=0.5))
    state, optim = _state(frozen, relations)
    batch = synthetic_batch(relations, 4)
    plain = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim)
    chunked = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim,
                             relation_chunk=chunk)
    a, ma = plain(state, frozen, batch, optim.learning_rate)
    state2, _ = _state(frozen, relations)
    b, mb = chunked(state2, frozen, batch, optim.learning_rate)
    for x, y in zip(jax.tree.leaves(a.mask_logits), jax.tree.leaves(b.mask_logits), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)


@pytest.mark.parametrize("relation_parallelism", [8, 2])
def test_eight_devices_equal_one_device(frozen, relation_parallelism):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    loss = LossConfig(MaskMode("stochastic", tau=0.5), sparsity_weight=0.1)
    num_relations, batch_size = 8, 8
    batches = [synthetic_batch(num_relations, batch_size, seed=s) for s in range(3)]
    results = []
    for devices, rel in ((jax.devices()[:1], 1), (jax.devices(), relation_parallelism)):
        mesh = make_mesh(num_relations, batch_size, devices, relation_parallelism=rel)
        state, optim = _state(frozen, num_relations)
        state = place_state(state, mesh)
        step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim,
                              state_sharding=state_shardings(state, mesh))
        params = replicate(frozen, mesh)
        for batch in batches:
            state, metrics = step(state, params, shard_batch(batch, mesh), optim.learning_rate)
        results.append((state, metrics))
    (one, m1), (many, m8) = results
    leaf = jax.tree.leaves(many.mask_logits)[0]
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.spec[0] == "relation"
    for x, y in zip(jax.tree.leaves(one.mask_logits), jax.tree.leaves(many.mask_logits),
                    strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-5)


# Chunks take relations from every device's block, so devices never wait for one another and
# never exchange data (uneven: 3 relations per device in chunks of 2; even: 4 in chunks of 2).
@pytest.mark.parametrize("relations", [6, 8])
def test_relation_chunks_keep_every_device_busy_without_communication(frozen, relations):
    loss = LossConfig(MaskMode("stochastic", tau=0.5))
    batch = synthetic_batch(relations, 4)
    state, optim = _state(frozen, relations)
    want, want_metrics = jit_train_step(model_config=CONFIG, loss_config=loss,
                                        optim_config=optim)(state, frozen, batch,
                                                            optim.learning_rate)
    mesh = make_mesh(relations, 4, jax.devices()[:2], relation_parallelism=2)
    state, _ = _state(frozen, relations)
    state = place_state(state, mesh)
    step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim,
                          relation_chunk=2, state_sharding=state_shardings(state, mesh))
    args = (state, replicate(frozen, mesh), shard_batch(batch, mesh), optim.learning_rate)
    hlo = step.lower(*args).compile().as_text()
    assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute", hlo)
    got, got_metrics = step(*args)
    for x, y in zip(jax.tree.leaves(want.mask_logits), jax.tree.leaves(got.mask_logits),
                    strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    np.testing.assert_allclose(want_metrics["loss"], got_metrics["loss"], rtol=1e-6)


def test_mesh_shapes_and_errors():
    assert dict(make_mesh(16, 32).shape) == {"relation": 8, "data": 1}
    assert dict(make_mesh(2, 6).shape) == {"relation": 2, "data": 2}  # 4 of 8 devices fit
    # 3 relations: the largest device divisor <= 3 is 2 (one inert slot), batches over 4.
    assert dict(make_mesh(3, 8).shape) == {"relation": 2, "data": 4}
    assert dict(make_mesh(13, 8).shape) == {"relation": 8, "data": 1}
    assert relation_slots(13, make_mesh(13, 8)) == 16
    assert relation_slots(6, make_mesh(6, 8, jax.devices(), relation_parallelism=4)) == 8
    with pytest.raises(ValueError, match="must divide the device count"):
        make_mesh(6, 8, jax.devices(), relation_parallelism=3)


# Measured (CPU, this config; loss of the thresholded subnetwork after 50 steps / first loss):
# stochastic 2.35/4.11 and 2.12/4.34; deterministic 0.94/4.28 and 1.10/4.22 (both STE variants).
@pytest.mark.parametrize("mode,bound", [(MaskMode("stochastic", tau=0.5), 0.7),
                                        (MaskMode("deterministic"), 0.35),
                                        (MaskMode("deterministic", ste_grad="sigmoid"), 0.35)])
def test_fifty_steps_reduce_the_loss(frozen, mode, bound):
    state, _ = _state(frozen, 2, total=50)
    optim = OptimConfig(learning_rate=0.1, warmup_fraction=0.1, clip_norm=5.0)
    step = jit_train_step(model_config=CONFIG, loss_config=LossConfig(mode), optim_config=optim)
    batch = synthetic_batch(2, 8)
    first = None
    for _ in range(50):
        state, metrics = step(state, frozen, batch, optim.learning_rate)
        first = metrics["ce"] if first is None else first
    inference = LossConfig(mode.for_inference("threshold"))
    final_loss = jax.jit(jax.vmap(lambda g, b: relation_loss(
        g, frozen, b, None, model_config=CONFIG, loss_config=inference)[0]))
    final = final_loss(state.mask_logits, batch)
    assert np.all(np.asarray(final) < bound * np.asarray(first))
    stats = sparsity_stats(state.mask_logits, SPEC)
    assert set(stats) == {f"layer_{i}/{m}" for i in (0, 1) for m in SPEC.matrices} | {"total"}
    assert all(0.0 < s < 1.0 for s in stats["total"])


def test_a_run_compiles_each_shape_once(frozen):
    # The same configuration gets the same jitted ranking function (dev evaluation and the final
    # report share its compilation) ...
    threshold, expectation = MaskMode("threshold"), MaskMode("expectation")
    assert make_rank_fn(CONFIG, threshold) is make_rank_fn(CONFIG, MaskMode("threshold"))
    assert make_rank_fn(CONFIG, threshold) is not make_rank_fn(CONFIG, expectation)
    # ... and sets smaller than a prefix chunk are padded to it, so they share one executable,
    # and their rows come out as encoded alone.
    encoder = _jitted_encoder(CONFIG, 1, jnp.dtype(jnp.float32))
    batch = synthetic_batch(1, 7)
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    before = encoder._cache_size()
    small = prefix_hidden_states(frozen, ids[:3], mask[:3], model_config=CONFIG, stop_layer=1,
                                 chunk=16)
    larger = prefix_hidden_states(frozen, ids, mask, model_config=CONFIG, stop_layer=1, chunk=16)
    assert encoder._cache_size() - before <= 1
    np.testing.assert_allclose(small, larger[:3], atol=1e-6)


def test_thirteen_relations_use_all_eight_devices_and_equal_one_device(frozen):
    """13 relations on 8 devices: 16 slots, 3 inert. Every device holds 2 relations; the real
    relations train and rank exactly as on one device; the inert ones are never updated."""
    loss = LossConfig(MaskMode("stochastic", tau=0.5))
    num, batch_size = 13, 4
    batches = [synthetic_batch(num, batch_size, seed=s) for s in range(3)]
    state, optim = _state(frozen, num)
    step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim)
    for batch in batches:
        state, metrics = step(state, frozen, batch, optim.learning_rate)
    want_stats = make_rank_fn(CONFIG, MaskMode("deterministic"))(state.mask_logits, frozen,
                                                                  batches[0])

    mesh = make_mesh(num, batch_size, split_batches=False)
    slots = relation_slots(num, mesh)
    assert dict(mesh.shape) == {"relation": 8, "data": 1} and slots == 16
    padded, _ = _state(frozen, num)
    padded = padded.replace(
        mask_logits=jax.tree.map(lambda g: jnp.pad(g, [(0, slots - num)] + [(0, 0)] * (g.ndim - 1)),
                                 padded.mask_logits),
        opt_state=jax.tree.map(lambda x: jnp.pad(x, [(0, slots - num)] + [(0, 0)] * (x.ndim - 1))
                               if x.ndim else x, padded.opt_state),
        relation_steps=jnp.zeros(slots, jnp.int32), total_steps=jnp.full(slots, 10, jnp.int32))
    padded = place_state(padded, mesh)
    inert_before = np.asarray(jax.tree.leaves(padded.mask_logits)[0][num:])
    step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim,
                          state_sharding=state_shardings(padded, mesh))
    params = replicate(frozen, mesh)
    for batch in batches:
        padded, padded_metrics = step(padded, params, shard_batch(batch, mesh, slots),
                                      optim.learning_rate)
    leaf = jax.tree.leaves(padded.mask_logits)[0]
    assert len(leaf.sharding.device_set) == 8
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}
    for x, y in zip(jax.tree.leaves(state.mask_logits), jax.tree.leaves(padded.mask_logits),
                    strict=True):
        np.testing.assert_allclose(np.asarray(y)[:num], x, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(leaf)[num:], inert_before)  # never updated
    np.testing.assert_array_equal(np.asarray(padded.relation_steps)[num:], 0)
    np.testing.assert_allclose(np.asarray(padded_metrics["loss"])[:num], metrics["loss"],
                               rtol=1e-5)
    # Evaluation on the padded layout counts only the real relations, and equals one device.
    rank_fn = make_rank_fn(CONFIG, MaskMode("deterministic"), relation_shards=8)
    got = evaluate(rank_fn, padded.mask_logits, params, [batches[0]], [f"r{i}" for i in range(num)],
                   put_batch=lambda b: shard_batch(b, mesh, slots))
    np.testing.assert_array_equal(got.count, np.asarray(want_stats["count"]))
    np.testing.assert_array_equal(got.hits, np.asarray(want_stats["hits"]))


def test_bfloat16_moments_follow_float32_adam_and_take_two_thirds_of_the_state():
    params = {"w": jnp.zeros((64, 32))}
    grads = [jax.random.normal(jax.random.key(i), (64, 32)) * (1 + i) for i in range(30)]
    wide, narrow = scale_by_adam(0.9, 0.999, 1e-8), scale_by_adam(0.9, 0.999, 1e-8, jnp.bfloat16)
    # float32 storage is optax's transform itself.
    state_wide, state_narrow = wide.init(params), narrow.init(params)
    assert isinstance(state_wide, optax.ScaleByAdamState)
    for g in grads:
        u_wide, state_wide = wide.update({"w": g}, state_wide)
        u_narrow, state_narrow = narrow.update({"w": g}, state_narrow)
        # Each update: Adam's direction to bfloat16 precision of the moments, not exactly.
        np.testing.assert_allclose(u_narrow["w"], u_wide["w"], rtol=0.05, atol=0.02)
    assert not np.array_equal(u_narrow["w"], u_wide["w"])
    assert state_narrow.mu["w"].dtype == state_narrow.nu["w"].dtype == jnp.bfloat16
    assert int(state_narrow.count) == len(grads)
    logits = init_mask_logits(SPEC, init_params(CONFIG, jax.random.key(0)), 2, MaskInit(),
                              MaskMode(), jax.random.key(1))
    size = {dtype: sum(x.nbytes for x in jax.tree.leaves((logits, jax.vmap(make_optimizer(
        OptimConfig(moment_dtype=dtype)).init)(logits)))) for dtype in ("float32", "bfloat16")}
    logit_bytes = sum(x.nbytes for x in jax.tree.leaves(logits))
    assert size["float32"] == 3 * logit_bytes + 8 and size["bfloat16"] == 2 * logit_bytes + 8


def test_a_donated_chunked_step_updates_the_state_in_place(frozen):
    """XLA's plan of the step: the new state is written into the donated old one, and the
    temporaries are those of one chunk of relations, not a second state (the conditional in
    map_relations; without it XLA:CPU copied the whole state once per step)."""
    relations = 8
    state, optim = _state(frozen, relations)
    batch = synthetic_batch(relations, 4)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.mask_logits, state.opt_state)))
    plans = {}
    for chunk in (1, 2):
        step = jit_train_step(model_config=CONFIG, loss_config=LossConfig(MaskMode("stochastic")),
                              optim_config=optim, relation_chunk=chunk, donate=True)
        plans[chunk] = step.lower(state, frozen, batch,
                                  optim.learning_rate).compile().memory_analysis()
        assert plans[chunk].alias_size_in_bytes >= state_bytes
    per_relation = plans[2].temp_size_in_bytes - plans[1].temp_size_in_bytes
    assert 0 < per_relation < state_bytes / relations * 4
    assert plans[1].temp_size_in_bytes < state_bytes / 2


def _numpy_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_adamw_steps_equal_numpy_adam_with_decoupled_weight_decay(frozen):
    """Three steps of two relations against clip -> Adam (bias-corrected) -> + decay * G, times
    the schedule's rate, written in numpy; only each step's CE gradient comes from JAX."""
    loss = LossConfig(MaskMode("deterministic"))
    optim = OptimConfig(learning_rate=0.05, warmup_fraction=0.2, clip_norm=0.05,
                        weight_decay=0.1, eps=1e-3)
    logits = init_mask_logits(SPEC, frozen, 2, NORMAL_INIT, MaskMode(), jax.random.key(1))
    initial = _numpy_tree(logits)
    state = init_train_state(logits, make_optimizer(optim), 10, jax.random.key(2))
    step = jit_train_step(model_config=CONFIG, loss_config=loss, optim_config=optim,
                          donate=False)
    batches = [synthetic_batch(2, 6, seed=s) for s in range(3)]
    for batch in batches:
        state, _ = step(state, frozen, batch, optim.learning_rate)

    ce_grad = jax.jit(jax.grad(lambda g, b: relation_loss(
        g, frozen, b, None, model_config=CONFIG, loss_config=loss)[0]))

    def reference(r, decay):
        theta = jax.tree.map(lambda x: x[r], initial)
        m = jax.tree.map(np.zeros_like, theta)
        v = jax.tree.map(np.zeros_like, theta)
        for t, batch in enumerate(batches):
            batch_r = {k: x[r] for k, x in batch.items()}
            grad = _numpy_tree(ce_grad(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta),
                                       batch_r))
            norm = np.sqrt(sum(np.sum(x ** 2) for x in jax.tree.leaves(grad)))
            scale = min(1.0, 0.05 / norm)  # clipping by the relation's global norm
            grad = jax.tree.map(lambda x, scale=scale: x * scale, grad)
            m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grad)
            v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g ** 2, v, grad)
            # 10 updates, warmup ceil(0.2 * 10) = 2: rates 0.025, 0.05, then 0.05 * (10 - t) / 8.
            lr = 0.05 * ((t + 1) / 2 if t < 2 else (10 - t) / 8)
            theta = jax.tree.map(
                lambda p, a, b, t=t, lr=lr: p - lr * (
                    (a / (1 - 0.9 ** (t + 1))) / (np.sqrt(b / (1 - 0.999 ** (t + 1))) + 1e-3)
                    + decay * p), theta, m, v)
        return theta

    for r in range(2):
        want, without_decay = reference(r, 0.1), reference(r, 0.0)
        for got, w, plain in zip(jax.tree.leaves(state.mask_logits), jax.tree.leaves(want),
                                 jax.tree.leaves(without_decay), strict=True):
            np.testing.assert_allclose(got[r], w, atol=1e-5)
            assert np.abs(w - plain).max() > 1e-3  # the decay is far above the tolerance


def test_the_sparsity_penalty_enters_the_loss_its_gradient_and_the_step(frozen):
    # Deterministic masks compile faster; the formula's dependence on tau and the threshold is
    # tested in test_masks.py.
    mode = MaskMode("deterministic")
    weight, target = 1000.0, 0.6
    logits = init_mask_logits(SPEC, frozen, 2, NORMAL_INIT, mode, jax.random.key(1))
    batch = synthetic_batch(2, 6)
    with_penalty = LossConfig(mode, sparsity_weight=weight, target_sparsity=target)

    def density_by_hand(tree):
        # The smooth stand-in of 1[sigmoid(G) > 0.5]: sigmoid(G - logit(0.5)) = sigmoid(G).
        s = np.concatenate([by_hand.sigmoid(x).ravel() for x in jax.tree.leaves(tree)])
        return s.mean(), s

    def loss_and_ce(g, b):
        return relation_loss(g, frozen, b, None, model_config=CONFIG, loss_config=with_penalty)

    @jax.jit
    def gradients(g, b):
        """The metrics, the gradient of the loss and that of its cross-entropy alone."""
        (_, metrics), grad = jax.value_and_grad(loss_and_ce, has_aux=True)(g, b)
        return metrics, grad, jax.grad(lambda x: loss_and_ce(x, b)[1]["ce"])(g)

    for r in range(2):
        g = jax.tree.map(lambda x, r=r: x[r], logits)
        b = {k: x[r] for k, x in batch.items()}
        got, grad, ce_grad = gradients(g, b)
        density, s = density_by_hand(g)
        assert float(got["loss"] - got["ce"]) == pytest.approx(
            weight * (density - (1 - target)) ** 2, rel=1e-4)
        penalty_grad = 2 * weight * (density - (1 - target)) * s * (1 - s) / s.size
        difference = np.concatenate([np.ravel(a - c) for a, c in zip(
            jax.tree.leaves(grad), jax.tree.leaves(ce_grad), strict=True)])
        np.testing.assert_allclose(difference, penalty_grad, rtol=1e-3, atol=1e-7)
        assert np.abs(penalty_grad).max() > 1e-3

    # Over 40 steps a heavy penalty brings the expected density from 0.66 (logits N(1, 1)) to
    # 1 - target and holds it there (measured 0.398 and 0.394); the step reports the density of
    # its new masks.
    optim = OptimConfig(learning_rate=0.1, warmup_fraction=0.0, clip_norm=None)
    state = init_train_state(logits, make_optimizer(optim), 40, jax.random.key(2))
    step = jit_train_step(model_config=CONFIG, loss_config=with_penalty, optim_config=optim)
    for _ in range(40):
        state, metrics = step(state, frozen, batch, optim.learning_rate)
    for r in range(2):
        density, _ = density_by_hand(jax.tree.map(lambda x, r=r: x[r], state.mask_logits))
        assert float(metrics["density"][r]) == pytest.approx(density, rel=1e-5)
        assert density == pytest.approx(1 - target, abs=0.03)


def _dot_dtypes(jaxpr) -> list[tuple[str, ...]]:
    """Operand dtypes of every matrix product in a jaxpr, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _dot_dtypes(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _dot_dtypes(sub)
    return found


def test_bfloat16_computes_every_product_in_bfloat16_and_stays_close_to_float32(frozen):
    batch = synthetic_batch(2, 6)
    forward = jax.jit(lambda p, ids, mask, dtype: mlm_forward(p, ids, mask, config=CONFIG,
                                                              dtype=dtype)["logits"],
                      static_argnums=3)
    args = (frozen, batch["input_ids"][0], batch["attention_mask"][0])
    logits = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        dots = _dot_dtypes(forward.trace(*args, dtype).jaxpr.jaxpr)
        assert dots and all(d == (jnp.dtype(dtype).name,) * 2 for d in dots), dots
        logits[dtype] = np.asarray(forward(*args, dtype))
    # The same float32 params: only the compute dtype differs.
    gap = np.abs(logits[jnp.bfloat16] - logits[jnp.float32]).max()
    assert logits[jnp.bfloat16].dtype == np.float32
    assert 1e-4 < gap < 0.05 * np.abs(logits[jnp.float32]).max(), gap

    # The training step: every product of its forward and backward passes in bfloat16 (none
    # in the float32 step); its loss in float32, close to the float32 loss but not equal.
    optim = OptimConfig(learning_rate=0.05, clip_norm=0.05, eps=1e-3)
    mask_logits = init_mask_logits(SPEC, frozen, 2, NORMAL_INIT, MaskMode(), jax.random.key(1))
    state = init_train_state(mask_logits, make_optimizer(optim), 10, jax.random.key(2))
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        loss = LossConfig(MaskMode("deterministic"), compute_dtype=dtype)
        traced = jax.jit(lambda s, b, loss=loss: train_step(
            s, frozen, b, optim.learning_rate, model_config=CONFIG, loss_config=loss,
            optim_config=optim)).trace(state, batch)
        dots = _dot_dtypes(traced.jaxpr.jaxpr)
        bf16 = sum(d == ("bfloat16", "bfloat16") for d in dots)
        assert len(dots) > 20 and bf16 == (len(dots) if dtype == jnp.bfloat16 else 0), dots
        losses[dtype] = np.asarray(jax.jit(jax.vmap(lambda g, b, loss=loss: relation_loss(
            g, frozen, b, None, model_config=CONFIG, loss_config=loss)[0]))(mask_logits, batch))
    assert losses[jnp.bfloat16].dtype == np.float32
    np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=2e-2)
    assert np.all(losses[jnp.bfloat16] != losses[jnp.float32])


def test_constant_schedule_and_how_far_a_logit_can_travel():
    counts, total = jnp.arange(10), jnp.full(10, 10)
    constant = OptimConfig(learning_rate=0.5, schedule="constant")
    np.testing.assert_array_equal(learning_rate(counts, total, constant), np.full(10, 0.5))
    linear = OptimConfig(learning_rate=0.5, warmup_fraction=0.2)
    np.testing.assert_array_equal(learning_rate(counts, total, linear),
                                  linear_warmup_decay(counts, total, 0.5, 0.2))
    assert max_logit_travel(10, constant) == pytest.approx(5.0)
    # Warmup 0.25, 0.5, then 1, 7/8, ..., 1/8 of 0.5: 0.375 + 2.25.
    assert max_logit_travel(10, linear) == pytest.approx(0.5 * (0.5 + 1.0 + 4.5))


def test_startup_warns_when_no_logit_can_cross_the_threshold():
    logits = {"w": np.full((3, 4, 4), 1.0, np.float32)}
    paper = OptimConfig(learning_rate=3e-4, schedule="constant")
    said = threshold_warning(logits, 3, 300, paper, threshold=0.5)
    assert "nearest starts 1 from it" in said and "at most about 0.09" in said
    assert threshold_warning(logits, 3, 300, OptimConfig(learning_rate=0.01), 0.5) is None
    near = {"w": logits["w"].copy()}
    near["w"][1, 2, 3] = 0.05  # one logit within reach
    assert threshold_warning(near, 3, 300, paper, threshold=0.5) is None
    near["w"][1, 2, 3] = 1.0
    near = {"w": np.concatenate([near["w"], np.zeros((1, 4, 4), np.float32)])}
    # An inert slot (past the real relations) at the threshold does not count.
    assert threshold_warning(near, 3, 300, paper, threshold=0.5) is not None


def test_stochastic_rounding_to_bfloat16_is_unbiased_and_exact_on_representable_values():
    x = jnp.full((20000,), 1.0 + 2.0**-10, jnp.float32)  # between bfloat16's 1 and 1 + 2^-7
    bits = jax.random.bits(jax.random.key(0), x.shape, jnp.uint32)
    rounded = round_to_bfloat16(x, bits)
    assert set(np.unique(np.asarray(rounded, np.float32))) == {1.0, 1.0 + 2.0**-7}
    # Up with probability 1/8: the mean is x (to nearest, every value would be 1.0).
    assert abs(float(jnp.mean(rounded.astype(jnp.float32))) - (1 + 2.0**-10)) < 2e-4
    exact = jnp.asarray([1.5, -0.25, 3.0, 0.0], jnp.float32)
    np.testing.assert_array_equal(round_to_bfloat16(exact, bits[:4]).astype(jnp.float32), exact)
