"""The causal families: parity of our Flax GPT-2 and Llama-architecture models (Llama, Qwen2,
Qwen3) with transformers' PyTorch ``*ForCausalLM`` for every architectural switch, the fast paths
(cached prefix, rows at output_positions), checkpoint I/O (safetensors, .bin, shards, the hub's
GPT-2 layout), saving for transformers' ``generate``, masks and tokenizers.

The reference models are random transformers models saved with ``save_pretrained``, their weights
redrawn at unit scale, where every switch moves the logits far more than the 1e-4 tolerance
(transformers' own init, std 0.02, gives near-constant logits). Attention is transformers'
``eager`` (float32, softmax over the full row), the arithmetic ours follows.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.errors import UsageError
from lamp_jax.masks import MaskSpec, multiply_masks
from lamp_jax.models import (
    FAMILIES,
    GPT2Config,
    LlamaConfig,
    encode_prefix,
    family_of,
    init_params,
    load_mlm,
    mlm_forward,
    save_mlm,
)
from lamp_jax.models.checkpoint_io import (
    HUB_CLASS_IGNORED,
    TOKENIZER_CLASSES,
    load_tokenizer_of,
)
from lamp_jax.models.checkpoint_keys import flatten_params, unflatten_params
from lamp_jax.models.registry import config_from_hf_dict
from lamp_jax.models.rope import RopeParameters
from tests.needs import require

torch = require("torch")
transformers = require("transformers")

VOCAB = 101
PAD = 0
LENGTHS = [12, 7, 3, 12]  # rows 1 and 2 are padded (on the right)
GPT2_SMALL = dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=40,
                  bos_token_id=1, eos_token_id=2)
LLAMA_SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=40,
                   pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
TORCH_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}
# Conv1D weights are [in, out]; every other matrix is an nn.Linear [out, in].
_CONV1D = ("c_attn", "c_proj", "c_fc")


def _redraw_at_unit_scale(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name or ".ln_" in name:
                p.normal_(1.0, 0.2)
            elif any(e in name for e in ("embed_tokens", "wte", "wpe")):
                p.normal_(0.0, 1.0)
            else:  # a matrix: unit-scale outputs
                fan_in = p.shape[0] if any(c in name for c in _CONV1D) else p.shape[1]
                p.normal_(0.0, fan_in ** -0.5)
    return model


def _torch_model(kind: str, **switches):
    """A random transformers causal LM of ``kind`` (gpt2, llama, qwen2, qwen3)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**{**GPT2_SMALL, **switches}, attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        config_class, model_class = TORCH_CLASSES[kind]
        cfg = config_class(**{**LLAMA_SMALL, **switches}, attn_implementation="eager")
        model = model_class(cfg)
    return _redraw_at_unit_scale(model).eval()


def _padded_batch(lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), max(lengths)), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, VOCAB, n)
        mask[row, :n] = 1
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _ours(mlm, ids, mask, **kwargs):
    return np.asarray(mlm_forward(mlm.params, jnp.asarray(ids), jnp.asarray(mask),
                                  config=mlm.config, **kwargs)["logits"])


def _largest_gap(a, b, mask):
    real = mask.astype(bool)  # padded positions are garbage in both implementations
    return float(np.abs(np.asarray(a)[real] - np.asarray(b)[real]).max())


def _saved(model, directory: Path, fmt: str = "safetensors") -> Path:
    model.save_pretrained(directory)
    if fmt == "bin":  # transformers 5 writes safetensors; write the legacy file as torch.save
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


# --- parity for every switch ----------------------------------------------------------------

