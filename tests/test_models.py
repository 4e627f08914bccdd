"""Parity of our Flax MLMs with transformers' PyTorch implementations, and checkpoint I/O."""

import ast
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.models import (
    FAMILIES,
    ModelConfig,
    encode_prefix,
    init_params,
    load_mlm,
    matrix_paths,
    mlm_forward,
    save_mlm,
)
from lamp_jax.models.checkpoint_io import CheckpointMismatchError, read_torch_bin
from tests.needs import require

torch = require("torch")
transformers = require("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=99, max_position_embeddings=40)


def _hf_model(family: str, tie: bool = True):
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(**SMALL, tie_word_embeddings=tie)
        return transformers.BertForMaskedLM(cfg)
    if family == "roberta":
        cfg = transformers.RobertaConfig(**SMALL, pad_token_id=1, bos_token_id=0,
                                         eos_token_id=2, type_vocab_size=1)
        return transformers.RobertaForMaskedLM(cfg)
    cfg = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4,
                                        hidden_dim=64, max_position_embeddings=40)
    return transformers.DistilBertForMaskedLM(cfg)


def _randomise_head_bias(model):
    # HF initialises the MLM bias at zero; a zero bias would hide a mapping error.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))


def _save(model, directory, fmt: str):
    model.save_pretrained(directory)
    if fmt == "bin":
        # transformers 5 always writes safetensors; write the legacy format as torch.save does.
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    return directory


def _padded_batch(pad_id: int, cls_id: int, sep_id: int, vocab: int = 99):
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3, 12]
    ids = np.full((len(lengths), 12), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(5, vocab, n)
        ids[row, 0], ids[row, n - 1] = cls_id, sep_id
        mask[row, :n] = 1
    return ids, mask


def _torch_logits(model, ids, mask):
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("family,tie", [("bert", True), ("bert", False), ("roberta", True),
                                        ("distilbert", True)])
def test_logits_match_pytorch(tmp_path, family, tie, fmt):
    model = _hf_model(family, tie)
    _randomise_head_bias(model)
    _save(model, tmp_path, fmt)
    mlm = load_mlm(tmp_path, load_tokenizer=False)
    assert mlm.config.family == family and mlm.config.tie_word_embeddings == tie
    pad = mlm.config.pad_token_id
    ids, mask = _padded_batch(pad, cls_id=2 if family != "roberta" else 0, sep_id=3)
    expected = _torch_logits(model, ids, mask)
    got = np.asarray(mlm.forward(jnp.asarray(ids), jnp.asarray(mask))["logits"])
    real = mask.astype(bool)  # padded positions are garbage in both implementations
    assert np.abs(got[real] - expected[real]).max() < 1e-4


def test_dense_equals_flax_dense_in_params_outputs_and_gradients():
    # The model's row-flattened dense layer must be a drop-in for nn.Dense: same param names and
    # init (checkpoint tables, random test models), same outputs and kernel gradients.
    import flax.linen as nn

    from lamp_jax.models.layers import DenseParams, dense

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return dense(x, *DenseParams(24, name="layer")(x.shape[-1]), jnp.float32)

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(24, name="layer")(x)

    x = jax.random.normal(jax.random.key(1), (3, 5, 16))
    ours, ref = Ours().init(jax.random.key(0), x), Flax().init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    jax.tree.map(np.testing.assert_array_equal, ours, ref)
    params = jax.tree.map(lambda p: p + 0.1, ref)  # a non-zero bias
    np.testing.assert_allclose(Ours().apply(params, x), Flax().apply(params, x), atol=1e-6)
    grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x))))(params)  # noqa: E731
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5)  # noqa: E731
    jax.tree.map(close, grad(Ours()), grad(Flax()))


