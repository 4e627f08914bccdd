"""The PyTorch baseline of bench/ is the same algorithm as ours (so its timings mean something)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.needs import require

torch = require("torch")
require("transformers")

from bench.baseline_torch import HF_LINEARS, ReferenceLAMP, reference_bert  # noqa: E402
from bench.common import torch_batches, torch_prompts  # noqa: E402
from lamp_jax.masks import MaskMode, apply_masks, insert_path  # noqa: E402
from lamp_jax.models import FAMILIES, load_mlm, mlm_forward  # noqa: E402
from lamp_jax.optim import OptimConfig, make_optimizer  # noqa: E402
from lamp_jax.ranking import evaluate, make_rank_fn  # noqa: E402
from lamp_jax.step import LossConfig, init_train_state, jit_train_step  # noqa: E402

MATRICES = FAMILIES["bert"].matrices  # the BERT family's maskable matrices

NUM_REL, BATCH, LENGTH, VOCAB = 2, 4, 8, 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    # Large random weights: layer 1 then matters enough for its masks to change predictions.
    model = reference_bert(dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=16, initializer_range=0.3))
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    mlm = load_mlm(path, load_tokenizer=False)
    rng = np.random.default_rng(0)
    # Initial logits per relation, torch layout [out, in]; normal(0, 1) masks half the weights.
    init = [{f"1/{m}": torch.tensor(rng.normal(0.0, 1.0, tuple(model.get_submodule(
        f"bert.encoder.layer.1.{hf}").weight.shape)), dtype=torch.float32)
        for m, hf in HF_LINEARS.items()} for _ in range(NUM_REL)]
    ids = rng.integers(5, VOCAB, (NUM_REL, BATCH, LENGTH)).astype(np.int32)
    mask_pos = rng.integers(1, LENGTH, (NUM_REL, BATCH)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask_pos": mask_pos,
             "obj_id": rng.integers(5, VOCAB, (NUM_REL, BATCH)).astype(np.int32),
             "weight": np.ones((NUM_REL, BATCH), np.float32)}
    return model, mlm, init, batch


def _ours_logits(init):
    tree = {}
    for m, path in MATRICES.items():
        leaf = jnp.stack([jnp.asarray(init[r][f"1/{m}"].numpy().T) for r in range(NUM_REL)])
        insert_path(tree, ("layer_1", *path), leaf)
    return tree


def test_one_baseline_step_and_its_evaluation_equal_ours(setup):
    model, mlm, init, batch = setup
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    baseline = ReferenceLAMP(model, NUM_REL, [1], list(MATRICES), init, lr=0.05,
                             total_steps=4, eps=1e-3, schedule="lamp_jax")
    losses = baseline.train_step(torch_batches(batch, "cpu"))
    assert all(np.isfinite(losses))
    # The surgery is undone: the frozen weights are back, bit for bit, and hold no hooks.
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not any(m._forward_pre_hooks for m in model.modules())

    optim = OptimConfig(learning_rate=0.05, eps=1e-3)
    state = init_train_state(_ours_logits(init), make_optimizer(optim), 4, jax.random.key(0))
    step = jit_train_step(model_config=mlm.config, optim_config=optim,
                          loss_config=LossConfig(MaskMode("deterministic")))
    state, metrics = step(state, mlm.params, {k: jnp.asarray(v) for k, v in batch.items()},
                          optim.learning_rate)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-5)
    moved = 0.0
    for m, path in MATRICES.items():
        ours = state.mask_logits["layer_1"]
        for key in path:
            ours = ours[key]
        for r in range(NUM_REL):
            theirs = baseline.logits_of(r)[f"1/{m}"].detach().numpy().T
            np.testing.assert_allclose(np.asarray(ours[r]), theirs, atol=1e-4)
            moved = max(moved, float(np.abs(theirs - init[r][f"1/{m}"].numpy().T).max()))
    assert moved > 1e-3  # the step really changed the logits

    # Evaluation: one prompt at a time (surgery per prompt or per relation) = our batched one.
    # Objects: the full model's top prediction for the first prompt, the subnetwork's for the
    # others, so that neither P@1 is trivially 0 and the two differ.
    threshold = MaskMode("threshold")
    tops = []
    for r in range(NUM_REL):
        sub = apply_masks(mlm.params, jax.tree.map(lambda g, r=r: g[r], state.mask_logits),
                          threshold)
        tops.append([np.argmax(mlm_forward(p, batch["input_ids"][r], batch["attention_mask"][r],
                                           config=mlm.config,
                                           output_positions=batch["mask_pos"][r])["logits"], -1)
                     for p in (mlm.params, sub)])
    first = np.arange(BATCH) == 0
    batch = dict(batch, obj_id=np.stack([np.where(first, full, sub) for full, sub in tops])
                 .astype(np.int32))
    prompts = torch_prompts(batch, "cpu")
    pruned, full = baseline.evaluate(prompts)
    baseline.surgery = "per_relation"
    assert baseline.evaluate(prompts) == (pruned, full)
    rank_fn = make_rank_fn(mlm.config, threshold)
    names = tuple(str(r) for r in range(NUM_REL))
    np.testing.assert_allclose(
        evaluate(rank_fn, state.mask_logits, mlm.params, [batch], names).precision_at(1), pruned)
    np.testing.assert_allclose(
        evaluate(rank_fn, None, mlm.params, [batch], names).precision_at(1), full)
    assert min(full) > 0 and min(pruned) > max(full)
