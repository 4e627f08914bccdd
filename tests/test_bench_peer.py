"""The strong PyTorch peer of bench/ computes what lamp-jax computes (so its timings mean
something): losses and mask-logit gradients in both mask modes, whole optimiser steps (eager and
``torch.compile``) and evaluation ranks, on a tiny model, against lamp-jax's own functions.

The stochastic masks get the same uniforms on both sides: lamp-jax's, rebuilt from the keys its
step derives (``step_keys``, one split per mask leaf, ``threefry.uniform``) and handed to the
peer as explicit noise; a guard checks the rebuilt noise gives lamp-jax's masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.needs import require

torch = require("torch")

from bench.peer_torch import (  # noqa: E402
    PeerLAMP,
    PeerOptim,
    PeerShape,
    PeerWeights,
    flat_from_tree,
    tree_from_flat,
)
from lamp_jax import threefry  # noqa: E402
from lamp_jax.masks import (  # noqa: E402
    MaskInit,
    MaskMode,
    MaskSpec,
    apply_masks,
    compute_masks,
    init_mask_logits,
)
from lamp_jax.models import ModelConfig, init_params, mlm_forward  # noqa: E402
from lamp_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from lamp_jax.prefix import batch_prefix_hidden_states  # noqa: E402
from lamp_jax.ranking import batch_rank_stats  # noqa: E402
from lamp_jax.step import (  # noqa: E402
    LossConfig,
    init_train_state,
    jit_train_step,
    relation_loss,
    step_keys,
)

R, B, L, VOCAB = 3, 4, 8, 60
LAYERS = (1, 2)  # layer 0 is the frozen prefix; the last layer runs at [MASK] only
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
SHAPE = PeerShape(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_heads=4,
                  intermediate_size=64, max_position_embeddings=16)
# eps 1e-3 and a small clip norm: Adam's first step is then not scale-free, so a wrong
# clipping factor changes the new logits.
OPTIM = OptimConfig(learning_rate=0.05, warmup_fraction=0.5, clip_norm=0.5, eps=1e-3)
TOTAL_STEPS = np.array([4, 6, 10])  # per-relation schedules
PEAK_LR = 0.07  # the peak the step is given (OPTIM's is 0.05)
MODES = {"deterministic": MaskMode("deterministic"),
         "deterministic-sigmoid": MaskMode("deterministic", ste_grad="sigmoid"),
         "stochastic": MaskMode("stochastic", tau=0.1)}


def _batch(seed: int) -> dict[str, np.ndarray]:
    """Prompts with padding (the last two tokens of each relation's first prompt) and one
    padding row (relation 1's last prompt has weight 0)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, (R, B, L)).astype(np.int32)
    mask_pos = rng.integers(1, L - 2, (R, B)).astype(np.int32)
    np.put_along_axis(ids, mask_pos[..., None], 4, axis=-1)
    attention = np.ones_like(ids)
    attention[:, 0, -2:] = 0
    weight = np.ones((R, B), np.float32)
    weight[1, -1] = 0.0
    return {"input_ids": ids, "attention_mask": attention, "mask_pos": mask_pos,
            "obj_id": rng.integers(5, VOCAB, (R, B)).astype(np.int32), "weight": weight}


@pytest.fixture(scope="module")
def setup():
    params = jax.device_get(init_params(CONFIG, jax.random.key(0)))
    # Larger weights than the init's (the masks then change predictions and ranks), and every
    # bias and LayerNorm parameter away from its init (0 or 1), so that each of them matters.
    noise = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (x * (2.0 if x.ndim == 2 else 1.0)
                                     + 0.1 * noise.normal(size=x.shape)).astype(np.float32),
                          params)
    logits = jax.device_get(init_mask_logits(MaskSpec(LAYERS), params, R,
                                             MaskInit("normal", value=0.3), MaskMode(),
                                             jax.random.key(1)))
    data = _batch(0)
    data["hidden"] = batch_prefix_hidden_states(params, data, model_config=CONFIG,
                                                stop_layer=LAYERS[0])
    return params, logits, data


def _peer(params, logits, mode: MaskMode, compile: bool = False) -> PeerLAMP:
    return PeerLAMP(PeerWeights.from_flax(params, SHAPE), R, LAYERS, mode=mode.kind,
                    tau=mode.tau, threshold=mode.threshold, ste_grad=mode.ste_grad,
                    optim=PeerOptim(learning_rate=OPTIM.learning_rate,
                                    warmup_fraction=OPTIM.warmup_fraction,
                                    clip_norm=OPTIM.clip_norm, eps=OPTIM.eps),
                    total_steps=TOTAL_STEPS, peak_lr=np.full(R, PEAK_LR),
                    init_logits=flat_from_tree(logits, LAYERS), compile=compile)


def _close(actual: np.ndarray, desired: np.ndarray) -> None:
    """Equal up to float32 rounding: rtol 1e-5, and atol 1e-5 of the values' scale (the two
    sides sum in different orders, and their frozen prefixes already differ by about 1e-6;
    gradients and logits here are of order 1)."""
    np.testing.assert_allclose(actual, desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


def _lamp_noise(logits, rngs) -> np.ndarray:
    """``[R, P]``: the uniforms lamp-jax's stochastic masks use for relation r with key
    ``rngs[r]`` (``masks.compute_masks``: one split per leaf in tree order, then
    ``threefry.uniform`` in [1e-6, 1 - 1e-6]), in the peer's layout. Checks that they give
    lamp-jax's masks."""
    def one(tree, key):
        leaves, treedef = jax.tree.flatten(tree)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [
            threefry.uniform(k, g.shape, g.dtype, minval=1e-6, maxval=1.0 - 1e-6)
            for k, g in zip(keys, leaves, strict=True)])

    noise = jax.vmap(one)(logits, rngs)
    mode = MODES["stochastic"]
    theirs = jax.vmap(lambda g, k: compute_masks(g, mode, k))(logits, rngs)
    ours = jax.tree.map(lambda g, u: jax.nn.sigmoid((g + jnp.log(u / (1 - u))) / mode.tau),
                        logits, noise)
    for a, b in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6,
                                   err_msg="lamp-jax draws its mask noise differently now")
    return flat_from_tree(jax.device_get(noise), LAYERS)