SWITCHES = {
    "gpt2": ("gpt2", {}),
    "gpt2_untied": ("gpt2", {"tie_word_embeddings": False}),
    "gpt2_inverse_layer_scale": ("gpt2", {"scale_attn_by_inverse_layer_idx": True}),
    "gpt2_unscaled_attention": ("gpt2", {"scale_attn_weights": False}),
    "gpt2_reorder_and_upcast": ("gpt2", {"reorder_and_upcast_attn": True}),
    "gpt2_n_inner_exact_gelu_eps": ("gpt2", {"n_inner": 80, "activation_function": "gelu",
                                             "layer_norm_epsilon": 1e-3}),
    "llama_default_rope": ("llama", {"rope_parameters": {"rope_type": "default",
                                                         "rope_theta": 500.0}}),
    "llama_gqa_tied": ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "llama_linear_rope": ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 3.0,
                                                        "rope_theta": 100.0}}),
    "llama_llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10_000.0}}),
    "llama_yarn_rope": ("llama", {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 10_000.0}}),
    "llama_dynamic_rope_short": ("llama", {"rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}}),
    "llama_dynamic_rope_beyond_max": ("llama", {"max_position_embeddings": 8, "rope_parameters": {
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}}),
    "llama_partial_rotary_default": ("llama", {"rope_parameters": {
        "rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}}),
    "llama_biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama_explicit_head_dim": ("llama", {"head_dim": 16, "num_key_value_heads": 2}),
    "llama_silu_eps": ("llama", {"rms_norm_eps": 1e-2}),
    "qwen2_qkv_bias": ("qwen2", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2_sliding_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 3,
                                       "max_window_layers": 1}),
    "qwen3_qk_norm": ("qwen3", {"head_dim": 16, "num_key_value_heads": 2}),
    "qwen3_attention_bias_untied": ("qwen3", {"head_dim": 8, "attention_bias": True,
                                              "tie_word_embeddings": False}),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_logits_match_pytorch_for_every_switch(tmp_path, name):
    kind, switches = SWITCHES[name]
    model = _torch_model(kind, **switches)
    mlm = load_mlm(_saved(model, tmp_path), load_tokenizer=False)
    assert mlm.config.family == kind and FAMILIES[family_of(mlm.config).name].causal
    ids, mask = _padded_batch()
    expected = _torch_logits(model, ids, mask)
    assert np.abs(expected).max() > 1.0  # a scale at which 1e-4 means something
    assert _largest_gap(_ours(mlm, ids, mask), expected, mask) < 1e-4


def test_each_switch_is_read_from_the_config(tmp_path):
    """What the parity tests rely on: the switches reach our config as transformers reads
    them (so a parity failure is the forward's, and a passing test is not a default's)."""
    read = {}
    for name in ("gpt2_untied", "gpt2_inverse_layer_scale", "gpt2_n_inner_exact_gelu_eps",
                 "llama_gqa_tied", "llama_llama3_rope", "llama_explicit_head_dim",
                 "qwen2_sliding_window", "qwen3_qk_norm"):
        kind, switches = SWITCHES[name]
        directory = tmp_path / name
        _torch_model(kind, **switches).save_pretrained(directory)
        read[name] = load_mlm(directory, load_tokenizer=False).config
    assert not read["gpt2_untied"].tie_word_embeddings
    assert read["gpt2_inverse_layer_scale"].scale_attn_by_inverse_layer_idx
    gelu = read["gpt2_n_inner_exact_gelu_eps"]
    assert (gelu.intermediate_size, gelu.hidden_act, gelu.layer_norm_eps) == (80, "gelu", 1e-3)
    assert (read["llama_gqa_tied"].num_kv_heads, read["llama_gqa_tied"].tie_word_embeddings) == (
        2, True)
    assert read["llama_llama3_rope"].rope == RopeParameters(
        "llama3", 10_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)
    assert (read["llama_explicit_head_dim"].head_dim, read["qwen3_qk_norm"].head_dim) == (16, 16)
    assert read["qwen2_sliding_window"].layer_types == (
        "full_attention", "sliding_attention", "sliding_attention")
    assert read["qwen2_sliding_window"].sliding_window == 3
    assert read["qwen3_qk_norm"].qk_norm and not read["llama_gqa_tied"].qk_norm


def test_the_rotary_variants_and_the_window_matter(tmp_path):
    """Each rotary variant gives logits far from the default's on the same weights (so parity
    pins each down), and so does dropping the sliding window."""
    kind, switches = SWITCHES["llama_default_rope"]
    mlm = load_mlm(_saved(_torch_model(kind, **switches), tmp_path), load_tokenizer=False)
    ids, mask = _padded_batch()
    base = _ours(mlm, ids, mask)
    for name in ("llama_linear_rope", "llama_llama3_rope", "llama_yarn_rope"):
        rope = RopeParameters.from_hf_dict(SWITCHES[name][1], 40)
        config = LlamaConfig(**{**_fields(mlm.config), "rope": rope})
        other = np.asarray(mlm_forward(mlm.params, ids, mask, config=config)["logits"])
        assert _largest_gap(base, other, mask) > 1e-2, name
    windowed = LlamaConfig(**{**_fields(mlm.config), "family": "qwen2", "attention_bias": True,
                              "sliding_window": 3,
                              "layer_types": ("full_attention",) + ("sliding_attention",) * 2})
    params = jax.tree.map(lambda x: x, mlm.params)
    for i in range(3):  # Qwen2's q/k/v biases, zero: only the window differs
        for m in ("query", "key", "value"):
            width = params[f"layer_{i}"]["attention"][m]["kernel"].shape[1]
            params[f"layer_{i}"]["attention"][m]["bias"] = jnp.zeros(width)
    other = np.asarray(mlm_forward(params, ids, mask, config=windowed)["logits"])
    assert _largest_gap(base, other, mask) > 1e-2


def _fields(config):
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def test_dynamic_ntk_rotary_follows_the_sequence_length(tmp_path):
    """Dynamic NTK: the default frequencies while the batch fits max_position_embeddings, a
    larger base beyond (transformers recomputes them from the longest position); a freshly
    loaded transformers model for each length, as its cache of the longest length is state."""
    kind, switches = SWITCHES["llama_dynamic_rope_beyond_max"]
    directory = _saved(_torch_model(kind, **switches), tmp_path)
    mlm = load_mlm(directory, load_tokenizer=False)
    default = LlamaConfig(**{**_fields(mlm.config), "rope": RopeParameters("default", 100.0)})
    for lengths, differs in (([6, 8, 3], False), ([12, 7, 3, 12], True)):
        ids, mask = _padded_batch(lengths)
        fresh = transformers.AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation="eager").eval()
        ours = _ours(mlm, ids, mask)
        assert _largest_gap(ours, _torch_logits(fresh, ids, mask), mask) < 1e-4
        plain = np.asarray(mlm_forward(mlm.params, ids, mask, config=default)["logits"])
        assert (_largest_gap(ours, plain, mask) > 1e-2) == differs, lengths


def test_the_hub_configs_older_rope_layout_loads_too(tmp_path):
    """Llama 3.x and Qwen2.5's config.json on the hub predate rope_parameters: they have
    rope_theta and rope_scaling (whose variant may be named ``type``)."""
    kind, switches = SWITCHES["llama_linear_rope"]
    model = _torch_model(kind, **switches)
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["rope_parameters"]
    hf.update(rope_theta=100.0, rope_scaling={"type": "linear", "factor": 3.0})
    (tmp_path / "config.json").write_text(json.dumps(hf))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.rope_parameters["rope_type"] == "linear"
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert mlm.config.rope == RopeParameters("linear", 100.0, factor=3.0)
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(reloaded, ids, mask), mask) < 1e-4


def test_unsupported_rotary_settings_are_refused_by_name(tmp_path):
    hf = {"model_type": "llama", **LLAMA_SMALL}
    for rope, expected in (
            ({"rope_type": "longrope", "rope_theta": 1.0}, "rope_type 'longrope' is not"),
            ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
             "partial_rotary_factor 0.5 with rope_type 'linear'")):
        (tmp_path / "config.json").write_text(json.dumps({**hf, "rope_parameters": rope}))
        with pytest.raises(UsageError, match=expected):
            load_mlm(tmp_path, load_tokenizer=False)


# --- what the rest of lamp-jax reads: hidden states, the fast paths, bf16 -------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model = _torch_model("gpt2", tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True)
    return model, load_mlm(_saved(model, tmp_path_factory.mktemp("gpt2")), load_tokenizer=False)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    model = _torch_model("qwen3", head_dim=16, num_key_value_heads=2)
    return model, load_mlm(_saved(model, tmp_path_factory.mktemp("qwen3")), load_tokenizer=False)


@pytest.fixture(scope="module")
def qwen2_sliding(tmp_path_factory):
    """The last layer (computed only at output_positions' rows) is a sliding-window one."""
    model = _torch_model("qwen2", **SWITCHES["qwen2_sliding_window"][1])
    directory = _saved(model, tmp_path_factory.mktemp("qwen2"))
    return model, load_mlm(directory, load_tokenizer=False)


@pytest.mark.parametrize("which", ["gpt2", "qwen3"])
def test_hidden_states_and_attentions_equal_transformers(request, which):
    """Every layer's input and output (the last after the final norm, as transformers) and
    attention probabilities, at the real tokens."""
    model, mlm = request.getfixturevalue(which)
    ids, mask = _padded_batch()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       output_hidden_states=True, output_attentions=True)
    ours = mlm_forward(mlm.params, jnp.asarray(ids), jnp.asarray(mask), config=mlm.config,
                       output_hidden_states=True, output_attentions=True)
    layers = mlm.config.num_layers
    assert len(ours["hidden_states"]) == len(theirs.hidden_states) == layers + 1
    for layer, (a, b) in enumerate(zip(ours["hidden_states"], theirs.hidden_states,
                                       strict=True)):
        assert _largest_gap(a, b.numpy(), mask) < 1e-4, f"hidden state {layer}"
    assert len(ours["attentions"]) == len(theirs.attentions) == layers
    real = mask.astype(bool)
    for layer, (a, b) in enumerate(zip(ours["attentions"], theirs.attentions, strict=True)):
        a, b = np.asarray(a).transpose(0, 2, 1, 3)[real], b.numpy().transpose(0, 2, 1, 3)[real]
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"attention {layer}")
        query = np.nonzero(real)[1]  # each real query's position: no mass on later keys
        later = np.arange(a.shape[-1])[None, :] > query[:, None]
        assert np.all(a.transpose(1, 0, 2)[:, later] == 0)


