"""Hugging Face checkpoints <-> our parameter pytree.

One table per family (``KEY_TABLES``: BERT, RoBERTa, DistilBERT, ModernBERT) says, for every
parameter of ours, which tensor of the Hugging Face ``*ForMaskedLM`` state dict it comes from
and how it is laid out. Reading is torch-free for both ``model.safetensors`` and the legacy zip
``pytorch_model.bin`` (a small restricted unpickler, ``read_torch_bin``), so torch is never a
runtime dependency.

    from lamp_jax.models.params import load_mlm
    mlm = load_mlm("bert-base-uncased")            # hub id or local directory
    out = mlm.forward(ids, attention_mask)         # == mlm_forward(mlm.params, ..., config=...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from lamp_jax.models.bert import ModelConfig, init_params, mlm_forward
from lamp_jax.models.modernbert import ModernBertConfig

AnyConfig = ModelConfig | ModernBertConfig

# Layout of a tensor: "linear" weights are stored [out, in] by PyTorch and [in, out] by Flax.
LINEAR, COPY = "linear", "copy"

# (our path, Hugging Face name without the model prefix, layout). ``{i}`` is the layer index.
_BERT_LIKE_TABLE = (
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", COPY),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", COPY),
    ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight", COPY),
    ("embeddings/layer_norm/scale", "embeddings.LayerNorm.weight", COPY),
    ("embeddings/layer_norm/bias", "embeddings.LayerNorm.bias", COPY),
    ("layer_{i}/attention/query/kernel", "encoder.layer.{i}.attention.self.query.weight", LINEAR),
    ("layer_{i}/attention/query/bias", "encoder.layer.{i}.attention.self.query.bias", COPY),
    ("layer_{i}/attention/key/kernel", "encoder.layer.{i}.attention.self.key.weight", LINEAR),
    ("layer_{i}/attention/key/bias", "encoder.layer.{i}.attention.self.key.bias", COPY),
    ("layer_{i}/attention/value/kernel", "encoder.layer.{i}.attention.self.value.weight", LINEAR),
    ("layer_{i}/attention/value/bias", "encoder.layer.{i}.attention.self.value.bias", COPY),
    ("layer_{i}/attention/output/kernel", "encoder.layer.{i}.attention.output.dense.weight", LINEAR),  # noqa: E501
    ("layer_{i}/attention/output/bias", "encoder.layer.{i}.attention.output.dense.bias", COPY),
    ("layer_{i}/attention_norm/scale", "encoder.layer.{i}.attention.output.LayerNorm.weight", COPY),
    ("layer_{i}/attention_norm/bias", "encoder.layer.{i}.attention.output.LayerNorm.bias", COPY),
    ("layer_{i}/ffn_in/kernel", "encoder.layer.{i}.intermediate.dense.weight", LINEAR),
    ("layer_{i}/ffn_in/bias", "encoder.layer.{i}.intermediate.dense.bias", COPY),
    ("layer_{i}/ffn_out/kernel", "encoder.layer.{i}.output.dense.weight", LINEAR),
    ("layer_{i}/ffn_out/bias", "encoder.layer.{i}.output.dense.bias", COPY),
    ("layer_{i}/ffn_norm/scale", "encoder.layer.{i}.output.LayerNorm.weight", COPY),
    ("layer_{i}/ffn_norm/bias", "encoder.layer.{i}.output.LayerNorm.bias", COPY),
)

_DISTILBERT_TABLE = (
    ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", COPY),
    ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", COPY),
    ("embeddings/layer_norm/scale", "embeddings.LayerNorm.weight", COPY),
    ("embeddings/layer_norm/bias", "embeddings.LayerNorm.bias", COPY),
    ("layer_{i}/attention/query/kernel", "transformer.layer.{i}.attention.q_lin.weight", LINEAR),
    ("layer_{i}/attention/query/bias", "transformer.layer.{i}.attention.q_lin.bias", COPY),
    ("layer_{i}/attention/key/kernel", "transformer.layer.{i}.attention.k_lin.weight", LINEAR),
    ("layer_{i}/attention/key/bias", "transformer.layer.{i}.attention.k_lin.bias", COPY),
    ("layer_{i}/attention/value/kernel", "transformer.layer.{i}.attention.v_lin.weight", LINEAR),
    ("layer_{i}/attention/value/bias", "transformer.layer.{i}.attention.v_lin.bias", COPY),
    ("layer_{i}/attention/output/kernel", "transformer.layer.{i}.attention.out_lin.weight", LINEAR),
    ("layer_{i}/attention/output/bias", "transformer.layer.{i}.attention.out_lin.bias", COPY),
    ("layer_{i}/attention_norm/scale", "transformer.layer.{i}.sa_layer_norm.weight", COPY),
    ("layer_{i}/attention_norm/bias", "transformer.layer.{i}.sa_layer_norm.bias", COPY),
    ("layer_{i}/ffn_in/kernel", "transformer.layer.{i}.ffn.lin1.weight", LINEAR),
    ("layer_{i}/ffn_in/bias", "transformer.layer.{i}.ffn.lin1.bias", COPY),
    ("layer_{i}/ffn_out/kernel", "transformer.layer.{i}.ffn.lin2.weight", LINEAR),
    ("layer_{i}/ffn_out/bias", "transformer.layer.{i}.ffn.lin2.bias", COPY),
    ("layer_{i}/ffn_norm/scale", "transformer.layer.{i}.output_layer_norm.weight", COPY),
    ("layer_{i}/ffn_norm/bias", "transformer.layer.{i}.output_layer_norm.bias", COPY),
)

# ModernBERT (``ModernBertForMaskedLM``). A row applies only where the model has that parameter:
# the biases follow norm_bias / attention_bias / mlp_bias / classifier_bias / decoder_bias and
# layer 0 has no attn_norm, all of which the Flax model decides (see ``key_table``).
_MODERNBERT_TABLE = (
    ("embeddings/tok_embeddings/embedding", "embeddings.tok_embeddings.weight", COPY),
    ("embeddings/norm/scale", "embeddings.norm.weight", COPY),
    ("embeddings/norm/bias", "embeddings.norm.bias", COPY),
    ("layer_{i}/attn_norm/scale", "layers.{i}.attn_norm.weight", COPY),
    ("layer_{i}/attn_norm/bias", "layers.{i}.attn_norm.bias", COPY),
    ("layer_{i}/attention/qkv/kernel", "layers.{i}.attn.Wqkv.weight", LINEAR),
    ("layer_{i}/attention/qkv/bias", "layers.{i}.attn.Wqkv.bias", COPY),
    ("layer_{i}/attention/output/kernel", "layers.{i}.attn.Wo.weight", LINEAR),
    ("layer_{i}/attention/output/bias", "layers.{i}.attn.Wo.bias", COPY),
    ("layer_{i}/mlp_norm/scale", "layers.{i}.mlp_norm.weight", COPY),
    ("layer_{i}/mlp_norm/bias", "layers.{i}.mlp_norm.bias", COPY),
    ("layer_{i}/ffn_in/kernel", "layers.{i}.mlp.Wi.weight", LINEAR),
    ("layer_{i}/ffn_in/bias", "layers.{i}.mlp.Wi.bias", COPY),
    ("layer_{i}/ffn_out/kernel", "layers.{i}.mlp.Wo.weight", LINEAR),
    ("layer_{i}/ffn_out/bias", "layers.{i}.mlp.Wo.bias", COPY),
    ("final_norm/scale", "final_norm.weight", COPY),
    ("final_norm/bias", "final_norm.bias", COPY),
)


@dataclasses.dataclass(frozen=True)
class FamilyLayout:
    """Where a family keeps its encoder (``prefix``) and MLM head, and what it may carry extra."""

    prefix: str
    encoder_table: tuple[tuple[str, str, str], ...]
    head_table: tuple[tuple[str, str, str], ...]
    decoder_weight: str  # tied to the word embeddings unless the config unties it
    # The vocabulary projection's own bias. transformers ties it to the head bias, but with
    # untied embeddings (v5) only this one is used by the forward, so it wins when present.
    decoder_bias: str | None
    ignorable: tuple[str, ...]  # regexes of tensors we knowingly do not use


KEY_TABLES: dict[str, FamilyLayout] = {
    "bert": FamilyLayout(
        prefix="bert",
        encoder_table=_BERT_LIKE_TABLE,
        head_table=(
            ("mlm_head/transform/kernel", "cls.predictions.transform.dense.weight", LINEAR),
            ("mlm_head/transform/bias", "cls.predictions.transform.dense.bias", COPY),
            ("mlm_head/layer_norm/scale", "cls.predictions.transform.LayerNorm.weight", COPY),
            ("mlm_head/layer_norm/bias", "cls.predictions.transform.LayerNorm.bias", COPY),
            ("mlm_head/bias", "cls.predictions.bias", COPY),
        ),
        decoder_weight="cls.predictions.decoder.weight",
        decoder_bias="cls.predictions.decoder.bias",
        # Pre-training checkpoints (bert-base-uncased) also carry the pooler and the NSP head.
        ignorable=(r".*position_ids$", r"^bert\.pooler\.", r"^cls\.seq_relationship\."),
    ),
    "roberta": FamilyLayout(
        prefix="roberta",
        encoder_table=_BERT_LIKE_TABLE,
        head_table=(
            ("mlm_head/transform/kernel", "lm_head.dense.weight", LINEAR),
            ("mlm_head/transform/bias", "lm_head.dense.bias", COPY),
            ("mlm_head/layer_norm/scale", "lm_head.layer_norm.weight", COPY),
            ("mlm_head/layer_norm/bias", "lm_head.layer_norm.bias", COPY),
            ("mlm_head/bias", "lm_head.bias", COPY),
        ),
        decoder_weight="lm_head.decoder.weight",
        decoder_bias="lm_head.decoder.bias",
        ignorable=(r".*position_ids$", r"^roberta\.pooler\."),
    ),
    "distilbert": FamilyLayout(
        prefix="distilbert",
        encoder_table=_DISTILBERT_TABLE,
        head_table=(
            ("mlm_head/transform/kernel", "vocab_transform.weight", LINEAR),
            ("mlm_head/transform/bias", "vocab_transform.bias", COPY),
            ("mlm_head/layer_norm/scale", "vocab_layer_norm.weight", COPY),
            ("mlm_head/layer_norm/bias", "vocab_layer_norm.bias", COPY),
            ("mlm_head/bias", "vocab_projector.bias", COPY),
        ),
        decoder_weight="vocab_projector.weight",
        decoder_bias=None,
        ignorable=(r".*position_ids$",),
    ),
    "modernbert": FamilyLayout(
        prefix="model",
        encoder_table=_MODERNBERT_TABLE,
        head_table=(
            ("mlm_head/transform/kernel", "head.dense.weight", LINEAR),
            ("mlm_head/transform/bias", "head.dense.bias", COPY),
            ("mlm_head/layer_norm/scale", "head.norm.weight", COPY),
            ("mlm_head/layer_norm/bias", "head.norm.bias", COPY),
            ("mlm_head/bias", "decoder.bias", COPY),  # the decoder's own bias is the head bias
        ),
        decoder_weight="decoder.weight",
        decoder_bias=None,
        ignorable=(),
    ),
}

# TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_RENAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
                   (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))


def key_table(config: AnyConfig) -> list[tuple[str, str, str]]:
    """The full (our path, Hugging Face key, layout) list for a concrete model config."""
    layout = KEY_TABLES[config.family]
    if config.family == "modernbert":
        # The Flax model is the one source of which optional tensors exist (biases, layer 0's
        # attn_norm); the table only names them.
        shapes = model_param_shapes(config)
        rows = [(ours.format(i=i), f"{layout.prefix}.{theirs.format(i=i)}", kind)
                for ours, theirs, kind in layout.encoder_table
                for i in (range(config.num_layers) if "{i}" in ours else [None])]
        rows += list(layout.head_table)
        if not config.tie_word_embeddings:
            rows.append(("mlm_head/decoder/kernel", layout.decoder_weight, LINEAR))
        return [row for row in rows if row[0] in shapes]
    rows = []
    for ours, theirs, kind in layout.encoder_table:
        if "token_type" in ours and not config.type_vocab_size:
            continue
        if "{i}" in ours:
            rows += [(ours.format(i=i), f"{layout.prefix}.{theirs.format(i=i)}", kind)
                     for i in range(config.num_layers)]
        else:
            rows.append((ours, f"{layout.prefix}.{theirs}", kind))
    rows += list(layout.head_table)
    if not config.tie_word_embeddings:
        rows.append(("mlm_head/decoder/kernel", layout.decoder_weight, LINEAR))
    return rows


@functools.lru_cache(maxsize=8)
def model_param_shapes(config: AnyConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter the Flax model for ``config`` has (traced with
    ``jax.eval_shape``: no weights are allocated)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(abstract).items()}


def expected_shapes(config: AnyConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ours, derived from the config alone (no initialisation)."""
    if config.family == "modernbert":
        return dict(model_param_shapes(config))
    c = config
    h, ff = c.hidden_size, c.intermediate_size
    shapes = {
        "embeddings/word_embeddings/embedding": (c.vocab_size, h),
        "embeddings/position_embeddings/embedding": (c.max_position_embeddings, h),
        "embeddings/token_type_embeddings/embedding": (c.type_vocab_size, h),
        "mlm_head/transform/kernel": (h, h),
        "mlm_head/bias": (c.vocab_size,),
        "mlm_head/decoder/kernel": (h, c.vocab_size),
    }
    for i in range(c.num_layers):
        for name in ("query", "key", "value", "output"):
            shapes[f"layer_{i}/attention/{name}/kernel"] = (h, h)
            shapes[f"layer_{i}/attention/{name}/bias"] = (h,)
        shapes[f"layer_{i}/ffn_in/kernel"] = (h, ff)
        shapes[f"layer_{i}/ffn_in/bias"] = (ff,)
        shapes[f"layer_{i}/ffn_out/kernel"] = (ff, h)
        shapes[f"layer_{i}/ffn_out/bias"] = (h,)
    norm_shape = (h,)
    return {ours: shapes.get(ours, norm_shape) for ours, _, _ in key_table(config)}


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model its config describes."""


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (the path convention of the key table and masks)."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, path + "/"))
        else:
            flat[path] = value
    return flat


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: AnyConfig,
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Maps a Hugging Face MLM state dict (numpy arrays) to our params pytree (numpy arrays).

    Raises CheckpointMismatchError naming every missing key, unexpected key (when ``strict``)
    and shape mismatch at once, so a wrong checkpoint is diagnosed in one go.
    """
    layout = KEY_TABLES[config.family]
    sd = {}
    for key, value in state_dict.items():
        for pattern, replacement in _LEGACY_RENAMES:
            key = pattern.sub(replacement, key)
        # A bare encoder checkpoint (BertModel) has no prefix; the table always uses one.
        if not key.startswith(layout.prefix + ".") and not _is_head_key(key, layout):
            key = f"{layout.prefix}.{key}"
        sd[key] = value
    head_bias = next(theirs for ours, theirs, _ in layout.head_table if ours == "mlm_head/bias")
    if layout.decoder_bias in sd:
        sd[head_bias] = sd.pop(layout.decoder_bias)
    rows = key_table(config)
    shapes = expected_shapes(config)
    flat, missing, mismatched = {}, [], []
    for ours, theirs, kind in rows:
        if theirs not in sd:
            missing.append(theirs)
            continue
        value = np.asarray(sd[theirs])
        if kind == LINEAR:
            value = value.T
        if value.shape != shapes[ours]:
            mismatched.append(f"{theirs}: checkpoint {tuple(sd[theirs].shape)}, model expects "
                              f"{shapes[ours][::-1] if kind == LINEAR else shapes[ours]}")
            continue
        flat[ours] = value
    used = {theirs for _, theirs, _ in rows}
    if config.tie_word_embeddings:
        used.add(layout.decoder_weight)  # the tied copy of the word embeddings
    ignorable = [re.compile(p) for p in layout.ignorable]
    unexpected = sorted(k for k in sd if k not in used and not any(p.match(k) for p in ignorable))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit a {config.family} model with {config.num_layers} layers, "
            f"hidden size {config.hidden_size}, vocab {config.vocab_size}:\n  "
            + "\n  ".join(problems)
        )
    return _unflatten(flat)


