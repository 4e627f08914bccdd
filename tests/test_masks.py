"""Mask generators: straight-through estimator, concrete relaxation, init sparsity, application."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lamp_jax.masks import (
    MaskInit,
    MaskMode,
    MaskSpec,
    apply_masks,
    combine_masks,
    compute_masks,
    concrete_sample,
    constant_for_sparsity,
    expected_density,
    expected_initial_sparsity,
    hard_mask,
    init_mask_logits,
    sparsity_penalty,
    sparsity_stats,
    straight_through_mask,
)
from lamp_jax.models import ModelConfig, init_params, mlm_forward

CONFIG = ModelConfig(vocab_size=40, hidden_size=16, num_layers=4, num_heads=2,
                     intermediate_size=32, max_position_embeddings=16)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _batch():
    ids = jnp.array([[2, 7, 9, 11, 3, 0], [2, 5, 4, 3, 0, 0]])
    return ids, (ids != 0).astype(jnp.int32)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_straight_through_forward_is_the_hard_mask_and_backward_is_identity(threshold):
    g = jnp.array([[-2.0, -0.1, 0.0, 0.1], [0.84, 0.85, -0.85, 3.0]])
    forward = straight_through_mask(g, threshold, "identity")
    by_hand = (jax.nn.sigmoid(g) > threshold).astype(jnp.float32)
    np.testing.assert_array_equal(forward, by_hand)
    c = jnp.arange(8.0).reshape(2, 4) - 3.0
    grad = jax.grad(lambda x: jnp.sum(c * straight_through_mask(x, threshold, "identity") ** 2))(g)
    # d/dm sum(c m^2) = 2 c m, passed to G unchanged.
    np.testing.assert_allclose(grad, 2 * c * by_hand)


def test_straight_through_sigmoid_variant_scales_by_sigmoid_derivative():
    g = jnp.linspace(-3, 3, 7)
    grad = jax.grad(lambda x: jnp.sum(3.0 * straight_through_mask(x, 0.5, "sigmoid")))(g)
    s = 1 / (1 + np.exp(-np.asarray(g)))
    np.testing.assert_allclose(grad, 3.0 * s * (1 - s), rtol=1e-6)


def test_smooth_masks_have_correct_gradients():
    g = jnp.array([[-1.0, 0.3], [0.7, 2.0]])
    rng = jax.random.key(3)
    check_grads(lambda x: concrete_sample(x, rng, 0.5), (g,), order=2, modes=["rev", "fwd"])
    check_grads(lambda x: compute_masks({"k": x}, MaskMode("expectation"))["k"], (g,), order=2)


def test_concrete_samples_approach_bernoulli_as_tau_shrinks():
    g = jnp.array([-2.0, -0.5, 0.0, 1.0, 2.95])
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = jax.vmap(lambda k: concrete_sample(g, k, 0.01))(keys)
    np.testing.assert_allclose(draws.mean(0), jax.nn.sigmoid(g), atol=0.015)
    assert float(jnp.mean((draws > 0.02) & (draws < 0.98))) < 0.02  # nearly binary
    again = jax.vmap(lambda k: concrete_sample(g, k, 0.01))(keys)
    np.testing.assert_array_equal(draws, again)


@pytest.mark.parametrize("value,expected", [(0.0, 0.5), (1.0, 0.2689), (2.95, 0.0497)])
def test_reference_init_constants_give_documented_sparsity(value, expected):
    mode = MaskMode("stochastic", tau=0.1)
    assert expected_initial_sparsity(MaskInit("constant", value=value), mode) == pytest.approx(
        expected, abs=1e-3)
    g = jnp.full((200_000,), value)
    sample = concrete_sample(g, jax.random.key(1), 0.1)
    assert float(jnp.mean(sample < 0.5)) == pytest.approx(expected, abs=0.005)
    assert constant_for_sparsity(expected, mode) == pytest.approx(value, abs=2e-3)


@pytest.mark.parametrize("kind", ["stochastic", "deterministic"])
def test_target_init_hits_the_target_sparsity(params, kind):
    mode = MaskMode(kind, tau=0.5)
    spec = MaskSpec.create(CONFIG)
    init = MaskInit("target", sparsity=0.3, std=0.0 if kind == "stochastic" else 1.0)
    logits = init_mask_logits(spec, params, 2, init, mode, jax.random.key(0))
    masks = compute_masks(logits, mode, jax.random.key(1))
    zeros = sum(float(jnp.sum(m < 0.5)) for m in jax.tree.leaves(masks))
    total = sum(m.size for m in jax.tree.leaves(masks))
    assert zeros / total == pytest.approx(0.3, abs=0.01)


def test_normal_and_uniform_init_sparsity_matches_samples():
    mode = MaskMode("stochastic", tau=0.2)
    for init in (MaskInit("normal", value=0.5, std=1.0), MaskInit("uniform", low=-1, high=2)):
        spec = MaskSpec((0,), ("ffn_in",))
        big = {"layer_0": {"ffn_in": {"kernel": jnp.zeros((400, 500))}}}
        logits = init_mask_logits(spec, big, 1, init, mode, jax.random.key(0))
        sample = compute_masks(logits, mode, jax.random.key(1))
        measured = float(jnp.mean(jax.tree.leaves(sample)[0] < 0.5))
        assert measured == pytest.approx(expected_initial_sparsity(init, mode), abs=0.005)


def test_deterministic_constant_target_is_refused(params):
    with pytest.raises(ValueError, match="std > 0"):
        init_mask_logits(MaskSpec.create(CONFIG), params, 1, MaskInit("target", std=0.0),
                         MaskMode("deterministic"), jax.random.key(0))


def test_mask_spec_paths_and_errors():
    spec = MaskSpec.create(CONFIG, matrices=("query", "ffn_out"))
    assert spec.layers == (2, 3)
    assert spec.paths()[:2] == [("layer_2", "attention", "query", "kernel"),
                                ("layer_2", "ffn_out", "kernel")]
    with pytest.raises(ValueError, match="not within the model's 0..3"):
        MaskSpec.create(CONFIG, first_layer=2, last_layer=4)
    with pytest.raises(ValueError, match="unknown matrices"):
        MaskSpec((1,), ("qeury",))


def test_all_ones_masks_give_the_unmasked_model_exactly(params):
    spec = MaskSpec.create(CONFIG, first_layer=0)
    logits = init_mask_logits(spec, params, 1, MaskInit("constant", value=5.0),
                              MaskMode("deterministic"), jax.random.key(0))
    one_relation = jax.tree.map(lambda x: x[0], logits)
    ids, attention = _batch()
    expected = mlm_forward(params, ids, attention, config=CONFIG)["logits"]
    for kind in ("deterministic", "threshold"):
        masked = apply_masks(params, one_relation, MaskMode(kind))
        got = mlm_forward(masked, ids, attention, config=CONFIG)["logits"]
        np.testing.assert_array_equal(got, expected)


def test_zeroing_one_mask_entry_equals_zeroing_the_weight(params):
    spec = MaskSpec((1,), ("value", "ffn_in"))
    logits = init_mask_logits(spec, params, 1, MaskInit("constant", value=4.0),
                              MaskMode("threshold"), jax.random.key(0))
    g = jax.tree.map(lambda x: x[0], logits)
    g["layer_1"]["ffn_in"]["kernel"] = g["layer_1"]["ffn_in"]["kernel"].at[3, 5].set(-4.0)
    masked = apply_masks(params, g, MaskMode("threshold"))
    by_hand = jax.tree.map(lambda x: x, params)  # a structural copy; arrays are immutable
    by_hand["layer_1"] = dict(params["layer_1"])
    kernel = params["layer_1"]["ffn_in"]["kernel"]
    by_hand["layer_1"]["ffn_in"] = {"kernel": kernel.at[3, 5].set(0.0),
                                    "bias": params["layer_1"]["ffn_in"]["bias"]}
    ids, attention = _batch()
    np.testing.assert_array_equal(mlm_forward(masked, ids, attention, config=CONFIG)["logits"],
                                  mlm_forward(by_hand, ids, attention, config=CONFIG)["logits"])
    assert float(params["layer_1"]["ffn_in"]["kernel"][3, 5]) != 0.0  # no in-place surgery


def test_frozen_params_receive_no_gradient(params):
    spec = MaskSpec.create(CONFIG)
    logits = init_mask_logits(spec, params, 1, MaskInit("normal"), MaskMode(),
                              jax.random.key(0))
    g = jax.tree.map(lambda x: x[0], logits)
    ids, attention = _batch()

    def loss(frozen, mask_logits):
        masked = apply_masks(frozen, mask_logits, MaskMode(), jax.random.key(1))
        return mlm_forward(masked, ids, attention, config=CONFIG)["logits"].sum()

    # Jitted: op by op, the backward pass of this 4-layer model took 16 s on 2 cores.
    frozen_grad, mask_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, g)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(frozen_grad))
    assert all(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(mask_grad))


def test_expected_density_matches_sampled_density():
    g = {"a": jax.random.normal(jax.random.key(0), (300, 300)) + 0.4}
    mode = MaskMode("stochastic", tau=0.3, threshold=0.6)
    sample = compute_masks(g, mode, jax.random.key(2))["a"]
    assert float(expected_density(g, mode)) == pytest.approx(float(jnp.mean(sample > 0.6)),
                                                              abs=0.005)


def test_sparsity_stats_on_a_hand_made_mask():
    spec = MaskSpec((0, 1), ("query", "ffn_in"))
    off, on = -1.0, 1.0
    tree = {
        "layer_0": {"attention": {"query": {"kernel": jnp.array([[[off, on], [on, on]],
                                                                  [[off, off], [off, off]]])}},
                    "ffn_in": {"kernel": jnp.full((2, 2, 4), on)}},
        "layer_1": {"attention": {"query": {"kernel": jnp.full((2, 2, 2), off)}},
                    "ffn_in": {"kernel": jnp.full((2, 2, 4), on).at[1, 0, :2].set(off)}},
    }
    stats = sparsity_stats(tree, spec)
    np.testing.assert_allclose(stats["layer_0/query"], [0.25, 1.0])
    np.testing.assert_allclose(stats["layer_0/ffn_in"], [0.0, 0.0])
    np.testing.assert_allclose(stats["layer_1/query"], [1.0, 1.0])
    np.testing.assert_allclose(stats["layer_1/ffn_in"], [0.0, 0.25])
    # Relation 0: 1 + 0 + 4 + 0 of 24 weights off; relation 1: 4 + 0 + 4 + 2.
    np.testing.assert_allclose(stats["total"], [5 / 24, 10 / 24])


def test_combine_masks():
    m = {"k": jnp.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0]])}
    np.testing.assert_array_equal(combine_masks(m, [0, 1], "or")["k"], [1, 1, 1, 0])
    np.testing.assert_array_equal(combine_masks(m, [0, 1], "and")["k"], [1, 0, 0, 0])
    np.testing.assert_array_equal(combine_masks(m, [0, 1, 2], "vote")["k"], [1, 0, 0, 0])
    np.testing.assert_array_equal(hard_mask(jnp.array([0.0, 1e-6]), 0.5), [0.0, 1.0])


def test_one_log_concrete_sample_equals_the_two_log_formula_on_the_same_noise():
    from lamp_jax import threefry

    g = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)) * 3, jnp.float32)
    rng, tau = jax.random.key(7), 0.3
    u = threefry.uniform(rng, g.shape, g.dtype, minval=1e-6, maxval=1.0 - 1e-6)
    two_logs = jax.nn.sigmoid((g + jnp.log(u) - jnp.log1p(-u)) / tau)
    got = concrete_sample(g, rng, tau)
    np.testing.assert_allclose(got, two_logs, atol=2e-6)
    assert 0.05 < float(jnp.mean(jnp.abs(got - jax.nn.sigmoid(g / tau)))), "noise was applied"


@pytest.mark.parametrize("mode", [MaskMode("stochastic", tau=0.3, threshold=0.6),
                                  MaskMode("deterministic", threshold=0.4)])
@pytest.mark.parametrize("target", [None, 0.7])
def test_sparsity_penalty_value_and_gradient_by_hand(mode, target):
    rng = np.random.default_rng(0)
    tree = {"a": rng.normal(size=(3, 4)) * 2, "b": {"c": rng.normal(size=(5,)) + 1.0}}
    logits = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    # Expected density: P(m > t) per entry, averaged over all 17 entries (not per leaf). For the
    # concrete mask sigmoid((G + L) / tau) > t  <=>  L > tau * logit(t) - G, L ~ Logistic(0, 1);
    # for the others sigmoid(G - logit(t)) stands in for 1[G > logit(t)].
    t = mode.threshold
    shift = (mode.tau if mode.kind == "stochastic" else 1.0) * np.log(t / (1 - t))
    g = np.concatenate([tree["a"].ravel(), tree["b"]["c"]])
    s = 1 / (1 + np.exp(-(g - shift)))
    density = s.mean()
    assert float(expected_density(logits, mode)) == pytest.approx(density, rel=1e-6)
    weight = 0.5
    if target is None:
        value, slope = weight * density, weight
    else:  # hold the density at 1 - target: a quadratic around 0.3
        value, slope = weight * (density - 0.3) ** 2, 2 * weight * (density - 0.3)
    grad_by_hand = slope * s * (1 - s) / g.size
    got, grad = jax.value_and_grad(lambda x: sparsity_penalty(x, mode, weight, target))(logits)
    assert float(got) == pytest.approx(value, rel=1e-5)
    flat = np.concatenate([np.ravel(grad["a"]), np.ravel(grad["b"]["c"])])
    np.testing.assert_allclose(flat, grad_by_hand, rtol=1e-5)
    assert value > 1e-3 and np.abs(grad_by_hand).max() > 1e-4  # not a comparison of zeros
