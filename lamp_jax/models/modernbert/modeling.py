"""ModernBERT masked language models (answerdotai/ModernBERT-base, -large) in Flax.

Written against transformers' ``modeling_modernbert.py`` (5.x) and kept to its arithmetic:

* embeddings are the token embeddings and a LayerNorm, no position embeddings;
* rotary position embeddings on queries and keys, with one base for the global
  (``full_attention``) layers and another for the local (``sliding_attention``) ones;
* local layers attend only to keys at distance ``<= local_attention // 2`` on either side;
* pre-norm layers ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``; layer 0 has no
  ``attn_norm`` (an ``nn.Identity`` in transformers, because the embeddings end with a norm);
* a GeGLU MLP: the fused ``Wi`` gives ``[input | gate]`` (``chunk(2)`` order), the layer
  computes ``Wo(act(input) * gate)``;
* ``final_norm``, then the head ``norm(act(dense(x)))`` and the decoder, tied to the token
  embeddings by default, with its own bias.

The forward pass has the calling convention of every family's (``lamp_jax.models.registry``),
so training, evaluation and the frozen-prefix cache need no change.

Parameter tree (Linen names; kernels ``[in, out]``; a ``bias`` exists only when the config's
``*_bias`` switch says so)::

    embeddings/tok_embeddings/embedding        embeddings/norm/{scale,bias}
    layer_<i>/attn_norm/{scale,bias}           (not in layer 0)
    layer_<i>/attention/qkv/{kernel,bias}      Wqkv: [H, 3H], columns q | k | v
    layer_<i>/attention/output/{kernel,bias}   attention Wo
    layer_<i>/mlp_norm/{scale,bias}
    layer_<i>/ffn_in/{kernel,bias}             mlp.Wi: [H, 2F], columns input | gate
    layer_<i>/ffn_out/{kernel,bias}            mlp.Wo: [F, H]
    final_norm/{scale,bias}
    mlm_head/transform/{kernel,bias}           head.dense
    mlm_head/layer_norm/{scale,bias}           head.norm
    mlm_head/bias                              decoder.bias
    mlm_head/decoder/kernel                    only when the decoder is untied

The attention output and the two MLP kernels sit at the BERT family's paths, so the mask names
``attn_out``, ``ffn_in`` and ``ffn_out`` (:data:`MATRICES`) mean the same matrices in every
family (``lamp_jax.masks``); only the fused ``qkv`` is ModernBERT's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lamp_jax.models.layers import (
    DenseParams,
    activation,
    additive_bias,
    apply_rotary,
    check_stop_layer,
    dense,
    first_hidden,
    mlm_outputs,
    output_rows,
    rotary_tables,
    rows_at,
    run_layers,
    take_rows,
)

FULL, SLIDING = "full_attention", "sliding_attention"

# The maskable matrices: short name -> path inside a layer's params, in the order a mask spec
# lists them by default (``lamp_jax.masks``). ffn_in is the fused GeGLU Wi [H, 2F], qkv the
# fused Wqkv [H, 3H].
MATRICES: dict[str, tuple[str, ...]] = {
    "qkv": ("attention", "qkv", "kernel"),
    "attn_out": ("attention", "output", "kernel"),
    "ffn_in": ("ffn_in", "kernel"),
    "ffn_out": ("ffn_out", "kernel"),
}


@dataclasses.dataclass(frozen=True)
class ModernBertConfig:
    """Architecture of a ModernBERT MLM (hashable: it is a static jit argument).

    ``family``, ``vocab_size``, ``hidden_size``, ``num_layers``, ``num_heads``,
    ``intermediate_size``, ``max_position_embeddings``, ``pad_token_id`` and ``to_hf_dict`` are
    the attributes the rest of lamp-jax reads from any model config. ``intermediate_size`` is
    transformers' (the width of ``mlp.Wo``'s input; ``Wi`` is twice as wide).
    """

    family: str = "modernbert"
    vocab_size: int = 50368
    hidden_size: int = 768
    num_layers: int = 22
    num_heads: int = 12
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    # One entry per layer: "full_attention" or "sliding_attention". Empty: transformers' default
    # pattern, a global layer every 3rd layer (0, 3, 6, ...), local ones between.
    layer_types: tuple[str, ...] = ()
    local_attention: int = 128  # the whole window; each side sees local_attention // 2 tokens
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False  # head.dense's bias
    decoder_bias: bool = True
    hidden_act: str = "gelu"  # the MLP's activation (transformers: hidden_activation)
    classifier_act: str = "gelu"  # the head's activation (classifier_activation)
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # transformers' random init: truncated normals of this std
    initializer_cutoff_factor: float | None = 2.0  # ... cut at this many stds (None: 3)
    pad_token_id: int = 50283
    bos_token_id: int | None = 50281
    eos_token_id: int | None = 50282
    cls_token_id: int | None = 50281
    sep_token_id: int | None = 50282

    def __post_init__(self) -> None:
        if self.family != "modernbert":
            raise ValueError(f"a ModernBertConfig has family 'modernbert', not {self.family!r}")
        if not self.layer_types:
            object.__setattr__(self, "layer_types", tuple(
                SLIDING if i % 3 else FULL for i in range(self.num_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        problems = []
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - {FULL, SLIDING})
        if unknown:
            problems.append(f"unknown layer types {unknown}; expected {FULL!r} or {SLIDING!r}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                            f"{self.num_heads}")
        elif self.head_dim % 2:
            problems.append(f"rotary embeddings need an even head size, not {self.head_dim}")
        for name in (self.hidden_act, self.classifier_act):
            try:
                activation(name)
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("invalid ModernBERT config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModernBertConfig:
        """From a ``config.json`` dict, in transformers 5's layout (``layer_types``,
        ``rope_parameters``) or the hub checkpoints' original one (``global_attn_every_n_layers``,
        ``global_rope_theta``, ``local_rope_theta``)."""
        if hf.get("model_type") != "modernbert":
            raise ValueError(f"not a ModernBERT config: model_type {hf.get('model_type')!r}")
        layers = hf["num_hidden_layers"]
        layer_types = hf.get("layer_types")
        if not layer_types:
            every = hf.get("global_attn_every_n_layers", 3)
            layer_types = [SLIDING if i % every else FULL for i in range(layers)]
        rope = hf.get("rope_parameters") or {}
        unsupported = {kind: p.get("rope_type") for kind, p in rope.items()
                       if p and p.get("rope_type", "default") != "default"}
        if unsupported or hf.get("rope_scaling"):
            raise ValueError(f"only the default rotary embedding is implemented, not "
                             f"{unsupported or hf.get('rope_scaling')}")
        theta = {kind: (rope.get(kind) or {}).get("rope_theta") for kind in (FULL, SLIDING)}
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=layers,
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            layer_types=tuple(layer_types),
            local_attention=hf.get("local_attention", 128),
            global_rope_theta=float(theta[FULL] or hf.get("global_rope_theta", 160_000.0)),
            local_rope_theta=float(theta[SLIDING] or hf.get("local_rope_theta", 10_000.0)),
            norm_eps=hf.get("norm_eps", 1e-5),
            norm_bias=hf.get("norm_bias", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            classifier_bias=hf.get("classifier_bias", False),
            decoder_bias=hf.get("decoder_bias", True),
            hidden_act=hf.get("hidden_activation", "gelu"),
            classifier_act=hf.get("classifier_activation", "gelu"),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02),
            initializer_cutoff_factor=hf.get("initializer_cutoff_factor", 2.0),
            pad_token_id=hf.get("pad_token_id", 50283),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            cls_token_id=hf.get("cls_token_id"),
            sep_token_id=hf.get("sep_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers 5's ``config.json`` for this model (the inverse of
        :meth:`from_hf_dict`; dropouts take transformers' defaults, and so do the initialiser
        settings where they have them: those are written only when they differ, so that a
        default model's config.json (and a run's manifest) stays as it was)."""
        hf = self._hf_dict()
        for name, default in (("initializer_range", 0.02), ("initializer_cutoff_factor", 2.0)):
            if getattr(self, name) != default:
                hf[name] = getattr(self, name)
        return hf

    def _hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "modernbert",
            "architectures": ["ModernBertForMaskedLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "layer_types": list(self.layer_types),
            "local_attention": self.local_attention,
            "rope_parameters": {
                FULL: {"rope_type": "default", "rope_theta": self.global_rope_theta},
                SLIDING: {"rope_type": "default", "rope_theta": self.local_rope_theta},
            },
            "norm_eps": self.norm_eps,
            "norm_bias": self.norm_bias,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "classifier_bias": self.classifier_bias,
            "decoder_bias": self.decoder_bias,
            "hidden_activation": self.hidden_act,
            "classifier_activation": self.classifier_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "cls_token_id": self.cls_token_id,
            "sep_token_id": self.sep_token_id,
        }