def _is_head_key(key: str, layout: FamilyLayout) -> bool:
    head_prefixes = {theirs.split(".")[0] for _, theirs, _ in layout.head_table}
    head_prefixes.add(layout.decoder_weight.split(".")[0])
    return key.split(".")[0] in head_prefixes


def to_state_dict(params: Mapping[str, Any], config: AnyConfig) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: our params -> Hugging Face names and layouts."""
    flat = flatten_params(params)
    out = {}
    for ours, theirs, kind in key_table(config):
        value = np.asarray(flat[ours], dtype=np.float32)
        out[theirs] = np.ascontiguousarray(value.T if kind == LINEAR else value)
    return out


# --- reading weight files -------------------------------------------------------------------

_TORCH_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage, offset, size, stride, *_args):
    array, dtype = storage
    itemsize = np.dtype(dtype).itemsize
    if not size:
        return array[offset].copy() if array.size else np.zeros((), dtype)
    return np.lib.stride_tricks.as_strided(
        array[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    ).copy()


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict into numpy arrays, allowing only the classes it needs."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str):
        super().__init__(file)
        self._archive, self._root = archive, root

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "torch" and name in _TORCH_DTYPES:
            return name
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: not part of a plain tensor state dict"
        )

    def persistent_load(self, pid):
        _, storage_type, key, _location, _numel = pid
        dtype = _TORCH_DTYPES[storage_type]
        raw = self._archive.read(f"{self._root}/data/{key}")
        return np.frombuffer(raw, dtype=dtype), dtype


def read_torch_bin(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a ``pytorch_model.bin`` (torch >= 1.6 zip format) without importing torch."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path} is not a zip-format torch checkpoint (saved before torch 1.6?); "
            "re-save it with a recent torch or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        root = pkl[: -len("/data.pkl")]
        with archive.open(pkl) as f:
            return dict(_TorchUnpickler(f, archive, root).load())


def read_state_dict(directory: str | Path) -> tuple[dict[str, np.ndarray], str]:
    """Reads the weights of a local Hugging Face model directory: safetensors first, then .bin.

    Sharded checkpoints (``*.index.json``) are read shard by shard. Returns the state dict and
    the file(s) it came from (for error messages).
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    for index_name, reader in (("model.safetensors.index.json", load_file),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = directory / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd = {}
            for shard in shards:
                sd.update(reader(directory / shard))
            return sd, str(index)
    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors"), str(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").exists():
        return read_torch_bin(directory / "pytorch_model.bin"), str(directory / "pytorch_model.bin")
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors or pytorch_model.bin"
    )