@pytest.mark.parametrize("which", ["gpt2", "qwen3", "qwen2_sliding"])
def test_output_positions_and_the_cached_prefix_equal_the_full_forward(request, which):
    _, mlm = request.getfixturevalue(which)
    ids, mask = _padded_batch()
    full = _ours(mlm, ids, mask)
    positions = np.array([4, 6, 2, 11])  # a real token of every row, the last of rows 1 and 2
    rows = np.arange(len(positions))
    np.testing.assert_allclose(_ours(mlm, ids, mask, output_positions=positions),
                               full[rows, positions], atol=1e-5)
    both = np.array([[4, 11], [0, 6], [2, 1], [10, 3]])
    np.testing.assert_allclose(_ours(mlm, ids, mask, output_positions=both),
                               full[rows[:, None], both], atol=1e-5)
    for start in range(mlm.config.num_layers + 1):
        hidden = encode_prefix(mlm.params, ids, mask, config=mlm.config, stop_layer=start)
        assert hidden.shape == (*ids.shape, mlm.config.hidden_size)
        resumed = mlm_forward(mlm.params, None, mask, config=mlm.config, hidden=hidden,
                              start_layer=start, output_positions=positions)["logits"]
        np.testing.assert_allclose(resumed, full[rows, positions], atol=1e-5,
                                   err_msg=f"start_layer {start}")
    with pytest.raises(ValueError, match="needs the hidden states"):
        mlm_forward(mlm.params, ids, mask, config=mlm.config, start_layer=1)


