"""The PyTorch baseline of bench/ is the same algorithm as ours (so its timings mean something)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench.baseline_torch import HF_LINEARS, ReferenceLAMP  # noqa: E402
from lamp_jax.evaluation import evaluate, make_rank_fn  # noqa: E402
from lamp_jax.masks import MATRICES, MaskMode  # noqa: E402
from lamp_jax.models.params import load_mlm  # noqa: E402
from lamp_jax.training import (  # noqa: E402
    LossConfig,
    OptimConfig,
    init_train_state,
    jit_train_step,
    make_optimizer,
)


def test_one_baseline_step_equals_one_step_of_ours(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16)
    model = transformers.BertForMaskedLM(config)
    model.save_pretrained(tmp_path)
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    rng = np.random.default_rng(0)
    num_rel, batch_size, length = 2, 4, 8
    init = [{f"1/{m}": torch.tensor(rng.normal(1.0, 1.0, tuple(
        model.get_submodule(f"bert.encoder.layer.1.{hf}").weight.shape)), dtype=torch.float32)
        for m, hf in HF_LINEARS.items()}
        for _ in range(num_rel)]
    ids = rng.integers(5, 60, (num_rel, batch_size, length))
    mask_pos = rng.integers(1, length, (num_rel, batch_size))
    obj = rng.integers(5, 60, (num_rel, batch_size))
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "mask_pos": mask_pos,
             "obj_id": obj, "weight": np.ones((num_rel, batch_size), np.float32)}

    baseline = ReferenceLAMP(model, num_rel, [1], list(MATRICES), init, lr=0.05,
                             total_steps=4, eps=1e-3)
    baseline.train_step([{k: torch.tensor(v[r]) for k, v in batch.items() if k != "weight"}
                         for r in range(num_rel)])

    logits = {"layer_1": {}}
    for m, path in MATRICES.items():
        leaf = jnp.stack([jnp.asarray(init[r][f"1/{m}"].numpy().T) for r in range(num_rel)])
        node = logits["layer_1"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    optim = OptimConfig(learning_rate=0.05, eps=1e-3)
    state = init_train_state(logits, make_optimizer(optim), 4, jax.random.key(0))
    step = jit_train_step(model_config=mlm.config, loss_config=LossConfig(
        MaskMode("deterministic")), optim_config=optim)
    state, _ = step(state, mlm.params, {k: jnp.asarray(v) for k, v in batch.items()})

    for m, path in MATRICES.items():
        ours = state.mask_logits["layer_1"]
        for key in path:
            ours = ours[key]
        for r in range(num_rel):
            theirs = baseline.logits[r][f"1/{m}"].detach().numpy().T
            np.testing.assert_allclose(np.asarray(ours[r]), theirs, atol=1e-4)

    # Evaluation: the baseline's one-prompt-at-a-time P@1 equals our batched one.
    prompts = [[{k: torch.tensor(batch[k][r, b]) for k in ("input_ids", "attention_mask",
                                                           "mask_pos", "obj_id")}
                for b in range(batch_size)] for r in range(num_rel)]
    theirs = baseline.evaluate(prompts)
    rank_fn = make_rank_fn(mlm.config, MaskMode("threshold"))
    result = evaluate(rank_fn, state.mask_logits, mlm.params, [batch], ("a", "b"))
    np.testing.assert_allclose(result.precision_at(1), theirs)
    np.testing.assert_allclose(evaluate(rank_fn, None, mlm.params, [batch], ("a", "b"))
                               .precision_at(1), baseline.evaluate(prompts, subnetwork=False))