def test_layout_is_lamp_jax_tree():
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(R, SHAPE.masked_size(LAYERS))).astype(np.float32)
    tree = tree_from_flat(flat, LAYERS, SHAPE)
    assert tree["layer_1"]["attention"]["key"]["kernel"].shape == (R, 32, 32)
    assert tree["layer_2"]["ffn_out"]["kernel"].shape == (R, 64, 32)
    np.testing.assert_array_equal(flat_from_tree(tree, LAYERS), flat)


@pytest.mark.parametrize("mode_name", list(MODES))
def test_losses_and_gradients_equal_lamp_jax(setup, mode_name):
    params, logits, data = setup
    mode = MODES[mode_name]
    rngs = jax.random.split(jax.random.key(3), R)
    loss_config = LossConfig(mode, start_layer=LAYERS[0])
    grad_fn = jax.vmap(jax.value_and_grad(
        lambda g, b, k: relation_loss(g, params, b, k, model_config=CONFIG,
                                      loss_config=loss_config), has_aux=True))
    (losses, _), grads = grad_fn(logits, jax.tree.map(jnp.asarray, data), rngs)
    peer = _peer(params, logits, mode)
    batch = peer.batch(data)
    np.testing.assert_allclose(batch["hidden"].numpy(), data["hidden"], rtol=1e-5, atol=1e-5)
    noise = torch.from_numpy(_lamp_noise(logits, rngs)) if mode.kind == "stochastic" else None
    peer_losses, peer_grads = peer.losses_and_grads(batch, noise)
    np.testing.assert_allclose(peer_losses.numpy(), losses, rtol=1e-5)
    theirs = flat_from_tree(jax.device_get(grads), LAYERS)
    assert np.abs(theirs).max() > 1e-2  # the gradients are not trivially zero
    _close(peer_grads.numpy(), theirs)


@pytest.mark.parametrize("mode_name,compiled", [("deterministic", False), ("stochastic", False),
                                                ("deterministic", True), ("stochastic", True)])