@pytest.mark.parametrize("which", ["gpt2", "qwen3"])
def test_a_token_sees_only_itself_and_what_comes_before(request, which):
    """Causality and right padding: a prefix's logits do not depend on the tokens after it,
    nor on padding."""
    _, mlm = request.getfixturevalue(which)
    ids, mask = _padded_batch()
    full = _ours(mlm, ids, mask)
    changed = ids.copy()
    changed[:, 5:] = (changed[:, 5:] + 7) % VOCAB
    np.testing.assert_allclose(_ours(mlm, changed, mask)[:, :5], full[:, :5], atol=1e-5)
    alone = _ours(mlm, ids[1:2, :7], mask[1:2, :7])  # row 1 without its padding
    np.testing.assert_allclose(full[1:2, :7], alone, atol=1e-5)


@pytest.mark.parametrize("which", ["gpt2", "qwen3"])
def test_bfloat16_forward_is_close_to_float32(request, which, tmp_path):
    model, mlm = request.getfixturevalue(which)
    half = load_mlm(_saved(model, tmp_path), load_tokenizer=False, dtype=jnp.bfloat16)
    assert jax.tree.leaves(half.params)[0].dtype == jnp.bfloat16
    ids, mask = _padded_batch()
    a, b = _ours(mlm, ids, mask), np.asarray(half.forward(ids, mask)["logits"])
    assert b.dtype == np.float32
    assert _largest_gap(a, b, mask) < 0.1 * np.abs(a).max()


