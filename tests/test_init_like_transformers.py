"""Every family's ``init_like_transformers`` draws its params as transformers initialises a fresh
model of the same config: tensor by tensor (through the family's key table, in transformers'
names and layouts), the same constants exactly (zeros, ones, zeroed padding rows) and, for the
random tensors, the same distribution within sampling error:

* mean: ``|mean_ours - mean_theirs| < 5 * s * sqrt(2 / n)``, ``s`` transformers' sample std,
  ``n`` the entries (5 standard errors of a difference of two means);
* std: ``|s_ours / s_theirs - 1| < 5 / sqrt(n)`` (5 standard errors of a ratio of two sample
  stds; 5 % at 10,000 entries);
* tails: a sample max beyond 3 sample stds in ours exactly when in theirs, for tensors of at
  least 4,096 entries (a normal's max goes past 3 stds there, a truncated normal cut at 2 stds,
  ModernBERT's, never does).

The std of a tensor set at ``initializer_range / sqrt(2 * layers)`` (GPT-2's and ModernBERT's
residual projections) differs from ``initializer_range`` by 50 % here, and a truncated normal's
from a normal's by 12 %; both far beyond the tolerance for the tensors that have them.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lamp_jax.models import FAMILIES, family_of, init_like_transformers
from lamp_jax.models.checkpoint_io import to_state_dict
from lamp_jax.models.registry import config_from_hf_dict
from tests.needs import require

torch = require("torch")
transformers = require("transformers")

BERT_SMALL = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=256, max_position_embeddings=80)
LLAMA_SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   pad_token_id=3)
MODERNBERT_IDS = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                      sep_token_id=2)

CASES = {
    "bert": lambda tie: transformers.BertForMaskedLM(transformers.BertConfig(
        **BERT_SMALL, pad_token_id=5, tie_word_embeddings=tie)),
    "roberta": lambda tie: transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        **BERT_SMALL, pad_token_id=1, bos_token_id=0, eos_token_id=2, tie_word_embeddings=tie)),
    "distilbert": lambda tie: transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=512, dim=128, n_layers=2, n_heads=4, hidden_dim=256,
        max_position_embeddings=80, pad_token_id=4, tie_word_embeddings=tie)),
    "modernbert": lambda tie: transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
        **BERT_SMALL, **MODERNBERT_IDS, norm_bias=True, attention_bias=True, mlp_bias=True,
        classifier_bias=True, tie_word_embeddings=tie)),
    "gpt2": lambda tie: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=512, n_embd=128, n_layer=2, n_head=4, n_positions=80,
        tie_word_embeddings=tie)),
    "llama": lambda tie: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **LLAMA_SMALL, attention_bias=True, mlp_bias=True, tie_word_embeddings=tie)),
    "qwen2": lambda tie: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **LLAMA_SMALL, tie_word_embeddings=tie)),
    "qwen3": lambda tie: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **LLAMA_SMALL, head_dim=32, attention_bias=True, tie_word_embeddings=tie)),
}


def _fresh(case: str, tie: bool):
    torch.manual_seed(0)
    model = CASES[case](tie)
    return model, config_from_hf_dict(model.config.to_dict())


def assert_same_distribution(ours: np.ndarray, theirs: np.ndarray, name: str) -> None:
    """The module docstring's tolerances, and the constants exactly."""
    assert ours.shape == theirs.shape, name
    assert ours.dtype == np.float32, name
    if np.all(theirs == theirs.flat[0]):  # a constant: zeros or ones
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
        return
    if theirs.ndim == 2:  # padding rows transformers zeroes, and only those
        zero_rows = lambda a: np.flatnonzero(np.all(a == 0, axis=1)).tolist()  # noqa: E731
        assert zero_rows(ours) == zero_rows(theirs), name
    n, s = theirs.size, float(theirs.std())
    assert abs(float(ours.mean()) - float(theirs.mean())) < 5 * s * np.sqrt(2 / n), name
    assert abs(float(ours.std()) / s - 1) < 5 / np.sqrt(n), (name, float(ours.std()), s)
    if n >= 4096:
        tail = lambda a: float(np.abs(a).max() / a.std()) > 3  # noqa: E731
        assert tail(ours) == tail(theirs), name


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("case", list(CASES))
def test_params_are_distributed_as_transformers_initialises_them(case, tie):
    model, config = _fresh(case, tie)
    assert config.tie_word_embeddings == tie
    params = init_like_transformers(config, jax.random.key(0))
    ours = to_state_dict(params, config)
    theirs = {name: p.detach().numpy() for name, p in model.named_parameters()}
    table = FAMILIES[family_of(config).name].key_table(config)
    if table.decoder_bias in theirs:  # an untied BERT/RoBERTa decoder's own bias: our head bias
        ours[table.decoder_bias] = ours[table.head_bias]
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, value in theirs.items():
        assert_same_distribution(ours[name], value, name)


def test_the_checks_see_what_differs_between_the_rules():
    """The tolerances above tell apart what the families' rules differ in: GPT-2's scaled
    residual std, a truncated normal (ModernBERT) from a normal, a missing padding row."""
    model, config = _fresh("gpt2", True)
    theirs = {n: p.detach().numpy() for n, p in model.named_parameters()}
    ours = to_state_dict(init_like_transformers(config, jax.random.key(0)), config)
    with pytest.raises(AssertionError):  # c_attn drawn vs c_proj expected
        assert_same_distribution(ours["transformer.h.0.attn.c_attn.weight"][:, :128],
                                 theirs["transformer.h.0.attn.c_proj.weight"], "scaled")
    model, config = _fresh("modernbert", True)
    theirs = {n: p.detach().numpy() for n, p in model.named_parameters()}
    normal = np.random.default_rng(0).normal(0, 0.02, (384, 128)).astype(np.float32)
    with pytest.raises(AssertionError):
        assert_same_distribution(normal, theirs["model.layers.0.attn.Wqkv.weight"], "truncated")
    model, config = _fresh("llama", True)
    theirs = {n: p.detach().numpy() for n, p in model.named_parameters()}
    ours = to_state_dict(init_like_transformers(config, jax.random.key(0)), config)
    unpadded = ours["model.embed_tokens.weight"].copy()
    unpadded[3] = 0.02
    with pytest.raises(AssertionError):
        assert_same_distribution(unpadded, theirs["model.embed_tokens.weight"], "padding")


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_key_gives_the_same_params(case):
    _, config = _fresh(case, False)
    a = init_like_transformers(config, jax.random.key(7))
    b = FAMILIES[family_of(config).name].random_params(config, jax.random.key(7))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    c = init_like_transformers(config, jax.random.key(8))
    differs = jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.any(x != y)), a, c))
    assert any(differs)


@pytest.mark.parametrize("case", ["bert", "gpt2", "qwen3"])
def test_every_tensor_is_drawn_independently(case):
    """No two random tensors of one shape are correlated (q, k and v, say, or one layer's and
    the next's): |correlation| < 5 / sqrt(n)."""
    _, config = _fresh(case, False)
    flat = [np.asarray(leaf).ravel() for leaf in jax.tree.leaves(
        init_like_transformers(config, jax.random.key(0)))]
    random = [leaf for leaf in flat if leaf.std() > 0]
    pairs = 0
    for i, a in enumerate(random):
        for b in random[i + 1:]:
            if a.size == b.size:
                assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
                pairs += 1
    assert pairs >= 10