# --- the user-facing entry points -----------------------------------------------------------

_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "*.txt", "*.json",
              "*.model", "merges.txt"]


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (weights + tokenizer).

    ``pytorch_model.bin`` is fetched only when the repository has no safetensors weights.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_path} is not a model directory")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(name_or_path), revision=revision,
                                       allow_patterns=_HUB_FILES))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(str(name_or_path), revision=revision,
                                           allow_patterns=_HUB_FILES + ["pytorch_model*.bin"]))
    except Exception as err:  # the hub raises many types; the user needs one clear message
        raise OSError(
            f"could not fetch {name_or_path!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{err}). Pass a local directory (saved with save_pretrained), or check the id and "
            "your network / HF_HUB_OFFLINE setting."
        ) from err
    return local


def config_from_hf_dict(hf: dict[str, Any]) -> AnyConfig:
    """Our config for a ``config.json`` dict: ModernBERT's own class, else the BERT family's."""
    if hf.get("model_type") == "modernbert":
        return ModernBertConfig.from_hf_dict(hf)
    return ModelConfig.from_hf_dict(hf)


@dataclasses.dataclass(frozen=True)
class LoadedMLM:
    """A loaded masked LM: params pytree, architecture, tokenizer and where it came from."""

    params: Any
    config: AnyConfig
    tokenizer: Any
    source: str
    dtype: Any = jnp.float32

    def forward(self, input_ids, attention_mask, **kwargs) -> dict[str, Any]:
        """``mlm_forward`` with this model's params, config and compute dtype."""
        return mlm_forward(self.params, input_ids, attention_mask, config=self.config,
                           dtype=self.dtype, **kwargs)


