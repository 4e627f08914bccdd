"""The model families lamp-jax runs, and the functions that pick one.

Each family is a folder ``lamp_jax/models/<family>/`` with ``modeling.py`` (its config class,
Flax model, forward, ``encode_prefix``, ``init_params`` and maskable ``MATRICES``),
``params.py`` (its checkpoint key table) and ``initialization.py`` (``init_like_transformers``:
random params drawn as transformers initialises that architecture), and one :class:`Family`
entry in :data:`FAMILIES`. No family imports another; what they share is in
``lamp_jax.models.layers``, ``rope``, ``initializers`` and ``checkpoint_keys``. A family is
picked by its config's class (a model already built) or by ``config.json``'s ``model_type`` (a
checkpoint being loaded).

The masked families (BERT, RoBERTa, DistilBERT; ModernBERT) give, at each position, the
logits of the token that belongs there; the causal ones (GPT-2; the Llama architecture: Llama,
Qwen2, Qwen3), marked :attr:`Family.causal`, give at position ``t`` the logits of the token
after ``t``, attending only to positions ``<= t``. Every family's forward takes the same
arguments::

    forward(params, input_ids, attention_mask, *, config, token_type_ids=None,
            output_positions=None, output_hidden_states=False, output_attentions=False,
            dtype=jnp.float32, hidden=None, start_layer=0) -> {"logits": ..., ...}

and its ``encode_prefix(params, input_ids, attention_mask, *, config, stop_layer,
token_type_ids=None, dtype=jnp.float32)`` gives the hidden state ``forward(hidden=...,
start_layer=stop_layer)`` resumes from. See ``lamp_jax.models.bert.modeling.mlm_forward`` for
what each argument means. Padding is on the right; positions run ``0..L-1`` in every row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lamp_jax.errors import UsageError
from lamp_jax.models.bert import initialization as bert_initialization
from lamp_jax.models.bert import modeling as bert_modeling
from lamp_jax.models.bert import params as bert_params
from lamp_jax.models.checkpoint_keys import KeyTable
from lamp_jax.models.gpt2 import initialization as gpt2_initialization
from lamp_jax.models.gpt2 import modeling as gpt2_modeling
from lamp_jax.models.gpt2 import params as gpt2_params
from lamp_jax.models.llama import initialization as llama_initialization
from lamp_jax.models.llama import modeling as llama_modeling
from lamp_jax.models.llama import params as llama_params
from lamp_jax.models.modernbert import initialization as modernbert_initialization
from lamp_jax.models.modernbert import modeling as modernbert_modeling
from lamp_jax.models.modernbert import params as modernbert_params


@dataclasses.dataclass(frozen=True)
class Family:
    """What lamp-jax needs of a model family."""

    name: str
    model_types: tuple[str, ...]  # the config.json ``model_type`` values it reads
    config_class: type  # has from_hf_dict / to_hf_dict, num_layers, hidden_size, vocab_size
    # A causal LM (logits at t predict token t + 1, attention to positions <= t; it reads an
    # answer after a prefix, lamp_jax.data.answers) or a masked one (it reads masks).
    causal: bool
    forward: Callable[..., dict[str, Any]]
    encode_prefix: Callable[..., jax.Array]
    init_params: Callable[..., Any]  # (config, rng, seq_len) -> Flax-default random params
    # (config, rng) -> random params drawn as transformers initialises the architecture.
    random_params: Callable[[Any, jax.Array], Any]
    key_table: Callable[[Any], KeyTable]
    # Maskable matrices: short name -> path inside a layer's params, in the order a mask spec
    # lists them by default.
    matrices: Mapping[str, tuple[str, ...]]
    tokenizer_classes: Mapping[str, str]  # model_type -> AutoTokenizer's default class
    # The FFN's widest activation is two intermediate widths (a gated MLP's input and gate:
    # ModernBERT's GeGLU, Llama's SwiGLU): what a step's memory estimate counts.
    gated_ffn: bool

    @property
    def default_matrices(self) -> tuple[str, ...]:
        return tuple(self.matrices)


FAMILIES: dict[str, Family] = {
    "bert": Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "distilbert"),
        config_class=bert_modeling.BertConfig,
        causal=False,
        forward=bert_modeling.mlm_forward,
        encode_prefix=bert_modeling.encode_prefix,
        init_params=bert_modeling.init_params,
        random_params=bert_initialization.init_like_transformers,
        key_table=bert_params.key_table,
        matrices=bert_modeling.MATRICES,
        tokenizer_classes=bert_params.TOKENIZER_CLASSES,
        gated_ffn=False,
    ),
    "modernbert": Family(
        name="modernbert",
        model_types=("modernbert",),
        config_class=modernbert_modeling.ModernBertConfig,
        causal=False,
        forward=modernbert_modeling.mlm_forward,
        encode_prefix=modernbert_modeling.encode_prefix,
        init_params=modernbert_modeling.init_params,
        random_params=modernbert_initialization.init_like_transformers,
        key_table=modernbert_params.key_table,
        matrices=modernbert_modeling.MATRICES,
        tokenizer_classes=modernbert_params.TOKENIZER_CLASSES,
        gated_ffn=True,
    ),
    "gpt2": Family(
        name="gpt2",
        model_types=("gpt2",),
        config_class=gpt2_modeling.GPT2Config,
        causal=True,
        forward=gpt2_modeling.lm_forward,
        encode_prefix=gpt2_modeling.encode_prefix,
        init_params=gpt2_modeling.init_params,
        random_params=gpt2_initialization.init_like_transformers,
        key_table=gpt2_params.key_table,
        matrices=gpt2_modeling.MATRICES,
        tokenizer_classes=gpt2_params.TOKENIZER_CLASSES,
        gated_ffn=False,
    ),
    "llama": Family(
        name="llama",
        model_types=llama_modeling.VARIANTS,
        config_class=llama_modeling.LlamaConfig,
        causal=True,
        forward=llama_modeling.lm_forward,
        encode_prefix=llama_modeling.encode_prefix,
        init_params=llama_modeling.init_params,
        random_params=llama_initialization.init_like_transformers,
        key_table=llama_params.key_table,
        matrices=llama_modeling.MATRICES,
        tokenizer_classes=llama_params.TOKENIZER_CLASSES,
        gated_ffn=True,
    ),
}


def family_of(config: Any) -> Family:
    """The family whose config class ``config`` is."""
    for family in FAMILIES.values():
        if isinstance(config, family.config_class):
            return family
    raise TypeError(f"{type(config).__name__} is no model family's config; the families: "
                    f"{', '.join(f.config_class.__name__ for f in FAMILIES.values())}")


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES.values() for t in family.model_types)


def config_from_hf_dict(hf: Mapping[str, Any], source: str = "config.json") -> Any:
    """Our config for a ``config.json`` dict, by its ``model_type`` (``bert`` when it has none,
    as the first BERT checkpoints). UsageError naming ``source`` for a type no family reads."""
    model_type = hf.get("model_type", "bert")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family.config_class.from_hf_dict(dict(hf))
    raise UsageError(f"{source}: model_type {model_type!r} is not supported; lamp-jax reads "
                     f"{', '.join(supported_model_types())}")


def matrix_paths() -> dict[str, tuple[str, ...]]:
    """Every family's maskable matrices, short name -> path inside a layer. A name means the
    same path in every family that has it (what a saved mask's names rely on)."""
    paths: dict[str, tuple[str, ...]] = {}
    for family in FAMILIES.values():
        for name, path in family.matrices.items():
            if paths.setdefault(name, path) != path:
                raise ValueError(f"matrix {name!r} is {'/'.join(paths[name])} in one family and "
                                 f"{'/'.join(path)} in {family.name}")
    return paths


def tokenizer_classes() -> dict[str, str]:
    """``model_type`` -> the tokenizer class AutoTokenizer gives a checkpoint naming none."""
    return {t: c for family in FAMILIES.values() for t, c in family.tokenizer_classes.items()}


def mlm_forward(
    params: Any,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    *,
    config: Any,
    token_type_ids: jax.Array | None = None,
    output_positions: jax.Array | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    dtype: Any = jnp.float32,
    hidden: jax.Array | None = None,
    start_layer: int = 0,
) -> dict[str, Any]:
    """The pure forward pass of ``config``'s family: params pytree + token ids -> its outputs,
    a masked family's MLM logits or a causal family's next-token logits
    (``lamp_jax.models.bert.modeling.mlm_forward`` documents the arguments)."""
    return family_of(config).forward(
        params, input_ids, attention_mask, config=config, token_type_ids=token_type_ids,
        output_positions=output_positions, output_hidden_states=output_hidden_states,
        output_attentions=output_attentions, dtype=dtype, hidden=hidden,
        start_layer=start_layer)


def encode_prefix(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: Any,
    stop_layer: int,
    token_type_ids: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The output of layer ``stop_layer - 1`` (the embeddings for 0): ``[B, L, H]``.

    Layers below the lowest pruned one never change during LAMP training, so their output can
    be computed once per prompt and fed to :func:`mlm_forward` (``hidden=``, ``start_layer=``)
    for every step, every subnetwork and the full model.
    """
    return family_of(config).encode_prefix(
        params, input_ids, attention_mask, config=config, stop_layer=stop_layer,
        token_type_ids=token_type_ids, dtype=dtype)


def init_params(config: Any, rng: jax.Array, seq_len: int = 8) -> Any:
    """Randomly initialised params (Flax default initialisers) for ``config``."""
    return family_of(config).init_params(config, rng, seq_len)


def init_like_transformers(config: Any, rng: jax.Array) -> Any:
    """Random params for ``config`` drawn as transformers initialises a fresh model of that
    architecture (each family's ``initialization.py`` says which of its rules it follows):
    the weights of a random-weight control."""
    return family_of(config).random_params(config, rng)
