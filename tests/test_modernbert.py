"""ModernBERT: parity of our Flax model with transformers' PyTorch ``ModernBertForMaskedLM`` for
every architectural switch, checkpoint I/O, masks, the LAMA encoding and the export.

The reference models are random-init transformers models saved with ``save_pretrained``, their
weights re-drawn at a scale where every switch moves the logits by far more than the 1e-4
tolerance (transformers' own init, std 0.02, gives logits of about 0.5).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.data import encode_facts, read_lama_set
from lamp_jax.masks import MaskMode, MaskSpec, apply_masks, multiply_masks
from lamp_jax.models import (
    FAMILIES,
    ModernBertConfig,
    encode_prefix,
    init_params,
    load_mlm,
    mlm_forward,
    save_mlm,
)
from lamp_jax.models.checkpoint_io import CheckpointMismatchError
from lamp_jax.models.checkpoint_keys import flatten_params
from lamp_jax.models.modernbert.modeling import FULL, SLIDING
from lamp_jax.models.modernbert.params import key_table, param_shapes
from tests.needs import require
from tests.tokenizer_fixtures import make_modernbert_tokenizer, words_of

torch = require("torch")
transformers = require("transformers")

FIXTURE = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"
SPECIAL_IDS = dict(pad_token_id=3, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
# Global, local, global, local: the last layer (computed only at the [MASK] rows when
# output_positions is given) is a local one. local_attention 4: each side sees 2 tokens, and
# the prompts below are 12 tokens long, so local attention really cuts keys off.
LAYER_TYPES = [FULL, SLIDING, FULL, SLIDING]
SMALL = dict(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, max_position_embeddings=64, local_attention=4,
             layer_types=LAYER_TYPES,
             rope_parameters={FULL: {"rope_type": "default", "rope_theta": 1000.0},
                              SLIDING: {"rope_type": "default", "rope_theta": 50.0}})
LENGTHS = [12, 7, 3, 12]  # rows 1 and 2 are padded


def _hf_model(attn: str = "eager", vocab_size: int = 99, special: dict | None = None,
              **switches):
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(**{**SMALL, "vocab_size": vocab_size},
                                        **(special or SPECIAL_IDS), attn_implementation=attn,
                                        **switches)
    model = transformers.ModernBertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in name:
                p.normal_(1.0, 0.2)
            elif "embeddings" in name:
                p.normal_(0.0, 1.0)
            else:  # a linear layer [out, in]: unit-scale outputs
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model


def _padded_batch(vocab: int = 99):
    rng = np.random.default_rng(0)
    ids = np.full((len(LENGTHS), max(LENGTHS)), SPECIAL_IDS["pad_token_id"], np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(LENGTHS):
        ids[row, :n] = rng.integers(5, vocab, n)
        ids[row, 0], ids[row, n - 1] = SPECIAL_IDS["cls_token_id"], SPECIAL_IDS["sep_token_id"]
        mask[row, :n] = 1
    return ids, mask


def _torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def _ours(mlm, ids, mask, **kwargs):
    return np.asarray(mlm_forward(mlm.params, jnp.asarray(ids), jnp.asarray(mask),
                                  config=mlm.config, **kwargs)["logits"])


def _largest_gap(a, b, mask):
    real = mask.astype(bool)  # padded rows are garbage in both implementations
    return float(np.abs(a[real] - b[real]).max())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """transformers' defaults for the switches (no norm/attention/MLP biases, decoder bias,
    tied decoder), saved and loaded back with load_mlm."""
    directory = tmp_path_factory.mktemp("modernbert")
    model = _hf_model()
    model.save_pretrained(directory)
    return model, load_mlm(directory, load_tokenizer=False)


SWITCHES = {
    "defaults_eager": ("eager", {}),
    "defaults_sdpa": ("sdpa", {}),
    "norm_bias": ("eager", {"norm_bias": True}),
    "attention_bias": ("eager", {"attention_bias": True}),
    "mlp_bias": ("eager", {"mlp_bias": True}),
    "every_bias": ("sdpa", {"norm_bias": True, "attention_bias": True, "mlp_bias": True,
                            "classifier_bias": True}),
    "untied_no_decoder_bias": ("eager", {"tie_word_embeddings": False, "decoder_bias": False}),
    "tanh_gelu_mlp_relu_head": ("eager", {"hidden_activation": "gelu_pytorch_tanh",
                                          "classifier_activation": "relu"}),
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_logits_match_pytorch_for_every_switch(tmp_path, name):
    attn, switches = SWITCHES[name]
    model = _hf_model(attn, **switches)
    model.save_pretrained(tmp_path)
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    for key, value in switches.items():
        ours = {"hidden_activation": "hidden_act", "classifier_activation": "classifier_act"}
        assert getattr(mlm.config, ours.get(key, key)) == value, key
    assert mlm.config.layer_types == tuple(LAYER_TYPES)
    assert (mlm.config.global_rope_theta, mlm.config.local_rope_theta) == (1000.0, 50.0)
    ids, mask = _padded_batch()
    expected = _torch_logits(model, ids, mask)
    assert np.abs(expected).max() > 1.0  # a scale at which 1e-4 means something
    assert _largest_gap(_ours(mlm, ids, mask), expected, mask) < 1e-4


def test_hidden_states_and_attentions_equal_transformers(base):
    """What the representation analysis reads (lamp_jax.analysis.representations): every
    layer's hidden states and attention probabilities, as transformers returns them. The last
    hidden state is the final norm's output (``last_hidden_state``), what the head sees."""
    model, mlm = base
    ids, mask = _padded_batch()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       output_hidden_states=True, output_attentions=True)
    ours = mlm_forward(mlm.params, jnp.asarray(ids), jnp.asarray(mask), config=mlm.config,
                       output_hidden_states=True, output_attentions=True)
    assert len(ours["hidden_states"]) == len(theirs.hidden_states) == len(LAYER_TYPES) + 1
    for layer, (a, b) in enumerate(zip(ours["hidden_states"], theirs.hidden_states,
                                       strict=True)):
        assert _largest_gap(np.asarray(a), b.numpy(), mask) < 1e-4, f"hidden state {layer}"
    for layer, (a, b) in enumerate(zip(ours["attentions"], theirs.attentions, strict=True)):
        real = mask.astype(bool)  # queries of real tokens; keys of padding get 0 in both
        np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[real],
                                   b.numpy().transpose(0, 2, 1, 3)[real], atol=1e-5,
                                   err_msg=f"attention {layer}")