def load_mlm(
    name_or_path: str | Path,
    *,
    dtype: Any = jnp.float32,
    revision: str | None = None,
    strict: bool = True,
    load_tokenizer: bool = True,
) -> LoadedMLM:
    """Loads a BERT / RoBERTa / DistilBERT / ModernBERT masked LM from the hub or a local
    directory.

    Args:
      name_or_path: hub id (``"bert-base-uncased"``, ``"answerdotai/ModernBERT-base"``) or a
        directory with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin`` (torch
        is not needed for either).
      dtype: dtype of params and compute (``jnp.bfloat16`` halves memory; logits stay float32).
      strict: refuse checkpoints carrying tensors the model does not use (known extras such
        as BERT's pooler and next-sentence head are always accepted).
      load_tokenizer: also load the tokenizer ``transformers.AutoTokenizer`` would load
        from the same place (:func:`load_tokenizer_of`).
    """
    directory = resolve_model_dir(name_or_path, revision)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    hf_config = json.loads(config_path.read_text())
    config = config_from_hf_dict(hf_config)
    state_dict, source = read_state_dict(directory)
    params = convert_state_dict(state_dict, config, strict=strict, source=source)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    tokenizer = load_tokenizer_of(directory, hf_config) if load_tokenizer else None
    return LoadedMLM(params, config, tokenizer, str(name_or_path), dtype)


