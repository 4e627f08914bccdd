"""The Llama architecture in Flax, as Llama 3.x, TinyLlama, SmolLM2 (``model_type`` llama),
Qwen2 / Qwen2.5 (qwen2) and Qwen3 (qwen3) use it.

Written against transformers' ``modeling_llama.py``, ``modeling_qwen2.py`` and
``modeling_qwen3.py`` (5.x) and kept to their arithmetic:

* embeddings are the token embeddings alone; positions enter through rotary embeddings on
  queries and keys at positions ``0..L-1`` (``lamp_jax.models.rope``: default, linear, dynamic
  NTK, llama3 and YaRN frequencies);
* pre-norm layers ``x + attn(rms(x))``, then ``x + mlp(rms(x))``, and a final RMSNorm; RMSNorm
  computes in float32 and casts back before its weight multiplies, as transformers;
* grouped-query attention: ``num_key_value_heads`` key/value heads, query head ``j`` reading
  key/value head ``j // (num_attention_heads / num_key_value_heads)`` (transformers'
  ``repeat_kv``); ``head_dim`` from the config when it gives one (Qwen3: 128 by default);
* attention is causal and skips padding; a ``sliding_attention`` layer (Qwen2/Qwen3 with
  ``use_sliding_window``) also skips keys ``sliding_window`` or more positions back;
* Qwen3 normalises every query and key head (an RMSNorm over ``head_dim``) before the rotary
  embedding;
* biases: Llama's q/k/v/o follow ``attention_bias`` and its MLP ``mlp_bias``; Qwen2 always has
  q/k/v biases and none on o or the MLP; Qwen3's q/k/v/o follow ``attention_bias``;
* a SwiGLU MLP ``down(act(gate(x)) * up(x))`` (``hidden_act``, SiLU);
* the LM head (no bias) is tied to the embeddings when ``tie_word_embeddings``.

The forward pass has the calling convention of every family's (``lamp_jax.models.registry``);
``logits[:, t]`` are the next-token logits after token ``t``.

Parameter tree (Linen names; kernels ``[in, out]``; a ``bias`` exists only where the model has
one, the norms have a ``scale`` only)::

    embeddings/embed_tokens/embedding
    layer_<i>/attn_norm/scale                     input_layernorm
    layer_<i>/attention/{query,key,value,output}/{kernel,bias}   q/k/v/o_proj
    layer_<i>/attention/{query_norm,key_norm}/scale              Qwen3's q_norm / k_norm
    layer_<i>/mlp_norm/scale                      post_attention_layernorm
    layer_<i>/ffn_gate/{kernel,bias}              mlp.gate_proj
    layer_<i>/ffn_in/{kernel,bias}                mlp.up_proj
    layer_<i>/ffn_out/{kernel,bias}               mlp.down_proj
    final_norm/scale                              norm
    lm_head/kernel                                only when untied
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lamp_jax.errors import UsageError
from lamp_jax.models.layers import (
    DenseParams,
    activation,
    additive_bias,
    apply_rotary,
    check_stop_layer,
    concat_dense,
    dense,
    first_hidden,
    mlm_outputs,
    output_rows,
    rotary_tables_of,
    rows_at,
    run_layers,
    take_rows,
)
from lamp_jax.models.rope import RopeParameters, inverse_frequencies

VARIANTS = ("llama", "qwen2", "qwen3")
FULL, SLIDING = "full_attention", "sliding_attention"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}

# The maskable matrices: short name -> path inside a layer's params, in the order a mask spec
# lists them by default. query/key/value/attn_out/ffn_in/ffn_out sit at the BERT family's paths
# (ffn_in is up_proj, the MLP's linear input); ffn_gate is the SwiGLU gate.
MATRICES: dict[str, tuple[str, ...]] = {
    "query": ("attention", "query", "kernel"),
    "key": ("attention", "key", "kernel"),
    "value": ("attention", "value", "kernel"),
    "attn_out": ("attention", "output", "kernel"),
    "ffn_gate": ("ffn_gate", "kernel"),
    "ffn_in": ("ffn_in", "kernel"),
    "ffn_out": ("ffn_out", "kernel"),
}

# transformers' config defaults for what a config.json may leave out, per model type.
_DEFAULTS = {
    "llama": dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, head_dim=None),
    "qwen2": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                  head_dim=None),
    "qwen3": dict(max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                  head_dim=128),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama-architecture causal LM (hashable: a static jit argument).

    ``family`` is the variant, the checkpoint's ``model_type``: ``llama``, ``qwen2`` or
    ``qwen3``. ``num_heads`` counts query heads, ``num_kv_heads`` key/value heads.
    ``layer_types`` has one entry per layer (empty: every layer ``full_attention``);
    ``sliding_window`` is the window of the ``sliding_attention`` ones (None when the config
    does not use one, as transformers' ``use_sliding_window``).
    """

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    intermediate_size: int = 11008
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: RopeParameters = RopeParameters()
    attention_bias: bool = False
    mlp_bias: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", (FULL,) * self.num_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        problems = []
        if self.family not in VARIANTS:
            problems.append(f"model_type {self.family!r} is not one of {VARIANTS}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"num_attention_heads {self.num_heads} is not a multiple of "
                            f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"rotary embeddings need an even head_dim, not {self.head_dim}")
        if len(self.layer_types) != self.num_layers:
            problems.append(f"{len(self.layer_types)} layer_types for {self.num_layers} layers")
        unknown = sorted(set(self.layer_types) - {FULL, SLIDING})
        if unknown:
            problems.append(f"unknown layer_types {unknown}; expected {FULL!r} or {SLIDING!r}")
        if SLIDING in self.layer_types and (self.family == "llama" or not self.sliding_window):
            problems.append("sliding_attention layers need a Qwen2/Qwen3 config with "
                            "use_sliding_window true and a sliding_window")
        if self.family != "llama" and self.mlp_bias:
            problems.append(f"{self.family} has no MLP biases (mlp_bias)")
        if self.family == "qwen2" and not self.attention_bias:
            problems.append("qwen2 always has q/k/v biases (attention_bias)")
        try:
            activation(self.hidden_act)
        except ValueError as err:
            problems.append(f"hidden_act: {err}")
        if problems:
            raise UsageError(f"invalid {self.family} config: " + "; ".join(problems))

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def output_bias(self) -> bool:
        """o_proj's bias: Qwen2 never has one, Llama and Qwen3 with ``attention_bias``."""
        return self.attention_bias and self.family != "qwen2"

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> LlamaConfig:
        """From a ``config.json`` dict of a ``llama``, ``qwen2`` or ``qwen3`` checkpoint, with
        transformers' defaults for what it leaves out."""
        family = hf.get("model_type")
        if family not in VARIANTS:
            raise ValueError(f"not a Llama-architecture config: model_type {family!r}")
        defaults = _DEFAULTS[family]
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        max_positions = hf.get("max_position_embeddings", defaults["max_position_embeddings"])
        head_dim = hf.get("head_dim", defaults["head_dim"]) or hf["hidden_size"] // heads
        sliding_window = None
        layer_types = hf.get("layer_types")
        if family != "llama":
            sliding_window = hf.get("sliding_window", 4096) if hf.get(
                "use_sliding_window", False) else None
            if not layer_types:  # transformers' default: sliding from max_window_layers on
                first = hf.get("max_window_layers", 28)
                layer_types = [SLIDING if sliding_window is not None and i >= first else FULL
                               for i in range(layers)]
        eos = hf.get("eos_token_id", defaults["eos_token_id"])
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=max_positions,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            hidden_act=hf.get("hidden_act", "silu"),
            rope=RopeParameters.from_hf_dict(hf, max_positions),
            attention_bias=True if family == "qwen2" else hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False) if family == "llama" else False,
            layer_types=tuple(layer_types or ()),
            sliding_window=sliding_window,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id", defaults["bos_token_id"]),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """transformers 5's ``config.json`` for this model (the inverse of
        :meth:`from_hf_dict`; dropouts take transformers' defaults)."""
        out: dict[str, Any] = {
            "model_type": self.family,
            "architectures": [ARCHITECTURES[self.family]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": self.rope.to_hf_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                             else self.eos_token_id),
        }
        if self.family != "qwen2":
            out["attention_bias"] = self.attention_bias
        if self.family == "llama":
            out["mlp_bias"] = self.mlp_bias
        else:
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, layer_types=list(self.layer_types))
        return out


def attention_bias(attention_mask: jax.Array, query_positions: jax.Array,
                   key_positions: jax.Array, window: int | None) -> jax.Array:
    """Additive bias ``[B, 1, Q, L]``: a query may attend to the real (unpadded) keys at its own
    position or before it, and for a sliding layer only those fewer than ``window`` back
    (transformers' ``kv_idx > q_idx - sliding_window``)."""
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    allowed = attention_mask[:, None, :].astype(bool) & (distance >= 0)
    if window is not None:
        allowed = allowed & (distance < window)
    return additive_bias(allowed[:, None])


class RMSNorm(nn.Module):
    """transformers' ``LlamaRMSNorm``: ``weight * (x / rms(x))``, the normalisation in float32
    and cast back to the compute dtype before the weight multiplies."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class Embeddings(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        return nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")(
            input_ids)


class Attention(nn.Module):
    config: LlamaConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, attention_mask, query_positions=None):
        """Keys and values from every row of ``h`` [B, L, H]; queries from the rows
        ``query_positions`` [B, K] (all rows when None)."""
        c = self.config
        heads, groups, d = c.num_heads, c.num_kv_heads, c.head_dim
        query = DenseParams(heads * d, c.qkv_bias, name="query")(c.hidden_size)
        key = DenseParams(groups * d, c.qkv_bias, name="key")(c.hidden_size)
        value = DenseParams(groups * d, c.qkv_bias, name="value")(c.hidden_size)
        output = DenseParams(c.hidden_size, c.output_bias, name="output")(heads * d)
        batch, length = h.shape[:2]
        key_positions = jnp.arange(length)[None]
        # One matmul for the projections that read the same rows (as the BERT family's).
        if query_positions is None:
            qkv = dense(h, *concat_dense(query, key, value), self.dtype, "query_key_value")
            q, k, v = jnp.split(qkv, [heads * d, (heads + groups) * d], -1)
            query_positions = key_positions
        else:
            q = dense(take_rows(h, query_positions), *query, self.dtype, "query")
            k, v = jnp.split(dense(h, *concat_dense(key, value), self.dtype, "key_value"), 2, -1)
        q = q.reshape(*q.shape[:-1], heads, d)
        k, v = (t.reshape(batch, length, groups, d) for t in (k, v))
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, name="query_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, name="key_norm")(k)
        inv_freq, scaling = inverse_frequencies(c.rope, d, c.max_position_embeddings, length)
        q = apply_rotary(q, *rotary_tables_of(query_positions, inv_freq, scaling))
        k = apply_rotary(k, *rotary_tables_of(key_positions, inv_freq, scaling))
        # Query head j = g * repeats + r reads key/value head g (transformers' repeat_kv).
        grouped = q.reshape(*q.shape[:2], groups, heads // groups, d)
        scores = jnp.einsum("bqgrd,bkgd->bgrqk", grouped, k).reshape(
            batch, heads, q.shape[1], length) * (d ** -0.5)
        window = c.sliding_window if c.layer_types[self.index] == SLIDING else None
        bias_qk = attention_bias(attention_mask, query_positions, key_positions, window)
        # Softmax in float32 whatever the compute dtype, as transformers' eager attention.
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias_qk, axis=-1)
        context = jnp.einsum(
            "bgrqk,bkgd->bqgrd",
            probs.reshape(batch, groups, heads // groups, *probs.shape[2:]).astype(self.dtype), v)
        context = context.reshape(*context.shape[:2], heads * d)
        return dense(context, *output, self.dtype, "output"), probs


class DecoderLayer(nn.Module):
    config: LlamaConfig
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, query_positions=None):
        """Pre-norm layer. With ``query_positions`` [B, K] only those rows come out (every row
        still serves as a key and value), equal to those rows of the full output."""
        c = self.config
        attended, probs = Attention(c, self.index, self.dtype, name="attention")(
            RMSNorm(c.rms_norm_eps, self.dtype, name="attn_norm")(x), attention_mask,
            query_positions)
        x = (x if query_positions is None else take_rows(x, query_positions)) + attended
        width, inner = c.hidden_size, c.intermediate_size
        gate = DenseParams(inner, c.mlp_bias, name="ffn_gate")(width)
        up = DenseParams(inner, c.mlp_bias, name="ffn_in")(width)
        down = DenseParams(width, c.mlp_bias, name="ffn_out")(inner)
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="mlp_norm")(x)
        gated, linear = jnp.split(dense(h, *concat_dense(gate, up), self.dtype, "gate_up"), 2, -1)
        x = x + dense(activation(c.hidden_act)(gated) * linear, *down, self.dtype, "ffn_out")
        return x, probs


class CausalLM(nn.Module):
    """Decoder + LM head. See :func:`lm_forward` for the pure functional entry point;
    ``stop_layer`` returns ``{"hidden": output of layer stop_layer - 1}`` instead."""

    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, *, output_positions=None,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 hidden=None, start_layer: int = 0, stop_layer: int | None = None):
        c = self.config
        x = first_hidden(hidden, start_layer, self.dtype,
                         lambda: Embeddings(c, self.dtype, name="embeddings")(input_ids))
        attention_mask = jnp.asarray(attention_mask)
        rows = output_rows(output_positions)
        layer = lambda i, x, query_rows: DecoderLayer(c, i, self.dtype, name=f"layer_{i}")(  # noqa: E731
            x, attention_mask, query_rows)
        stop = c.num_layers if stop_layer is None else stop_layer
        x, hidden_states, attentions, gathered = run_layers(
            layer, x, range(start_layer, stop), c.num_layers, rows,
            every_row=output_hidden_states or output_attentions)
        if stop_layer is not None:
            return {"hidden": x}
        last = x
        final_norm = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")
        x = final_norm(rows_at(x, rows, output_positions, gathered))
        if c.tie_word_embeddings:
            table = self.variables["params"]["embeddings"]["embed_tokens"]["embedding"]
            logits = x @ table.T.astype(self.dtype)
        else:
            head = DenseParams(c.vocab_size, use_bias=False, name="lm_head")(c.hidden_size)
            logits = dense(x, *head, self.dtype, "lm_head")
        if output_hidden_states:
            # As transformers: the last hidden state is the final norm's output.
            hidden_states[-1] = x if rows is None else final_norm(last)
        # Logits always come out in float32: the loss and the ranking need the precision.
        return mlm_outputs(logits.astype(jnp.float32), hidden_states, attentions,
                           output_hidden_states, output_attentions)


def lm_forward(
    params: Any,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    *,
    config: LlamaConfig,
    token_type_ids: jax.Array | None = None,
    output_positions: jax.Array | None = None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    dtype: Any = jnp.float32,
    hidden: jax.Array | None = None,
    start_layer: int = 0,
) -> dict[str, Any]:
    """Pure forward pass with every family's arguments (``lamp_jax.models.registry``):
    ``logits[:, t]`` ``[B, L, V]`` are the next-token logits after token ``t``, attending
    causally to the unpadded tokens (right padding: a row's tokens sit at positions
    ``0..n-1``). ``output_positions`` ``[B]`` / ``[B, K]`` gives only those positions' logits.
    There are no token types (transformers' Llama and Qwen take none): ``token_type_ids`` is
    part of the shared calling convention and not read. ``hidden_states`` are the layers'
    inputs and outputs, the last one after the final norm."""
    return CausalLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, output_positions=output_positions,
        output_hidden_states=output_hidden_states, output_attentions=output_attentions,
        hidden=hidden, start_layer=start_layer)


def encode_prefix(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: LlamaConfig,
    stop_layer: int,
    token_type_ids: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The output of layer ``stop_layer - 1`` (the embeddings for 0): ``[B, L, H]``
    (``token_type_ids``: not read, as in :func:`lm_forward`)."""
    check_stop_layer(stop_layer, config.num_layers)
    return CausalLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, stop_layer=stop_layer)["hidden"]


def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> Any:
    """Randomly initialised params (Flax default initialisers) for ``config``."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return CausalLM(config).init(rng, ids, jnp.ones_like(ids))["params"]