def test_the_hub_checkpoints_config_layout_loads_too(tmp_path):
    """answerdotai/ModernBERT-base's config.json predates layer_types and rope_parameters: it
    has global_attn_every_n_layers and global/local_rope_theta. transformers and we must read
    the same architecture from it."""
    model = _hf_model()
    model.save_pretrained(tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    del hf["layer_types"], hf["rope_parameters"]
    hf.update(global_attn_every_n_layers=2, global_rope_theta=1000.0, local_rope_theta=50.0)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert reloaded.config.layer_types == [FULL, SLIDING, FULL, SLIDING]
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert mlm.config.layer_types == tuple(LAYER_TYPES)
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(reloaded, ids, mask), mask) < 1e-4


def test_the_window_and_both_rotary_bases_matter(base):
    """What the parity tests rely on: a longer local window, or swapped rotary bases, change
    the logits far beyond their tolerance, so matching transformers pins all three down."""
    _, mlm = base
    ids, mask = _padded_batch()
    ours = _ours(mlm, ids, mask)
    for change in ({"local_attention": 64},
                   {"global_rope_theta": mlm.config.local_rope_theta,
                    "local_rope_theta": mlm.config.global_rope_theta},
                   {"layer_types": (FULL,) * 4}):
        config = dataclasses.replace(mlm.config, **change)
        other = np.asarray(mlm_forward(mlm.params, ids, mask, config=config)["logits"])
        assert _largest_gap(ours, other, mask) > 1e-2, change