def test_output_positions_gathers_the_same_logits(tmp_path):
    config = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                         intermediate_size=64, max_position_embeddings=16)
    params = init_params(config, jax.random.key(0))
    ids, mask = _padded_batch(0, 2, 3, vocab=50)
    full = mlm_forward(params, ids, mask, config=config)["logits"]
    pos = jnp.array([1, 4, 0, 11])
    at = mlm_forward(params, ids, mask, config=config, output_positions=pos)["logits"]
    np.testing.assert_allclose(at, full[jnp.arange(4), pos], atol=1e-5)
    pos2 = jnp.array([[1, 2]] * 4)
    at2 = mlm_forward(params, ids, mask, config=config, output_positions=pos2)["logits"]
    np.testing.assert_allclose(at2, full[:, 1:3], atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_frozen_prefix_and_last_layer_rows_match_pytorch(tmp_path, family):
    """The fast paths (last layer only at [MASK], forward resumed from a cached prefix) give
    transformers' logits at [MASK], on a padded batch, for every split layer."""
    model = _hf_model(family)
    _randomise_head_bias(model)
    mlm = load_mlm(_save(model, tmp_path, "safetensors"), load_tokenizer=False)
    pad = mlm.config.pad_token_id
    ids, mask = _padded_batch(pad, 0 if family == "roberta" else 2, 3)
    positions = np.array([5, 1, 2, 11])  # a real token of every row, incl. the short ones
    theirs = _torch_logits(model, ids, mask)[np.arange(4), positions]
    for start in range(mlm.config.num_layers + 1):
        hidden = encode_prefix(mlm.params, ids, mask, config=mlm.config, stop_layer=start)
        assert hidden.shape == (4, 12, 32)
        ours = mlm_forward(mlm.params, None, mask, config=mlm.config, hidden=hidden,
                           start_layer=start, output_positions=positions)["logits"]
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"start_layer {start}")
    with pytest.raises(ValueError, match="needs the hidden states"):
        mlm_forward(mlm.params, ids, mask, config=mlm.config, start_layer=1)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_hidden_states_and_attentions_match_pytorch(tmp_path, family):
    """What the representation analysis reads (lamp_jax.analysis.representations): the
    embeddings' and every layer's output, and every layer's attention probabilities."""
    model = _hf_model(family)
    _randomise_head_bias(model)
    mlm = load_mlm(_save(model, tmp_path, "safetensors"), load_tokenizer=False)
    ids, mask = _padded_batch(mlm.config.pad_token_id, 0 if family == "roberta" else 2, 3)
    model.eval()
    model.set_attn_implementation("eager")  # sdpa returns no attention probabilities
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       output_hidden_states=True, output_attentions=True)
    ours = mlm.forward(jnp.asarray(ids), jnp.asarray(mask), output_hidden_states=True,
                       output_attentions=True)
    real = mask.astype(bool)  # padded positions are garbage in both implementations
    assert len(ours["hidden_states"]) == len(theirs.hidden_states) == 3
    for layer, (a, b) in enumerate(zip(ours["hidden_states"], theirs.hidden_states,
                                       strict=True)):
        np.testing.assert_allclose(np.asarray(a)[real], b.numpy()[real], atol=1e-4,
                                   err_msg=f"hidden state {layer}")
    assert len(ours["attentions"]) == len(theirs.attentions) == 2
    for layer, (a, b) in enumerate(zip(ours["attentions"], theirs.attentions, strict=True)):
        np.testing.assert_allclose(np.asarray(a).transpose(0, 2, 1, 3)[real],
                                   b.numpy().transpose(0, 2, 1, 3)[real], atol=1e-5,
                                   err_msg=f"attention {layer}")


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_padding_does_not_change_real_tokens(tmp_path, family):
    mlm = load_mlm(_save(_hf_model(family), tmp_path, "safetensors"), load_tokenizer=False)
    pad = mlm.config.pad_token_id
    ids, mask = _padded_batch(pad, 0 if family == "roberta" else 2, 3)
    short = ids[1:2, :7], mask[1:2, :7]  # row 1 has 7 real tokens
    alone = mlm.forward(*short, output_hidden_states=True, output_attentions=True)
    padded = mlm.forward(ids[1:2], mask[1:2], output_hidden_states=True, output_attentions=True)
    np.testing.assert_allclose(padded["logits"][:, :7], alone["logits"], atol=1e-5)
    np.testing.assert_allclose(padded["hidden_states"][-1][:, :7], alone["hidden_states"][-1],
                               atol=1e-5)
    last_attention = padded["attentions"][-1]
    assert last_attention.shape == (1, 4, 12, 12)
    assert float(jnp.abs(last_attention[..., 7:]).max()) == 0.0  # no mass on padding keys
    np.testing.assert_allclose(last_attention.sum(-1), 1.0, atol=1e-5)


def test_torch_free_bin_reader_equals_torch(tmp_path):
    model = _hf_model("bert")
    state = {k: v for k, v in model.state_dict().items()}
    state["half"] = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    state["bf16"] = torch.arange(6, dtype=torch.bfloat16).reshape(3, 2).t()  # non-contiguous
    state["ints"] = torch.arange(4)
    torch.save(state, tmp_path / "w.bin")
    ours = read_torch_bin(tmp_path / "w.bin")
    assert set(ours) == set(state)
    for key, tensor in state.items():
        expected = tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()
        np.testing.assert_array_equal(np.asarray(ours[key], expected.dtype), expected)


