"""BERT-family masked language models (BERT, RoBERTa, DistilBERT) in Flax.

Why Flax Linen and not NNX: LAMP needs the forward pass as a *pure function of a
params pytree* so that a different (masked) copy of the params can be passed per
relation under ``jax.vmap``. ``nn.Module.apply({"params": p}, ...)`` is exactly
that, with no graph/state split-merge round trip, and its params are a plain
nested dict whose paths are the keys of the checkpoint table in ``params.py``
and of the mask pytree in ``lamp_jax.masks``.

The three variants share one post-LayerNorm encoder and differ only in:
position ids (RoBERTa offsets them past the padding index), whether token-type
embeddings exist (DistilBERT has none) and the LayerNorm epsilon; all of that is
read from :class:`BertConfig`.

Parameter tree (Linen names; kernels are stored ``[in, out]``)::

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding
    embeddings/layer_norm/{scale,bias}
    layer_<i>/attention/{query,key,value,output}/{kernel,bias}
    layer_<i>/attention_norm/{scale,bias}
    layer_<i>/ffn_in/{kernel,bias}     layer_<i>/ffn_out/{kernel,bias}
    layer_<i>/ffn_norm/{scale,bias}
    mlm_head/transform/{kernel,bias}   mlm_head/layer_norm/{scale,bias}
    mlm_head/bias                      mlm_head/decoder/kernel (only when untied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lamp_jax.models.layers import (
    DenseParams,
    activation,
    additive_bias,
    check_stop_layer,
    concat_dense,
    dense,
    first_hidden,
    mlm_outputs,
    output_rows,
    rows_at,
    run_layers,
    take_rows,
)

VARIANTS = ("bert", "roberta", "distilbert")

# The maskable matrices: short name -> path inside a layer's params, in the order a mask spec
# lists them by default (``lamp_jax.masks``).
MATRICES: dict[str, tuple[str, ...]] = {
    "query": ("attention", "query", "kernel"),
    "key": ("attention", "key", "kernel"),
    "value": ("attention", "value", "kernel"),
    "attn_out": ("attention", "output", "kernel"),
    "ffn_in": ("ffn_in", "kernel"),
    "ffn_out": ("ffn_out", "kernel"),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT-family MLM (hashable: it is a static jit argument).

    ``family`` is the variant: ``bert``, ``roberta`` or ``distilbert``.
    """

    family: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2  # 0 means no token-type embeddings (DistilBERT)
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    hidden_act: str = "gelu"
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # the std of transformers' random init

    def __post_init__(self) -> None:
        if self.family not in VARIANTS:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {VARIANTS}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> BertConfig:
        """Builds the config from a Hugging Face ``config.json`` dict."""
        model_type = hf.get("model_type", "bert")
        if model_type == "distilbert":
            return cls(
                family="distilbert",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["dim"],
                num_layers=hf["n_layers"],
                num_heads=hf["n_heads"],
                intermediate_size=hf["hidden_dim"],
                max_position_embeddings=hf["max_position_embeddings"],
                type_vocab_size=0,
                layer_norm_eps=1e-12,
                pad_token_id=hf.get("pad_token_id", 0),
                hidden_act=hf.get("activation", "gelu"),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
                initializer_range=hf.get("initializer_range", 0.02),
            )
        if model_type in ("roberta", "xlm-roberta", "camembert"):
            family = "roberta"
        elif model_type == "bert":
            family = "bert"
        else:
            raise ValueError(
                f"model_type {model_type!r} is not supported; lamp-jax supports BERT, RoBERTa "
                "(incl. distilroberta) and DistilBERT checkpoints"
            )
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 0) if hf.get("pad_token_id") is not None else 0,
            hidden_act=hf.get("hidden_act", "gelu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of :meth:`from_hf_dict` (used when we save our own models).
        ``initializer_range`` is written only when it is not transformers' default 0.02, so
        that a default model's config.json (and a run's manifest) stays as it was."""
        hf = self._hf_dict()
        if self.initializer_range != 0.02:
            hf["initializer_range"] = self.initializer_range
        return hf

    def _hf_dict(self) -> dict[str, Any]:
        if self.family == "distilbert":
            return {
                "model_type": "distilbert",
                "architectures": ["DistilBertForMaskedLM"],
                "vocab_size": self.vocab_size,
                "dim": self.hidden_size,
                "n_layers": self.num_layers,
                "n_heads": self.num_heads,
                "hidden_dim": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings,
                "pad_token_id": self.pad_token_id,
                "activation": self.hidden_act,
                "tie_word_embeddings": self.tie_word_embeddings,
            }
        return {
            "model_type": self.family,
            "architectures": ["BertForMaskedLM" if self.family == "bert" else "RobertaForMaskedLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


def position_ids_for(input_ids: jax.Array, config: BertConfig) -> jax.Array:
    """Position ids as each variant's reference implementation makes them."""
    if config.family == "roberta":
        # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id.
        not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
        return jnp.cumsum(not_pad, axis=-1) * not_pad + config.pad_token_id
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)


class Embeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        embed = lambda n, name: nn.Embed(n, c.hidden_size, dtype=self.dtype, name=name)  # noqa: E731
        x = embed(c.vocab_size, "word_embeddings")(input_ids)
        positions = position_ids_for(input_ids, c)
        x = x + embed(c.max_position_embeddings, "position_embeddings")(positions)
        if c.type_vocab_size:
            x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
        return nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)


class SelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, queries_from, x, attention_bias):
        """Queries from ``queries_from`` [B, Q, H] (``x`` itself, or a few of its rows), keys and
        values from ``x`` [B, L, H]."""
        c = self.config
        split = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.head_dim)  # noqa: E731
        query, key, value, output = (DenseParams(c.hidden_size, name=n)(c.hidden_size)
                                     for n in ("query", "key", "value", "output"))
        # One matmul for the projections that read the same rows: wider, so faster on every
        # backend, and a single weight gradient in the backward pass.
        if queries_from is x:
            qkv = dense(x, *concat_dense(query, key, value), self.dtype, "query_key_value")
            q, k, v = jnp.split(qkv, 3, -1)
        else:
            q = dense(queries_from, *query, self.dtype, "query")
            k, v = jnp.split(dense(x, *concat_dense(key, value), self.dtype, "key_value"), 2, -1)
        q, k, v = split(q), split(k), split(v)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(c.head_dim)
        # Softmax in float32 whatever the compute dtype: bf16 softmax over long rows loses mass.
        probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        context = context.reshape(*context.shape[:-2], c.hidden_size)
        return dense(context, *output, self.dtype, "output"), probs


class EncoderLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_bias, query_positions=None):
        """``query_positions`` [B, K]: compute the layer's output only at those rows (every row
        still serves as a key and value). Each row's output depends on the rest of the sequence
        only through attention, so the result equals those rows of the full output."""
        c = self.config
        norm = lambda name: nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name=name)  # noqa: E731
        rows = x if query_positions is None else take_rows(x, query_positions)
        attended, probs = SelfAttention(c, self.dtype, name="attention")(rows, x, attention_bias)
        x = norm("attention_norm")(rows + attended)
        ffn_in = DenseParams(c.intermediate_size, name="ffn_in")(c.hidden_size)
        ffn_out = DenseParams(c.hidden_size, name="ffn_out")(c.intermediate_size)
        h = activation(c.hidden_act)(dense(x, *ffn_in, self.dtype, "ffn_in"))
        h = dense(h, *ffn_out, self.dtype, "ffn_out")
        return norm("ffn_norm")(x + h), probs