def test_local_layers_attend_only_within_half_the_window(base):
    _, mlm = base
    ids, mask = _padded_batch()
    attentions = mlm_forward(mlm.params, ids, mask, config=mlm.config,
                             output_attentions=True)["attentions"]
    half = mlm.config.local_attention // 2
    distance = np.abs(np.arange(12)[:, None] - np.arange(12)[None, :])
    for layer, kind in enumerate(LAYER_TYPES):
        probs = np.asarray(attentions[layer])  # [B, heads, L, L]
        for row, n in enumerate(LENGTHS):
            real = probs[row, :, :n, :]  # the real tokens' queries
            assert np.all(real[:, :, n:] == 0), "padded keys get no attention"
            beyond = real[:, :, :n][:, distance[:n, :n] > half]  # keys beyond the window
            if kind == SLIDING:
                assert np.all(beyond == 0), layer
            else:
                assert np.all(beyond > 0), layer


def test_output_positions_and_the_cached_prefix_equal_the_full_forward(base):
    _, mlm = base
    ids, mask = _padded_batch()
    full = _ours(mlm, ids, mask)
    positions = np.array([4, 5, 1, 10])  # row 0's 4 and row 3's 10: near other windows' edges
    rows = np.arange(len(positions))
    at = _ours(mlm, ids, mask, output_positions=positions)
    np.testing.assert_allclose(at, full[rows, positions], atol=1e-5)
    both = np.array([[4, 11], [0, 6], [2, 1], [10, 3]])
    at2 = _ours(mlm, ids, mask, output_positions=both)
    np.testing.assert_allclose(at2, full[rows[:, None], both], atol=1e-5)
    for start in range(mlm.config.num_layers + 1):
        hidden = encode_prefix(mlm.params, ids, mask, config=mlm.config, stop_layer=start)
        assert hidden.shape == (*ids.shape, mlm.config.hidden_size)
        resumed = mlm_forward(mlm.params, None, mask, config=mlm.config, hidden=hidden,
                              start_layer=start, output_positions=positions)["logits"]
        np.testing.assert_allclose(resumed, full[rows, positions], atol=1e-5)
    with pytest.raises(ValueError, match="needs the hidden states"):
        mlm_forward(mlm.params, ids, mask, config=mlm.config, start_layer=1)


@pytest.mark.parametrize("switches", [{}, {"norm_bias": True, "attention_bias": True,
                                          "mlp_bias": True, "classifier_bias": True,
                                          "tie_word_embeddings": False}])
def test_key_table_names_every_tensor_of_both_sides(switches):
    """Our table's transformers names are exactly ModernBertForMaskedLM's state dict (the tied
    decoder weight aside) and its paths exactly our model's params, for these switches."""
    model = _hf_model(**switches)
    config = ModernBertConfig.from_hf_dict(model.config.to_dict())
    rows = key_table(config).rows
    theirs = set(model.state_dict())
    if config.tie_word_embeddings:
        theirs.discard("decoder.weight")
    assert {hf for _, hf, _ in rows} == theirs
    ours = set(flatten_params(init_params(config, jax.random.key(0))))
    assert {path for path, _, _ in rows} == ours
    assert "layer_0/attn_norm/scale" not in ours and "layer_1/attn_norm/scale" in ours


def test_a_checkpoint_that_does_not_fit_is_refused_with_every_problem(tmp_path):
    from safetensors.numpy import load_file, save_file

    _hf_model(norm_bias=True).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.2.mlp.Wi.weight"]
    weights["model.layers.1.attn.Wqkv.weight"] = weights["model.layers.1.attn.Wqkv.weight"][:48]
    weights["model.layers.0.attn_norm.weight"] = np.ones(32, np.float32)  # layer 0 has none
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as err:
        load_mlm(tmp_path, load_tokenizer=False)
    message = str(err.value)
    for expected in ("missing keys (1): model.layers.2.mlp.Wi.weight",
                     "model.layers.1.attn.Wqkv.weight: checkpoint (48, 32), model expects "
                     "(96, 32)", "unexpected keys (1): model.layers.0.attn_norm.weight"):
        assert expected in message
    # Biases are part of the architecture: a config without norm biases refuses them.
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "norm_bias": False}))
    with pytest.raises(CheckpointMismatchError, match=r"model\.final_norm\.bias"):
        load_mlm(tmp_path, load_tokenizer=False)