def attention_bias(attention_mask: jax.Array, query_positions: jax.Array,
                   key_positions: jax.Array, half_window: int | None) -> jax.Array:
    """Additive bias ``[B, 1, Q, L]`` (``[B, 1, 1, L]`` for a global layer): 0 where a query
    may attend to a key, the most negative float32 elsewhere (padding; for a local layer also
    keys farther than ``half_window`` positions, transformers' ``|q - k| <= window``)."""
    allowed = attention_mask[:, None, None, :].astype(bool)
    if half_window is not None:
        distance = jnp.abs(query_positions[:, :, None] - key_positions[:, None, :])
        allowed = allowed & (distance <= half_window)[:, None]
    return additive_bias(allowed)


def _norm(config: ModernBertConfig, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(config.norm_eps, use_bias=config.norm_bias, dtype=dtype, name=name)


class Embeddings(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        x = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="tok_embeddings")(
            input_ids)
        return _norm(c, self.dtype, "norm")(x)


class Attention(nn.Module):
    config: ModernBertConfig
    sliding: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, attention_mask, query_positions=None):
        """Keys and values from every row of ``h`` [B, L, H]; queries from the rows
        ``query_positions`` [B, K] (all rows when None)."""
        c = self.config
        width = c.hidden_size
        kernel, bias = DenseParams(3 * width, c.attention_bias, name="qkv")(width)
        output = DenseParams(width, c.attention_bias, name="output")(width)
        key_positions = jnp.arange(h.shape[1])[None]
        if query_positions is None:
            q, k, v = jnp.split(dense(h, kernel, bias, self.dtype, "qkv"), 3, -1)
            query_positions = key_positions
        else:
            # Only these rows' queries: slice Wqkv's q columns (a mask on the fused kernel is
            # applied before the slice, so the gradient still reaches every column).
            cut = lambda a, s: None if a is None else a[..., s]  # noqa: E731
            q = dense(take_rows(h, query_positions), cut(kernel, slice(0, width)),
                      cut(bias, slice(0, width)), self.dtype, "query")
            k, v = jnp.split(dense(h, cut(kernel, slice(width, None)),
                                   cut(bias, slice(width, None)), self.dtype, "key_value"), 2, -1)
        heads = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.head_dim)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        theta = c.local_rope_theta if self.sliding else c.global_rope_theta
        q = apply_rotary(q, *rotary_tables(query_positions, c.head_dim, theta))
        k = apply_rotary(k, *rotary_tables(key_positions, c.head_dim, theta))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c.head_dim ** -0.5)
        bias_qk = attention_bias(attention_mask, query_positions, key_positions,
                                 c.local_attention // 2 if self.sliding else None)
        # Softmax in float32 whatever the compute dtype, as transformers' eager attention.
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias_qk, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        context = context.reshape(*context.shape[:-2], width)
        return dense(context, *output, self.dtype, "output"), probs


class EncoderLayer(nn.Module):
    config: ModernBertConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, query_positions=None):
        """Pre-norm layer. With ``query_positions`` [B, K] only those rows come out (every row
        still serves as a key and value), equal to those rows of the full output."""
        c = self.config
        # Layer 0 reads the embeddings, which already end with a norm (transformers: Identity).
        h = x if self.index == 0 else _norm(c, self.dtype, "attn_norm")(x)
        sliding = c.layer_types[self.index] == SLIDING
        attended, probs = Attention(c, sliding, self.dtype, name="attention")(
            h, attention_mask, query_positions)
        x = (x if query_positions is None else take_rows(x, query_positions)) + attended
        ffn_in = DenseParams(2 * c.intermediate_size, c.mlp_bias, name="ffn_in")(c.hidden_size)
        ffn_out = DenseParams(c.hidden_size, c.mlp_bias, name="ffn_out")(c.intermediate_size)
        # transformers: ``input, gate = Wi(x).chunk(2, dim=-1)``; ``Wo(act(input) * gate)``.
        inputs, gate = jnp.split(
            dense(_norm(c, self.dtype, "mlp_norm")(x), *ffn_in, self.dtype, "ffn_in"), 2, -1)
        x = x + dense(activation(c.hidden_act)(inputs) * gate, *ffn_out, self.dtype, "ffn_out")
        return x, probs


class MLMHead(nn.Module):
    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, word_embeddings):
        c = self.config
        transform = DenseParams(c.hidden_size, c.classifier_bias, name="transform")(c.hidden_size)
        x = activation(c.classifier_act)(dense(x, *transform, self.dtype, "transform"))
        x = _norm(c, self.dtype, "layer_norm")(x)
        if c.tie_word_embeddings:
            logits = x @ word_embeddings.T.astype(self.dtype)
        else:
            decoder = DenseParams(c.vocab_size, use_bias=False, name="decoder")(c.hidden_size)
            logits = dense(x, *decoder, self.dtype, "decoder")
        # Logits always come out in float32: the loss and the ranking need the precision.
        logits = logits.astype(jnp.float32)
        if c.decoder_bias:
            logits = logits + self.param("bias", nn.initializers.zeros, (c.vocab_size,)).astype(
                jnp.float32)
        return logits


class MaskedLM(nn.Module):
    """Encoder + MLM head. See :func:`mlm_forward` for the pure functional entry point;
    ``stop_layer`` returns ``{"hidden": output of layer stop_layer - 1}`` instead."""

    config: ModernBertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask,
        *,
        output_positions=None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        hidden=None,
        start_layer: int = 0,
        stop_layer: int | None = None,
    ):
        c = self.config
        x = first_hidden(hidden, start_layer, self.dtype,
                         lambda: Embeddings(c, self.dtype, name="embeddings")(input_ids))
        attention_mask = jnp.asarray(attention_mask)
        rows = output_rows(output_positions)
        layer = lambda i, x, query_rows: EncoderLayer(c, i, self.dtype, name=f"layer_{i}")(  # noqa: E731
            x, attention_mask, query_rows)
        stop = c.num_layers if stop_layer is None else stop_layer
        x, hidden_states, attentions, gathered = run_layers(
            layer, x, range(start_layer, stop), c.num_layers, rows,
            every_row=output_hidden_states or output_attentions)
        if stop_layer is not None:
            return {"hidden": x}
        last = x
        x = rows_at(x, rows, output_positions, gathered)
        final_norm = _norm(c, self.dtype, "final_norm")
        x = final_norm(x)
        word_embeddings = self.variables["params"]["embeddings"]["tok_embeddings"]["embedding"]
        logits = MLMHead(c, self.dtype, name="mlm_head")(x, word_embeddings)
        if output_hidden_states:
            # As transformers: the last hidden state is the final norm's output, the state
            # the head reads (x holds only output_positions' rows when those were given).
            hidden_states[-1] = x if rows is None else final_norm(last)
        return mlm_outputs(logits, hidden_states, attentions, output_hidden_states,
                           output_attentions)