def test_optimizer_steps_equal_lamp_jax(setup, mode_name, compiled):
    """Two steps of every relation: gradient, per-relation clipping (active: the norms exceed
    0.5), Adam with per-relation state, per-relation schedules and learning rates. In the
    second step relation 1 has no data and must keep its logits and Adam state. The step's
    peak learning rate is its argument, not the config's."""
    params, logits, data = setup
    mode = MODES[mode_name]
    step = jit_train_step(model_config=CONFIG, optim_config=OPTIM,
                          loss_config=LossConfig(mode, start_layer=LAYERS[0]))
    state = init_train_state(logits, make_optimizer(OPTIM), TOTAL_STEPS, jax.random.key(5))
    peer = _peer(params, logits, mode, compile=compiled)
    second = dict(data, weight=data["weight"] * np.array([1.0, 0.0, 1.0], np.float32)[:, None])
    for k, batch in enumerate((data, second)):
        noise = None
        if mode.kind == "stochastic":
            noise = torch.from_numpy(_lamp_noise(state.mask_logits,
                                                 step_keys(state.rng, R)[1]))
        before = flat_from_tree(jax.device_get(state.mask_logits), LAYERS)
        state, metrics = step(state, params, jax.tree.map(jnp.asarray, batch), PEAK_LR)
        peer_losses = peer.train_step(peer.batch(batch), noise)
        np.testing.assert_allclose(peer_losses.numpy(), metrics["loss"], rtol=1e-5)
        if k == 0:
            assert (np.asarray(metrics["grad_norm"]) > OPTIM.clip_norm).all()
        theirs = flat_from_tree(jax.device_get(state.mask_logits), LAYERS)
        assert np.abs(theirs - before).max() > 1e-2  # the step moved the logits
        _close(peer.logits.detach().numpy(), theirs)
        for moment, name in ((peer.exp_avg, "mu"), (peer.exp_avg_sq, "nu")):
            _close(moment.numpy(),
                   flat_from_tree(jax.device_get(getattr(state.opt_state[1], name)), LAYERS))
        np.testing.assert_array_equal(peer.steps.numpy(), state.relation_steps)
    np.testing.assert_array_equal(peer.steps.numpy(), [2, 1, 2])
    np.testing.assert_array_equal(theirs[1], before[1])  # relation 1 kept its logits


def _objects_as_top_predictions(params, logits, data) -> dict[str, np.ndarray]:
    """The batch with objects that make P@1 neither 0 nor 1: each relation's first prompt
    gets the full model's top prediction, the others the subnetwork's (lamp-jax's forward)."""
    threshold = MaskMode("threshold")
    tops = []
    for r in range(R):
        sub = apply_masks(params, jax.tree.map(lambda g, r=r: g[r], logits), threshold)
        tops.append([np.argmax(mlm_forward(p, data["input_ids"][r], data["attention_mask"][r],
                                           config=CONFIG, output_positions=data["mask_pos"][r],
                                           hidden=data["hidden"][r],
                                           start_layer=LAYERS[0])["logits"], -1)
                     for p in (params, sub)])
    first = np.arange(B) == 0
    return dict(data, obj_id=np.stack([np.where(first, full, sub) for full, sub in tops])
                .astype(np.int32))


@pytest.mark.parametrize("compiled", [False, True])
def test_ranks_equal_lamp_jax(setup, compiled):
    """Ranks of every prompt (subnetworks by threshold masks, and the full model) as
    lamp_jax.ranking ranks them."""
    params, logits, data = setup
    data = _objects_as_top_predictions(params, logits, data)
    threshold = MaskMode("threshold")
    peer = _peer(params, logits, MODES["deterministic"])  # threshold masks in evaluation
    if compiled:
        peer.compile_ranking()
    batch = peer.batch(data)
    masked = peer.threshold_weights()
    ranks = []
    for tree, weights in ((logits, masked), (None, None)):
        theirs = batch_rank_stats(tree, params, jax.tree.map(jnp.asarray, data),
                                  model_config=CONFIG, mode=threshold, start_layer=LAYERS[0])
        ours = peer.rank_stats(batch, weights)
        np.testing.assert_array_equal(ours["rank"].numpy(), theirs["rank"])
        np.testing.assert_allclose(ours["hits"].numpy(), theirs["hits"])
        np.testing.assert_allclose(ours["rr"].numpy(), theirs["rr"], rtol=1e-6)
        np.testing.assert_allclose(ours["count"].numpy(), theirs["count"])
        ranks.append(ours["rank"].numpy())
    # Both evaluations have hits and misses, and they differ: the masks matter.
    sub, full = ranks
    assert (sub == 1).any() and (full == 1).any() and (sub != full).any()