@pytest.mark.parametrize("tie", [True, False])
def test_save_mlm_writes_a_checkpoint_transformers_opens(tmp_path, tie):
    config = ModernBertConfig(vocab_size=99, hidden_size=32, num_layers=3, num_heads=4,
                              intermediate_size=48, max_position_embeddings=64,
                              layer_types=(SLIDING, FULL, SLIDING), local_attention=6,
                              global_rope_theta=500.0, local_rope_theta=20.0, norm_bias=True,
                              mlp_bias=True, tie_word_embeddings=tie, pad_token_id=3,
                              bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    params = init_params(config, jax.random.key(1))
    noise = jax.random.split(jax.random.key(2), len(jax.tree.leaves(params)))
    params = jax.tree.unflatten(jax.tree.structure(params), [  # non-zero biases, varied norms
        p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(
            jax.tree.leaves(params), noise, strict=True)])
    save_mlm(tmp_path, params, config)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(
        tmp_path, attn_implementation="eager").eval()
    assert type(theirs).__name__ == "ModernBertForMaskedLM"
    assert theirs.config.tie_word_embeddings == tie
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert mlm.config == config
    jax.tree.map(np.testing.assert_array_equal, mlm.params, params)
    ids, mask = _padded_batch()
    assert _largest_gap(_ours(mlm, ids, mask), _torch_logits(theirs, ids, mask), mask) < 1e-4


# --- masks ----------------------------------------------------------------------------------


def _random_binary_masks(spec, params, seed=0):
    rng = np.random.default_rng(seed)
    tree = {}
    for path in spec.paths():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        kernel = params
        for key in path:
            kernel = kernel[key]
        node[path[-1]] = (rng.random(kernel.shape) > 0.3).astype(np.float32)
    return tree


def test_masks_on_the_four_modernbert_matrices_equal_masked_pytorch_weights(base):
    model, mlm = base
    spec = MaskSpec.create(mlm.config, 2, 3)
    assert spec.matrices == ("qkv", "attn_out", "ffn_in", "ffn_out") == FAMILIES[
        "modernbert"].default_matrices
    ids, mask = _padded_batch()
    full = _ours(mlm, ids, mask)
    # All-ones masks (logits far above the threshold) leave the model exactly as it was.
    ones = jax.tree.map(lambda m: jnp.full(m.shape, 10.0), _random_binary_masks(spec, mlm.params))
    kept = apply_masks(mlm.params, ones, MaskMode("stochastic").for_inference())
    np.testing.assert_array_equal(
        np.asarray(mlm_forward(kept, ids, mask, config=mlm.config)["logits"]), full)
    # A random binary mask: ours on the Flax kernels, the same 0/1 pattern on torch's weights.
    masks = _random_binary_masks(spec, mlm.params)
    ours = np.asarray(mlm_forward(multiply_masks(mlm.params, masks), ids, mask,
                                  config=mlm.config)["logits"])
    torch_names = {"qkv": "attn.Wqkv", "attn_out": "attn.Wo", "ffn_in": "mlp.Wi",
                   "ffn_out": "mlp.Wo"}
    masked = _hf_model()
    state = masked.state_dict()
    with torch.no_grad():
        for i in spec.layers:
            for m in spec.matrices:
                leaf = masks[f"layer_{i}"]
                for key in MaskSpec((i,), (m,)).paths()[0][1:]:
                    leaf = leaf[key]
                state[f"model.layers.{i}.{torch_names[m]}.weight"].mul_(torch.tensor(leaf.T))
    expected = _torch_logits(masked, ids, mask)
    assert _largest_gap(ours, expected, mask) < 1e-4
    assert _largest_gap(ours, full, mask) > 1e-2  # the masks did prune something that matters


def test_bert_matrix_names_are_refused_for_modernbert(base):
    _, mlm = base
    with pytest.raises(ValueError, match=r"no matrices \['query'\]"):
        MaskSpec.create(mlm.config, 2, 3, ("query", "ffn_in"))


# --- tokenizer, LAMA encoding and export ----------------------------------------------------


@pytest.fixture(scope="module")
def lama_model(tmp_path_factory):
    """A random ModernBERT (saved by transformers) with a byte-level BPE tokenizer in
    ModernBERT's layout covering the LAMA fixture's words."""
    directory = tmp_path_factory.mktemp("modernbert_lama")
    facts = read_lama_set(FIXTURE).facts
    texts = [s for f in facts for s in f.sentences] + [f.obj for f in facts]
    tokenizer = make_modernbert_tokenizer(directory, words_of(texts))
    special = {"pad_token_id": tokenizer.pad_token_id, "cls_token_id": tokenizer.cls_token_id,
               "sep_token_id": tokenizer.sep_token_id, "bos_token_id": tokenizer.cls_token_id,
               "eos_token_id": tokenizer.sep_token_id}
    _hf_model(vocab_size=len(tokenizer), special=special).save_pretrained(directory)
    return directory, facts


def _fill_mask(directory, **kwargs):
    from transformers import pipeline

    return pipeline("fill-mask", model=str(directory), device="cpu", **kwargs)


def test_lama_encoding_and_scores_equal_transformers_fill_mask(lama_model):
    """ModernBERT's tokenizer is byte-level BPE: the object is looked up as the word-initial
    ``Ġ<obj>`` token, the [MASK] takes the space before it, and the ids, the [MASK] position
    and the object's probability are exactly what ``pipeline("fill-mask")`` encodes and
    scores."""
    directory, facts = lama_model
    mlm = load_mlm(directory)
    tokenizer = mlm.tokenizer
    relations = sorted({f.relation for f in facts})
    encoded, report = encode_facts(facts, tokenizer, relations)
    assert report.space_prefixed and report.kept == len(encoded) > 10
    logits = mlm_forward(mlm.params, encoded.input_ids, encoded.attention_mask,
                         config=mlm.config, output_positions=encoded.mask_pos)["logits"]
    probs = np.asarray(jax.nn.softmax(logits))
    fill = _fill_mask(directory)
    checked = 0
    for row, fact_index in enumerate(encoded.fact_index):
        fact = facts[fact_index]
        if len(fact.sentences) != 1:  # a row names its fact, not which of its sentences
            continue
        (sentence,), obj = fact.sentences, fact.obj
        checked += 1
        n = int(encoded.attention_mask[row].sum())
        ids = list(encoded.input_ids[row, :n])
        assert ids == list(fill.preprocess(sentence)["input_ids"][0].numpy()), sentence
        assert ids[int(encoded.mask_pos[row])] == tokenizer.mask_token_id
        assert tokenizer.convert_ids_to_tokens(int(encoded.obj_id[row])) == "Ġ" + obj
        [scored] = fill(sentence, targets=[" " + obj])
        assert scored["token"] == encoded.obj_id[row]
        assert abs(scored["score"] - probs[row, encoded.obj_id[row]]) < 1e-5
    assert checked > 10


def test_masked_params_saved_with_save_mlm_give_transformers_fill_mask_our_top5(
        lama_model, tmp_path):
    directory, facts = lama_model
    mlm = load_mlm(directory)
    spec = MaskSpec.create(mlm.config)  # the upper half: layers 2..3, all four matrices
    masked = multiply_masks(mlm.params, _random_binary_masks(spec, mlm.params, seed=1))
    save_mlm(tmp_path, jax.device_get(masked), mlm.config, mlm.tokenizer)
    prompt = facts[0].sentences[0]
    encoded = mlm.tokenizer([prompt], return_tensors="np")
    position = np.flatnonzero(encoded["input_ids"][0] == mlm.tokenizer.mask_token_id)
    probs = np.asarray(jax.nn.softmax(mlm_forward(
        masked, encoded["input_ids"], encoded["attention_mask"], config=mlm.config,
        output_positions=position)["logits"][0]))
    top = np.argsort(-probs)[:5]
    theirs = _fill_mask(tmp_path, top_k=5)(prompt)
    assert [row["token"] for row in theirs] == list(top)
    assert np.abs(np.array([row["score"] for row in theirs]) - probs[top]).max() < 1e-5
    unmasked = _fill_mask(directory, top_k=5)(prompt)
    assert [row["token"] for row in unmasked] != list(top)  # the export carries the mask


# --- the packaged config and its memory -----------------------------------------------------


def test_the_modernbert_conceptnet_config_masks_the_upper_half_of_modernbert_base():
    from lamp_jax.config_checks import validate_config

    c = importlib.import_module("lamp_jax.configs.modernbert_conceptnet").get_config()
    validate_config(c)
    assert c.model == "answerdotai/ModernBERT-base"
    base_config = ModernBertConfig()  # transformers' defaults are ModernBERT-base's shapes
    assert (base_config.num_layers, base_config.hidden_size) == (22, 768)
    spec = MaskSpec.create(base_config, c.mask.first_layer, c.mask.last_layer,
                           tuple(c.mask.matrices))
    assert spec.layers == tuple(range(11, 22))
    assert spec.matrices == FAMILIES["modernbert"].default_matrices
    # The README's memory row: mask weights per relation, from the model's own shapes.
    shapes = param_shapes(base_config)
    weights = sum(int(np.prod(shapes["/".join(p)])) for p in spec.paths())
    assert weights == 55_148_544
    assert 16 * weights * 12 == 10_588_520_448 and 16 * weights * 8 == 7_059_013_632


# --- training end to end --------------------------------------------------------------------


@pytest.mark.slow  # 16 s on an idle 2-core machine (compiles dominate), 50 s on a busy one
def test_train_and_evaluate_then_load_run_on_a_tiny_modernbert(lama_model, tmp_path):
    """train.py's run on a random ModernBERT (masks on its upper half, all four matrices, the
    frozen prefix cached), then the notebook API: predict with a relation's subnetwork, the
    exported subnetwork in transformers' fill-mask, the bit-packed masks; then evaluate and
    the report."""
    from lamp_jax.api import load_run
    from lamp_jax.checkpoint import load_binary_masks
    from lamp_jax.configs import default
    from lamp_jax.evaluate import reevaluate
    from lamp_jax.loop import train_and_evaluate
    from lamp_jax.masks import hard_mask
    from lamp_jax.report import write_report
    from tests.test_export import assert_export_matches_predict

    directory, facts = lama_model
    c = default.get_config()
    c.model, c.data.source = str(directory), str(FIXTURE)
    c.mask.matrices = FAMILIES["modernbert"].default_matrices
    c.data.relations = ("AtLocation", "IsA")
    c.batch_size, c.epochs, c.optim.learning_rate = 4, 1, 0.5
    c.mask.init, c.mask.init_sparsity = "target", 0.3  # random weights: start 30% pruned
    c.specialization, c.plots = False, False
    summary = train_and_evaluate(c, tmp_path / "run", log=lambda *_: None)
    run = load_run(tmp_path / "run")
    assert run.spec == MaskSpec((2, 3), FAMILIES["modernbert"].default_matrices)
    assert summary["test"]["pruned"]["count"] > 0
    relation = "AtLocation"
    prompt = next(f.sentences[0] for f in facts if f.relation == relation)
    top = run.predict(prompt, relation=relation)
    assert len(top) == 5 and top != run.predict(prompt)  # the subnetwork is not the full model
    assert_export_matches_predict(run, relation, prompt, tmp_path / "export")
    bits, spec, relations = load_binary_masks(tmp_path / "run" / "masks.npz")
    assert spec == run.spec and relations == run.relations
    assert bits["layer_3"]["attention"]["qkv"]["kernel"].shape[1:] == (32, 96)
    for packed, logits in zip(jax.tree.leaves(bits), jax.tree.leaves(run.mask_logits),
                              strict=True):
        np.testing.assert_array_equal(packed, hard_mask(np.asarray(logits), 0.5))
    # lamp_jax.evaluate and the report open it as they open a BERT run.
    quiet = lambda *args, **kwargs: None  # noqa: E731
    assert reevaluate(tmp_path / "run", log=quiet)["test"] == summary["test"]
    index = write_report(tmp_path / "run", max_size=1, log=quiet) / "index.md"
    assert "# lamp-jax report" in index.read_text()