# --- checkpoint I/O -------------------------------------------------------------------------


@pytest.mark.parametrize("kind,fmt", [("gpt2", "bin"), ("qwen2", "bin"), ("llama", "sharded")])
def test_bin_and_sharded_checkpoints_load(tmp_path, kind, fmt):
    """pytorch_model.bin without torch, and the sharded safetensors 0.5B-class hub models ship
    (model.safetensors.index.json and its shards)."""
    model = _torch_model(kind, num_key_value_heads=2) if kind != "gpt2" else _torch_model(kind)
    if fmt == "sharded":
        model.save_pretrained(tmp_path, max_shard_size="20KB")
        shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
        assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
        assert not (tmp_path / "model.safetensors").exists()
    else:
        _saved(model, tmp_path, "bin")
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(model, ids, mask), mask) < 1e-4


def test_a_bfloat16_checkpoint_loads(tmp_path):
    """Qwen2.5, Llama 3.2, SmolLM2 and Qwen3 ship bfloat16 safetensors: they load (into
    float32 here; safetensors.numpy reads bfloat16 as ml_dtypes registers it with numpy) and
    give the logits of transformers' model with the same rounded weights."""
    model = _torch_model("qwen2", num_key_value_heads=2, tie_word_embeddings=True)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    # The bf16-rounded weights computed in float32 (a fresh model: model.to(float32) would
    # keep the rotary frequencies rounded to bfloat16).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert jax.tree.leaves(mlm.params)[0].dtype == jnp.float32
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(model, ids, mask), mask) < 1e-4


DISTILGPT2_CONFIG = {  # distilgpt2's config.json, scaled down (n_embd, n_head, vocab, n_ctx)
    "_num_labels": 1, "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
    "attn_pdrop": 0.1, "bos_token_id": 1, "embd_pdrop": 0.1, "eos_token_id": 2,
    "id2label": {"0": "LABEL_0"}, "initializer_range": 0.02, "label2id": {"LABEL_0": 0},
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 64, "n_embd": 48, "n_head": 4,
    "n_layer": 6, "n_positions": 64, "resid_pdrop": 0.1, "summary_activation": None,
    "summary_first_dropout": 0.1, "summary_proj_to_labels": True, "summary_type": "cls_index",
    "summary_use_proj": True, "task_specific_params": {
        "text-generation": {"do_sample": True, "max_length": 50}}, "vocab_size": VOCAB}