# The tokenizer class transformers' AutoTokenizer gives each family's checkpoint when neither
# tokenizer_config.json nor config.json names one (its TOKENIZER_MAPPING_NAMES; a test holds
# the two equal).
TOKENIZER_CLASSES = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer",
                     "distilbert": "BertTokenizer", "modernbert": "TokenizersBackend"}


def load_tokenizer_of(directory: str | Path, hf_config: dict[str, Any] | None = None) -> Any:
    """The transformers tokenizer of a checkpoint directory, the one ``AutoTokenizer`` picks:
    the class its ``tokenizer_config.json`` names, else its ``config.json``, else the family's
    (:data:`TOKENIZER_CLASSES`), imported alone. ``AutoTokenizer`` itself imports transformers'
    model code and, where torch is installed, torch: 1.6 s and 190 MB more in every process
    (measured on the embedded model), for a tokenizer that needs neither. ``hf_config``: the
    directory's ``config.json``, when the caller has read it already."""
    import transformers

    directory = Path(directory)
    if hf_config is None:
        hf_config = json.loads((directory / "config.json").read_text())
    named = [hf_config.get("tokenizer_class"), TOKENIZER_CLASSES.get(hf_config.get("model_type"))]
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.exists():
        named.insert(0, json.loads(tokenizer_config.read_text()).get("tokenizer_class"))
    name = next((n for n in named if n), None)
    cls = getattr(transformers, name, None) if name else None
    if cls is None:  # a class this transformers does not export by name: let it resolve
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(directory))


def save_mlm(
    directory: str | Path, params: Any, config: AnyConfig, tokenizer: Any = None
) -> Path:
    """Saves our params as a Hugging Face checkpoint (config.json + model.safetensors).

    The result loads with :func:`load_mlm` and with transformers' ``AutoModelForMaskedLM``.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    save_file(to_state_dict(params, config), directory / "model.safetensors",
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory

