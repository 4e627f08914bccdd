"""Hugging Face checkpoints <-> our parameter pytree, for every family.

Reading is torch-free for both ``model.safetensors`` and the legacy zip ``pytorch_model.bin``
(a small restricted unpickler, :func:`read_torch_bin`), so torch is never a runtime dependency.
A checkpoint's ``config.json`` picks the family (``lamp_jax.models.registry``), whose key table
(its ``params.py``) says which tensor each of our params comes from; :func:`convert_state_dict`
collects every mismatch before it raises.

    from lamp_jax.models import load_mlm
    mlm = load_mlm("bert-base-uncased")            # hub id or local directory
    out = mlm.forward(ids, attention_mask)         # == mlm_forward(mlm.params, ..., config=...)
"""

from __future__ import annotations

import dataclasses
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

from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.models.checkpoint_keys import LINEAR, flatten_params, unflatten_params
from lamp_jax.models.registry import config_from_hf_dict, family_of, mlm_forward, tokenizer_classes


class CheckpointMismatchError(UsageError):
    """A checkpoint does not fit the model its config describes."""


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: Any,
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> dict[str, Any]:
    """Maps a Hugging Face MLM state dict (numpy arrays) to our params pytree (numpy arrays),
    through the key table of ``config``'s family.

    Raises CheckpointMismatchError naming every missing key, unexpected key (when ``strict``)
    and shape mismatch at once, so a wrong checkpoint is diagnosed in one go.
    """
    table = family_of(config).key_table(config)
    sd = {}
    for key, value in state_dict.items():
        for pattern, replacement in table.renames:
            key = re.sub(pattern, replacement, key)
        # A bare encoder checkpoint (BertModel) has no prefix; the table always uses one.
        if not key.startswith(table.prefix + ".") and key.split(".")[0] not in table.head_prefixes:
            key = f"{table.prefix}.{key}"
        sd[key] = value
    if table.decoder_bias is not None and table.decoder_bias in sd:
        sd[table.head_bias] = sd.pop(table.decoder_bias)
    flat, missing, mismatched = {}, [], []
    for ours, theirs, kind in table.rows:
        if theirs not in sd:
            missing.append(theirs)
            continue
        value = np.asarray(sd[theirs])
        if kind == LINEAR:
            value = value.T
        expected = table.shapes[ours]
        if value.shape != expected:
            mismatched.append(f"{theirs}: checkpoint {tuple(sd[theirs].shape)}, model expects "
                              f"{expected[::-1] if kind == LINEAR else expected}")
            continue
        flat[ours] = value
    used = {theirs for _, theirs, _ in table.rows}
    if config.tie_word_embeddings:
        used.add(table.decoder_weight)  # the tied copy of the word embeddings
    ignorable = [re.compile(p) for p in table.ignorable]
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
    return unflatten_params(flat)


def to_state_dict(params: Mapping[str, Any], config: Any) -> dict[str, np.ndarray]:
    """The inverse of :func:`convert_state_dict`: our params -> Hugging Face names and layouts."""
    flat = flatten_params(params)
    out = {}
    for ours, theirs, kind in family_of(config).key_table(config).rows:
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
        raise UsageError(
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
    raise MissingFileError(
        f"no weights in {directory}: expected model.safetensors or pytorch_model.bin"
    )


# --- the user-facing entry points -----------------------------------------------------------

_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "*.txt", "*.json",
              "*.model", "merges.txt"]


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_model_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hugging Face hub id, downloaded (weights + tokenizer).

    ``pytorch_model.bin`` is fetched only when the repository has no safetensors weights.
    MissingFileError, naming ``name_or_path``, for what is neither an existing directory nor a
    hub id, and for a hub id that cannot be fetched.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    looks_like_a_path = path.exists() or str(name_or_path).startswith((".", "/", "~"))
    if looks_like_a_path or not _is_hub_id(str(name_or_path)):
        raise MissingFileError(
            f"{name_or_path} is not a model directory: expected a directory with config.json "
            "and model.safetensors or pytorch_model.bin (as save_pretrained writes), or a "
            "Hugging Face hub id ('name' or 'owner/name')"
        )
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(str(name_or_path), revision=revision,
                                       allow_patterns=_HUB_FILES))
        if not any(local.glob("*.safetensors")):
            local = Path(snapshot_download(str(name_or_path), revision=revision,
                                           allow_patterns=_HUB_FILES + ["pytorch_model*.bin"]))
    except Exception as err:  # the hub raises many types; the user needs one clear message
        raise MissingFileError(
            f"no directory {name_or_path} here, and could not fetch {name_or_path!r} from the "
            f"Hugging Face hub ({type(err).__name__}: {err}). Pass a local directory (saved "
            "with save_pretrained), or check the id and your network / HF_HUB_OFFLINE setting."
        ) from err
    return local


@dataclasses.dataclass(frozen=True)
class LoadedMLM:
    """A loaded model (masked or causal LM): params pytree, architecture, tokenizer and where
    it came from."""

    params: Any
    config: Any  # the family's config class
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
    """Loads a model of any family from the hub or a local directory: a BERT / RoBERTa /
    DistilBERT / ModernBERT masked LM, or a GPT-2 / Llama / Qwen2 / Qwen3 causal LM
    (``FAMILIES[family_of(mlm.config).name].causal`` says which kind it is).

    Args:
      name_or_path: hub id (``"bert-base-uncased"``, ``"answerdotai/ModernBERT-base"``,
        ``"distilgpt2"``, ``"Qwen/Qwen2.5-0.5B"``) or a directory with ``config.json`` and
        ``model.safetensors``, ``pytorch_model.bin`` or their sharded form with an
        ``*.index.json`` (torch is not needed for any).
      dtype: dtype of params and compute (``jnp.bfloat16`` halves memory; logits stay float32).
      strict: refuse checkpoints carrying tensors the model does not use (known extras such
        as BERT's pooler and next-sentence head are always accepted).
      load_tokenizer: also load the tokenizer ``transformers.AutoTokenizer`` would load
        from the same place (:func:`load_tokenizer_of`).
    """
    directory = resolve_model_dir(name_or_path, revision)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise MissingFileError(f"{directory} has no config.json: not a Hugging Face model "
                               "directory (save_pretrained writes one)")
    hf_config = json.loads(config_path.read_text())
    config = config_from_hf_dict(hf_config, source=str(config_path))
    state_dict, source = read_state_dict(directory)
    params = convert_state_dict(state_dict, config, strict=strict, source=source)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    tokenizer = load_tokenizer_of(directory, hf_config) if load_tokenizer else None
    return LoadedMLM(params, config, tokenizer, str(name_or_path), dtype)


# The tokenizer class transformers' AutoTokenizer gives each model type's checkpoint when
# neither tokenizer_config.json nor config.json names one (its TOKENIZER_MAPPING_NAMES; a test
# holds the two equal), from every family's params.py. A model type it has none for gets
# TokenizersBackend.
TOKENIZER_CLASSES = tokenizer_classes()
# The model types lamp-jax reads whose hub checkpoints AutoTokenizer knows to name a wrong class
# (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS; a test holds the two equal): they get
# TOKENIZER_CLASSES' class whatever they name.
HUB_CLASS_IGNORED = frozenset({"modernbert", "qwen2"})
# Classes that stand for transformers' generic tokenizer over a tokenizer.json.
_GENERIC = ("TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast")


def tokenizer_class_name(directory: str | Path, hf_config: dict[str, Any]) -> str:
    """The name of the tokenizer class ``AutoTokenizer`` (transformers 5) picks for a checkpoint
    directory, by its rules for the model types lamp-jax reads:

    1. a ``LlamaTokenizer(Fast)`` named over a byte-level ``tokenizer.json`` (Llama 3 style)
       is ``TokenizersBackend`` (``LlamaTokenizer`` would pre-tokenise as SentencePiece);
    2. a class named that differs from the model type's own one (:data:`TOKENIZER_CLASSES`):
       the model type's when :data:`HUB_CLASS_IGNORED` lists it, else the one named, and
       ``TokenizersBackend`` where that is generic;
    3. else the class ``tokenizer_config.json`` names, else ``config.json``'s, else the model
       type's own, else ``TokenizersBackend``.
    """
    directory = Path(directory)
    tokenizer_config = directory / "tokenizer_config.json"
    named_in_tokenizer = (json.loads(tokenizer_config.read_text()).get("tokenizer_class")
                          if tokenizer_config.exists() else None)
    named = named_in_tokenizer or hf_config.get("tokenizer_class")
    model_type = hf_config.get("model_type")
    registered = TOKENIZER_CLASSES.get(model_type)
    if named and named.removesuffix("Fast") == "LlamaTokenizer" and (
            model_type not in HUB_CLASS_IGNORED and _byte_level(directory / "tokenizer.json")):
        return "TokenizersBackend"
    if named and registered and named.removesuffix("Fast") != registered.removesuffix("Fast"):
        if registered in _GENERIC:
            return "TokenizersBackend"
        chosen = registered if model_type in HUB_CLASS_IGNORED else named
        return "TokenizersBackend" if chosen in _GENERIC else chosen
    return named or registered or "TokenizersBackend"


def _byte_level(tokenizer_json: Path) -> bool:
    """Whether a ``tokenizer.json`` declares a ByteLevel pre-tokeniser or decoder, asked as
    transformers' ``TokenizersBackend._tokenizer_json_has_byte_level`` asks it."""
    return tokenizer_json.exists() and '"ByteLevel"' in tokenizer_json.read_text(
        encoding="utf-8")


def load_tokenizer_of(directory: str | Path, hf_config: dict[str, Any] | None = None) -> Any:
    """The transformers tokenizer of a checkpoint directory, the one ``AutoTokenizer`` picks
    (:func:`tokenizer_class_name`), imported alone. ``AutoTokenizer`` itself imports
    transformers' model code and, where torch is installed, torch: 1.6 s and 190 MB more in
    every process (measured on the embedded model), for a tokenizer that needs neither.
    ``hf_config``: the directory's ``config.json``, when the caller has read it already."""
    import transformers

    directory = Path(directory)
    if hf_config is None:
        hf_config = json.loads((directory / "config.json").read_text())
    name = tokenizer_class_name(directory, hf_config)
    cls = getattr(transformers, name, None)
    if cls is None:  # a class this transformers does not export by name: let it resolve
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(str(directory))


def save_mlm(
    directory: str | Path, params: Any, config: Any, tokenizer: Any = None
) -> Path:
    """Saves our params as a Hugging Face checkpoint (config.json + model.safetensors).

    The result loads with :func:`load_mlm` and with transformers: a masked family's with
    ``AutoModelForMaskedLM``, a causal family's (``FAMILIES[...].causal``) with
    ``AutoModelForCausalLM``.
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