def test_a_distilgpt2_shaped_checkpoint_in_the_hubs_layout_loads(tmp_path):
    """distilgpt2's config (n_inner absent: 4 * n_embd) and the hub's GPT-2 weight files: a
    bare GPT2Model state dict (no ``transformer.`` prefix, no lm_head) with every layer's
    ``attn.bias`` / ``attn.masked_bias`` buffers, as safetensors and as pytorch_model.bin."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _redraw_at_unit_scale(transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(
        DISTILGPT2_CONFIG, attn_implementation="eager"))).eval()
    bare = {k.removeprefix("transformer."): v.contiguous()
            for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for i in range(6):
        bare[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.uint8))[None, None]
        bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ids, mask = _padded_batch()
    expected = _torch_logits(model, ids, mask)
    for fmt in ("safetensors", "bin"):
        directory = tmp_path / fmt
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(DISTILGPT2_CONFIG))
        if fmt == "bin":
            torch.save(bare, directory / "pytorch_model.bin")
        else:
            save_file(bare, directory / "model.safetensors", metadata={"format": "pt"})
        mlm = load_mlm(directory, load_tokenizer=False)
        assert (mlm.config.num_layers, mlm.config.intermediate_size) == (6, 4 * 48)
        assert _largest_gap(_ours(mlm, ids, mask), expected, mask) < 1e-4, fmt


@pytest.mark.parametrize("kind,switches", [
    ("gpt2", {}), ("llama", {"num_key_value_heads": 2}), ("qwen2", {}),
    ("qwen3", {"head_dim": 16, "attention_bias": True})])
def test_key_table_names_every_tensor_of_both_sides(kind, switches):
    """Our table's transformers names are exactly the model's state dict (the tied head aside)
    and its paths exactly our model's params, tied and untied."""
    for tie in (True, False):
        model = _torch_model(kind, tie_word_embeddings=tie, **switches)
        config = config_from_hf_dict(model.config.to_dict())
        rows = FAMILIES[family_of(config).name].key_table(config).rows
        theirs = set(model.state_dict())
        if tie:
            theirs.discard("lm_head.weight")
        assert {hf for _, hf, _ in rows} == theirs, (kind, tie)
        assert {path for path, _, _ in rows} == set(flatten_params(
            init_params(config, jax.random.key(0)))), (kind, tie)


# --- saving: transformers opens it and generates what we generate ---------------------------