def mlm_forward(
    params: Any,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    *,
    config: ModernBertConfig,
    token_type_ids: jax.Array | None = None,
    output_positions: jax.Array | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    dtype: Any = jnp.float32,
    hidden: jax.Array | None = None,
    start_layer: int = 0,
) -> dict[str, Any]:
    """Pure forward pass, with the arguments and outputs of every family's ``mlm_forward``
    (``lamp_jax.models.registry``). ModernBERT has no token types: ``token_type_ids`` is part
    of that shared calling convention and not read (transformers' ModernBERT takes none).
    ``hidden_states`` are the layers' outputs before ``final_norm``, but the last, which is
    after it; ``hidden`` / ``start_layer`` resume from :func:`encode_prefix`."""
    return MaskedLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, output_positions=output_positions,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        hidden=hidden, start_layer=start_layer)


def encode_prefix(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: ModernBertConfig,
    stop_layer: int,
    token_type_ids: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The output of layer ``stop_layer - 1`` (the normed embeddings for 0): ``[B, L, H]``
    (``token_type_ids``: not read, as in :func:`mlm_forward`)."""
    check_stop_layer(stop_layer, config.num_layers)
    return MaskedLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, stop_layer=stop_layer)["hidden"]


def init_params(config: ModernBertConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Randomly initialised params (Flax default initialisers) for ``config``."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return MaskedLM(config).init(rng, ids, jnp.ones_like(ids))["params"]