def test_wrong_shape_and_missing_key_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _save(_hf_model("bert"), tmp_path, "safetensors")
    weights = load_file(tmp_path / "model.safetensors")
    original = dict(weights)
    weights["bert.encoder.layer.1.intermediate.dense.weight"] = np.zeros((65, 32), np.float32)
    del weights["bert.encoder.layer.0.attention.self.key.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as err:
        load_mlm(tmp_path, load_tokenizer=False)
    message = str(err.value)
    assert "bert.encoder.layer.0.attention.self.key.bias" in message
    assert "bert.encoder.layer.1.intermediate.dense.weight" in message and "(65, 32)" in message
    assert "model.safetensors" in message

    original["bert.encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(original, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="unexpected keys.*extra.weight"):
        load_mlm(tmp_path, load_tokenizer=False)
    assert load_mlm(tmp_path, load_tokenizer=False, strict=False).config.num_layers == 2


def test_config_that_does_not_fit_is_refused(tmp_path):
    _save(_hf_model("distilbert"), tmp_path, "safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="distilbert.transformer.layer.2"):
        load_mlm(tmp_path, load_tokenizer=False)


def test_save_mlm_round_trips_through_transformers(tmp_path):
    config = ModelConfig(family="roberta", vocab_size=60, hidden_size=32, num_layers=2,
                         num_heads=4, intermediate_size=64, max_position_embeddings=24,
                         type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5)
    params = init_params(config, jax.random.key(1))
    save_mlm(tmp_path, params, config)
    ids, mask = _padded_batch(1, 0, 2, vocab=60)
    ours = mlm_forward(params, ids, mask, config=config)["logits"]
    reference = transformers.AutoModelForMaskedLM.from_pretrained(str(tmp_path))
    real = mask.astype(bool)
    assert np.abs(np.asarray(ours)[real] - _torch_logits(reference, ids, mask)[real]).max() < 1e-4
    reloaded = load_mlm(tmp_path, load_tokenizer=False)
    assert reloaded.config == config
    jax.tree.map(np.testing.assert_array_equal, reloaded.params, params)


def test_bfloat16_loading_is_close_to_float32(tmp_path):
    _save(_hf_model("bert"), tmp_path, "safetensors")
    full = load_mlm(tmp_path, load_tokenizer=False)
    half = load_mlm(tmp_path, load_tokenizer=False, dtype=jnp.bfloat16)
    assert jax.tree.leaves(half.params)[0].dtype == jnp.bfloat16
    ids, mask = _padded_batch(0, 2, 3)
    a, b = full.forward(ids, mask)["logits"], half.forward(ids, mask)["logits"]
    assert b.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) < 0.1 * float(jnp.abs(a).max())


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'no-such-org/no-such-model'"):
        load_mlm("no-such-org/no-such-model")


def test_a_model_that_is_neither_a_directory_nor_a_hub_id_is_a_missing_file(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    for model, named in [(tmp_path / "nowhere", tmp_path / "nowhere"),  # a path, not there
                         (tmp_path / "weights.bin", tmp_path / "weights.bin"),  # a file
                         ("runs/x/model", "runs/x/model"),  # no hub id has two slashes
                         (tmp_path / "empty", f"{tmp_path / 'empty'} has no config.json")]:
        with pytest.raises(MissingFileError, match=re.escape(str(named))):
            load_mlm(model, load_tokenizer=False)


def test_an_unsupported_model_type_names_it_and_the_supported_ones(tmp_path):
    _save(_hf_model("bert"), tmp_path, "safetensors")
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "t5"}))
    with pytest.raises(UsageError, match="model_type 't5' is not supported") as err:
        load_mlm(tmp_path, load_tokenizer=False)
    assert str(tmp_path / "config.json") in str(err.value)
    for model_type in ("bert", "roberta", "distilbert", "modernbert", "gpt2", "llama", "qwen2",
                       "qwen3"):
        assert model_type in str(err.value).split("lamp-jax reads ")[1].split(", ")


def test_no_model_family_imports_another():
    """A family is its folder and one registry entry: nothing in lamp_jax/models/<family>/
    imports another family's folder (what they share is in layers.py and checkpoint_keys.py)."""
    models_dir = Path(__file__).resolve().parents[1] / "lamp_jax" / "models"
    families = {f.name for f in models_dir.iterdir() if (f / "modeling.py").exists()}
    assert families == set(FAMILIES)
    for family in families:
        package = ["lamp_jax", "models", family]
        for source in (models_dir / family).glob("*.py"):
            for node in ast.walk(ast.parse(source.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name.split(".") for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = package[:len(package) - node.level + 1] if node.level else []
                    module = base + (node.module.split(".") if node.module else [])
                    names = [module + [alias.name] for alias in node.names]
                else:
                    continue
                imported = {name[2] for name in names if name[:2] == ["lamp_jax", "models"]
                            and len(name) > 2}
                assert not (imported & families) - {family}, f"{source} imports {imported}"


def test_a_matrix_name_means_one_path_in_every_family(monkeypatch):
    """Saved masks and config.mask.matrices name matrices without their family: a family whose
    matrix of a known name sits elsewhere is refused."""
    from lamp_jax.models import registry

    assert matrix_paths()["ffn_in"] == ("ffn_in", "kernel")
    clash = dataclasses.replace(FAMILIES["modernbert"], name="clash",
                                matrices={"ffn_in": ("mlp", "wi", "kernel")})
    monkeypatch.setitem(registry.FAMILIES, "clash", clash)
    with pytest.raises(ValueError, match="'ffn_in' is ffn_in/kernel in one family and "
                                         "mlp/wi/kernel in clash"):
        matrix_paths()