def _unit_scale_params(params, seed: int):
    """Our params redrawn as _redraw_at_unit_scale draws transformers'."""
    flat = flatten_params(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = {}
    for (path, leaf), key in zip(sorted(flat.items()), keys, strict=True):
        noise = jax.random.normal(key, leaf.shape)
        if path.endswith("/bias"):
            out[path] = 0.2 * noise
        elif path.endswith("/scale"):
            out[path] = 1.0 + 0.2 * noise
        elif path.endswith("/embedding"):
            out[path] = noise
        else:
            out[path] = noise * leaf.shape[0] ** -0.5
    return unflatten_params(out)


def _greedy(params, config, prompt: np.ndarray, steps: int) -> np.ndarray:
    """Greedy decoding with our forward: the sequence so far, right-padded to its final length
    (one compiled shape), the next token the argmax of the logits after its last token."""
    batch, length = prompt.shape[0], prompt.shape[1] + steps
    ids = np.full((batch, length), PAD, np.int64)
    ids[:, :prompt.shape[1]] = prompt
    logits_at = jax.jit(lambda ids, mask, at: mlm_forward(
        params, ids, mask, config=config, output_positions=at)["logits"])
    for t in range(prompt.shape[1], length):
        mask = np.broadcast_to(np.arange(length) < t, ids.shape).astype(np.int32)
        ids[:, t] = np.asarray(jnp.argmax(logits_at(ids, mask, np.full(batch, t - 1)), -1))
    return ids


SAVED_CONFIGS = {
    "gpt2": GPT2Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                       intermediate_size=64, max_position_embeddings=40, bos_token_id=1,
                       eos_token_id=2),
    "gpt2_untied": GPT2Config(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                              intermediate_size=64, max_position_embeddings=40,
                              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama3_gqa_tied": LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=8, intermediate_size=48, max_position_embeddings=40, tie_word_embeddings=True,
        rope=RopeParameters("llama3", 500.0, factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=16),
        pad_token_id=PAD, bos_token_id=1, eos_token_id=(2, 3)),
    "qwen2": LlamaConfig(family="qwen2", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=48,
                         max_position_embeddings=40, attention_bias=True,
                         layer_types=("full_attention", "sliding_attention"), sliding_window=4,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
    "qwen3": LlamaConfig(family="qwen3", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                         num_heads=4, num_kv_heads=1, head_dim=16, intermediate_size=48,
                         max_position_embeddings=40, rope=RopeParameters("default", 1e6),
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("name", list(SAVED_CONFIGS))
def test_save_mlm_writes_a_checkpoint_transformers_generates_from(tmp_path, name):
    """save_mlm's checkpoint opens with AutoModelForCausalLM, gives our logits, and greedy
    generate continues a prompt as a greedy loop over our forward does."""
    config = SAVED_CONFIGS[name]
    params = _unit_scale_params(init_params(config, jax.random.key(1)), seed=2)
    save_mlm(tmp_path, params, config)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert theirs.config.tie_word_embeddings == config.tie_word_embeddings
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert mlm.config == config
    jax.tree.map(np.testing.assert_array_equal, mlm.params, params)
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(theirs, ids, mask), mask) < 1e-4
    prompt = np.random.default_rng(3).integers(3, VOCAB, (2, 5))
    with torch.no_grad():
        generated = theirs.generate(input_ids=torch.tensor(prompt),
                                    attention_mask=torch.ones(2, 5, dtype=torch.long),
                                    max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                    pad_token_id=PAD).numpy()
    ours = _greedy(params, config, prompt, steps=6)
    np.testing.assert_array_equal(ours, generated)
    assert len({tuple(row[5:]) for row in ours}) > 1  # the continuations depend on the prompt


# --- masks ----------------------------------------------------------------------------------


def _random_binary_masks(spec, params, seed=0):
    rng = np.random.default_rng(seed)
    tree = {}
    for path in spec.paths():
        node, kernel = tree, params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        for key in path:
            kernel = kernel[key]
        node[path[-1]] = (rng.random(kernel.shape) > 0.3).astype(np.float32)
    return tree


TORCH_MATRICES = {
    "gpt2": {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "ffn_in": "mlp.c_fc",
             "ffn_out": "mlp.c_proj"},
    "llama": {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
              "attn_out": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
              "ffn_in": "mlp.up_proj", "ffn_out": "mlp.down_proj"},
}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_masks_on_every_matrix_equal_masked_pytorch_weights(tmp_path, kind):
    """A mask leaf has its kernel's shape: GPT-2's Conv1D weights are masked as they are
    ([in, out]), every nn.Linear's transposed."""
    switches = {"num_key_value_heads": 2} if kind == "llama" else {}
    model = _torch_model(kind, **switches)
    mlm = load_mlm(_saved(model, tmp_path), load_tokenizer=False)
    spec = MaskSpec.create(mlm.config, 1, 2)
    assert spec.matrices == tuple(TORCH_MATRICES[kind]) == FAMILIES[kind].default_matrices
    masks = _random_binary_masks(spec, mlm.params)
    ids, mask = _padded_batch()
    ours = np.asarray(mlm_forward(multiply_masks(mlm.params, masks), ids, mask,
                                  config=mlm.config)["logits"])
    prefix = "transformer.h" if kind == "gpt2" else "model.layers"
    state = model.state_dict()
    with torch.no_grad():
        for i in spec.layers:
            for m in spec.matrices:
                leaf = masks[f"layer_{i}"]
                for key in MaskSpec((i,), (m,)).paths()[0][1:]:
                    leaf = leaf[key]
                weight = state[f"{prefix}.{i}.{TORCH_MATRICES[kind][m]}.weight"]
                weight.mul_(torch.tensor(leaf if kind == "gpt2" else leaf.T))
    assert _largest_gap(ours, _torch_logits(model, ids, mask), mask) < 1e-4
    assert _largest_gap(ours, _ours(mlm, ids, mask), mask) > 1e-2  # the masks prune something


# --- tokenizers -----------------------------------------------------------------------------


def _byte_level_tokenizer(directory: Path, tokenizer_class: str) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen style) whose tokenizer_config.json
    names ``tokenizer_class``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from tests.tokenizer_fixtures import _byte_level_bpe

    vocab, merges = _byte_level_bpe(["cat", "sat", "on", "the", "mat"], ("<|endoftext|>",))
    bpe = Tokenizer(models.BPE(vocab, [tuple(m.split(" ")) for m in merges]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))


def _metaspace_tokenizer(directory: Path, tokenizer_class: str) -> None:
    """A SentencePiece-style BPE tokenizer.json (``▁`` for spaces: TinyLlama, Llama 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    merges = []
    for char in "▁abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(char, len(vocab))
    for word in ("cat", "sat", "on", "the", "mat"):
        current = "▁"
        for char in word:
            if current + char not in vocab:
                vocab[current + char] = len(vocab)
                merges.append((current, char))
            current += char
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    directory.mkdir(parents=True, exist_ok=True)
    bpe.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))


# (model_type, the class tokenizer_config.json names, its tokenizer.json): the layouts of the
# hub checkpoints lamp-jax targets (gpt2/distilgpt2; Llama 3.x; a Llama 3 repo naming
# LlamaTokenizerFast; TinyLlama; SmolLM2; Qwen2.5; Qwen3) and a Qwen2 naming a class
# transformers overrides.
TOKENIZER_LAYOUTS = [("gpt2", "GPT2Tokenizer", "byte-level"),
                     ("llama", "PreTrainedTokenizerFast", "byte-level"),
                     ("llama", "LlamaTokenizerFast", "byte-level"),
                     ("llama", "LlamaTokenizer", "sentencepiece"),
                     ("llama", "GPT2Tokenizer", "byte-level"),
                     ("qwen2", "Qwen2Tokenizer", "byte-level"),
                     ("qwen2", "PreTrainedTokenizerFast", "byte-level"),
                     ("qwen3", "Qwen2Tokenizer", "byte-level")]


@pytest.mark.parametrize("model_type,named,pieces", TOKENIZER_LAYOUTS)
def test_the_tokenizer_is_the_one_autotokenizer_loads(tmp_path, model_type, named, pieces):
    if pieces == "byte-level":
        _byte_level_tokenizer(tmp_path, named)
    else:
        _metaspace_tokenizer(tmp_path, named)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, **(
        {"n_embd": 32, "n_layer": 1, "n_head": 4} if model_type == "gpt2" else LLAMA_SMALL)}))
    ours = load_tokenizer_of(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(ours) is type(theirs), (type(ours), type(theirs))
    texts = ["the cat sat on the mat", " the mat sat"]
    assert ours(texts)["input_ids"] == theirs(texts)["input_ids"]


def test_the_tokenizer_tables_are_transformers_own():
    from transformers.models.auto.tokenization_auto import (
        MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS,
        TOKENIZER_MAPPING_NAMES,
    )

    read = {t for family in FAMILIES.values() for t in family.model_types}
    assert {t: TOKENIZER_MAPPING_NAMES.get(t) for t in read if TOKENIZER_MAPPING_NAMES.get(t)
            } == TOKENIZER_CLASSES
    assert HUB_CLASS_IGNORED == read & set(MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)


def test_loading_a_causal_model_does_not_import_torch(tmp_path):
    for kind in ("gpt2", "qwen2"):
        directory = tmp_path / kind
        _saved(_torch_model(kind), directory)
        _byte_level_tokenizer(directory, "GPT2Tokenizer" if kind == "gpt2" else "Qwen2Tokenizer")
    code = ("import sys\nfrom lamp_jax.models import load_mlm\n"
            "for path in sys.argv[1:]:\n    assert load_mlm(path).tokenizer is not None\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gpt2"),
                           str(tmp_path / "qwen2")], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