class MLMHead(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, word_embeddings):
        c = self.config
        # RoBERTa's head always uses exact GELU, whatever hidden_act says.
        act = activation("gelu" if c.family == "roberta" else c.hidden_act)
        transform = DenseParams(c.hidden_size, name="transform")(c.hidden_size)
        x = act(dense(x, *transform, self.dtype, "transform"))
        x = nn.LayerNorm(c.layer_norm_eps, dtype=self.dtype, name="layer_norm")(x)
        if c.tie_word_embeddings:
            logits = x @ word_embeddings.T.astype(self.dtype)
        else:
            decoder = DenseParams(c.vocab_size, use_bias=False, name="decoder")(c.hidden_size)
            logits = dense(x, *decoder, self.dtype, "decoder")
        bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,))
        # Logits always come out in float32: the loss and the ranking need the precision.
        return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class MaskedLM(nn.Module):
    """Encoder + MLM head. See :func:`mlm_forward` for the pure functional entry point;
    ``stop_layer`` returns ``{"hidden": output of layer stop_layer - 1}`` instead."""

    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        *,
        token_type_ids=None,
        output_positions=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        hidden=None,
        start_layer: int = 0,
        stop_layer: int | None = None,
    ):
        c = self.config

        def embed():
            types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            return Embeddings(c, self.dtype, name="embeddings")(input_ids, types)

        x = first_hidden(hidden, start_layer, self.dtype, embed)
        # Additive bias: padded keys get the most negative float, as the reference does.
        attention_bias = additive_bias(attention_mask[:, None, None, :].astype(bool))
        rows = output_rows(output_positions)
        layer = lambda i, x, query_rows: EncoderLayer(c, self.dtype, name=f"layer_{i}")(  # noqa: E731
            x, attention_bias, query_rows)
        stop = c.num_layers if stop_layer is None else stop_layer
        x, hidden_states, attentions, gathered = run_layers(
            layer, x, range(start_layer, stop), c.num_layers, rows,
            every_row=output_hidden_states or output_attentions)
        if stop_layer is not None:
            return {"hidden": x}
        x = rows_at(x, rows, output_positions, gathered)
        word_embeddings = self.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
        logits = MLMHead(c, self.dtype, name="mlm_head")(x, word_embeddings)
        return mlm_outputs(logits, hidden_states, attentions, output_hidden_states,
                           output_attentions)


def mlm_forward(
    params: Any,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    *,
    config: BertConfig,
    token_type_ids: jax.Array | None = None,
    output_positions: jax.Array | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    dtype: Any = jnp.float32,
    hidden: jax.Array | None = None,
    start_layer: int = 0,
) -> dict[str, Any]:
    """Pure forward pass: ``params`` pytree + token ids -> MLM outputs.

    Args:
      params: the model's parameter pytree (as made by :func:`init_params` or
        ``lamp_jax.models.load_mlm``), possibly with masked kernels.
      input_ids, attention_mask: ``[B, L]`` int arrays (mask is 1 for real tokens).
      token_type_ids: ``[B, L]`` segment ids (zeros when None; unused by DistilBERT).
      output_positions: optional ``[B]`` (or ``[B, K]``) positions; when given, logits are
        computed only there, shape ``[B, V]`` (or ``[B, K, V]``) instead of ``[B, L, V]``, and
        the last layer computes only those rows (unless hidden states or attentions are asked
        for, which then cover every row).
      output_hidden_states: also return the input of the first layer run and every layer's
        output (``hidden_states[j]`` is the output of layer ``start_layer + j - 1``).
      output_attentions: also return every layer's attention probabilities ``[B, H, L, L]``.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision); logits are float32.
      hidden, start_layer: resume from ``hidden`` [B, L, H], the output of layer
        ``start_layer - 1`` (from :func:`encode_prefix`); ``input_ids`` is then unused.

    Returns:
      dict with ``logits`` and, when asked, ``hidden_states`` / ``attentions`` tuples.
    """
    return MaskedLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids=token_type_ids,
        output_positions=output_positions, output_hidden_states=output_hidden_states,
        output_attentions=output_attentions, hidden=hidden, start_layer=start_layer)


def encode_prefix(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: BertConfig,
    stop_layer: int,
    token_type_ids: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The output of layer ``stop_layer - 1`` (the embeddings for 0): ``[B, L, H]``."""
    check_stop_layer(stop_layer, config.num_layers)
    return MaskedLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids=token_type_ids,
        stop_layer=stop_layer)["hidden"]


def init_params(config: BertConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Randomly initialised params (Flax default initialisers) for ``config``."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return MaskedLM(config).init(rng, ids, jnp.ones_like(ids))["params"]
