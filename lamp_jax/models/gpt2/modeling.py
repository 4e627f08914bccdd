"""GPT-2 causal language models (gpt2, gpt2-medium/-large/-xl, distilgpt2) in Flax.

Written against transformers' ``modeling_gpt2.py`` (5.x) and kept to its arithmetic:

* embeddings are the token embeddings ``wte`` plus learned position embeddings ``wpe`` at
  positions ``0..L-1`` (plus ``wte`` of ``token_type_ids`` when given, as transformers does);
* pre-norm layers ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``, and ``ln_f`` at the end;
* attention is causal (a token sees itself and the tokens before it) and skips padding; its
  scores are scaled by ``head_dim^-0.5`` when ``scale_attn_weights`` and further by
  ``1 / (layer index + 1)`` when ``scale_attn_by_inverse_layer_idx``;
  ``reorder_and_upcast_attn`` computes the scores in float32 whatever the compute dtype;
* the fused ``c_attn`` gives ``[q | k | v]``; GPT-2's ``Conv1D`` keeps its weights
  ``[in, out]``, the layout of our kernels, so checkpoints are copied without a transpose;
* the MLP is ``c_proj(act(c_fc(x)))`` with ``n_inner`` (``4 * n_embd`` when None) columns and
  ``activation_function`` (``gelu_new``, the tanh approximation);
* the LM head is tied to ``wte`` unless ``tie_word_embeddings`` is false; it has no bias.

The forward pass has the calling convention of every family's (``lamp_jax.models.registry``);
``logits[:, t]`` are the next-token logits after token ``t``.

Parameter tree (Linen names; kernels ``[in, out]``)::

    embeddings/wte/embedding             embeddings/wpe/embedding
    layer_<i>/attn_norm/{scale,bias}     ln_1
    layer_<i>/attention/qkv/{kernel,bias}     c_attn: [H, 3H], columns q | k | v
    layer_<i>/attention/output/{kernel,bias}  attn.c_proj
    layer_<i>/mlp_norm/{scale,bias}      ln_2
    layer_<i>/ffn_in/{kernel,bias}       mlp.c_fc
    layer_<i>/ffn_out/{kernel,bias}      mlp.c_proj
    final_norm/{scale,bias}              ln_f
    lm_head/kernel                       only when untied
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
    check_stop_layer,
    dense,
    first_hidden,
    mlm_outputs,
    output_rows,
    rows_at,
    run_layers,
    take_rows,
)

# The maskable matrices: short name -> path inside a layer's params, in the order a mask spec
# lists them by default. ``qkv`` is the fused c_attn [H, 3H], at ModernBERT's fused Wqkv's path.
MATRICES: dict[str, tuple[str, ...]] = {
    "qkv": ("attention", "qkv", "kernel"),
    "attn_out": ("attention", "output", "kernel"),
    "ffn_in": ("ffn_in", "kernel"),
    "ffn_out": ("ffn_out", "kernel"),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture of a GPT-2 causal LM (hashable: it is a static jit argument), with the
    attribute names the rest of lamp-jax reads from any model config."""

    family: str = "gpt2"
    vocab_size: int = 50257
    hidden_size: int = 768  # n_embd
    num_layers: int = 12  # n_layer
    num_heads: int = 12  # n_head
    intermediate_size: int = 3072  # n_inner, 4 * n_embd when the config says None
    max_position_embeddings: int = 1024  # n_positions
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"  # activation_function
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self) -> None:
        if self.family != "gpt2":
            raise ValueError(f"a GPT2Config has family 'gpt2', not {self.family!r}")
        if self.hidden_size % self.num_heads:
            raise UsageError(f"n_embd {self.hidden_size} is not divisible by n_head "
                             f"{self.num_heads}")
        try:
            activation(self.hidden_act)
        except ValueError as err:
            raise UsageError(f"GPT-2 activation_function: {err}") from err

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> GPT2Config:
        """From a ``config.json`` dict (``n_embd``, ``n_layer``, ... as GPT-2's are written)."""
        if hf.get("model_type") != "gpt2":
            raise ValueError(f"not a GPT-2 config: model_type {hf.get('model_type')!r}")
        if hf.get("add_cross_attention"):
            raise UsageError("GPT-2 with add_cross_attention (an encoder-decoder's decoder) is "
                             "not supported")
        hidden = hf.get("n_embd", 768)
        return cls(
            vocab_size=hf.get("vocab_size", 50257),
            hidden_size=hidden,
            num_layers=hf.get("n_layer", 12),
            num_heads=hf.get("n_head", 12),
            intermediate_size=hf.get("n_inner") or 4 * hidden,
            max_position_embeddings=hf.get("n_positions", 1024),
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            hidden_act=hf.get("activation_function", "gelu_new"),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            reorder_and_upcast_attn=hf.get("reorder_and_upcast_attn", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02),
            pad_token_id=hf.get("pad_token_id"),
            bos_token_id=hf.get("bos_token_id", 50256),
            eos_token_id=hf.get("eos_token_id", 50256),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of :meth:`from_hf_dict` (dropouts take transformers' defaults)."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_layers,
            "n_head": self.num_heads,
            "n_inner": self.intermediate_size,
            "n_positions": self.max_position_embeddings,
            "layer_norm_epsilon": self.layer_norm_eps,
            "activation_function": self.hidden_act,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }


def causal_bias(attention_mask: jax.Array, query_positions: jax.Array,
                key_positions: jax.Array) -> jax.Array:
    """Additive bias ``[B, 1, Q, L]``: a query may attend to the real (unpadded) keys at its own
    position or before it."""
    allowed = attention_mask[:, None, :].astype(bool) & (
        key_positions[:, None, :] <= query_positions[:, :, None])
    return additive_bias(allowed[:, None])


def _norm(config: GPT2Config, dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(config.layer_norm_eps, dtype=dtype, name=name)


class Embeddings(nn.Module):
    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids):
        c = self.config
        wte = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="wte")
        wpe = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, name="wpe")
        x = wte(input_ids) + wpe(jnp.arange(input_ids.shape[-1])[None])
        if token_type_ids is not None:  # transformers embeds token types with wte
            x = x + wte(token_type_ids)
        return x


class Attention(nn.Module):
    config: GPT2Config
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, attention_mask, query_positions=None):
        """Keys and values from every row of ``h`` [B, L, H]; queries from the rows
        ``query_positions`` [B, K] (all rows when None)."""
        c = self.config
        width = c.hidden_size
        kernel, bias = DenseParams(3 * width, name="qkv")(width)
        output = DenseParams(width, name="output")(width)
        key_positions = jnp.arange(h.shape[1])[None]
        if query_positions is None:
            q, k, v = jnp.split(dense(h, kernel, bias, self.dtype, "qkv"), 3, -1)
            query_positions = key_positions
        else:
            # Only these rows' queries: c_attn's q columns (a mask on the fused kernel is applied
            # before the slice, so its gradient still reaches every column).
            q = dense(take_rows(h, query_positions), kernel[:, :width], bias[:width],
                      self.dtype, "query")
            k, v = jnp.split(dense(h, kernel[:, width:], bias[width:], self.dtype,
                                   "key_value"), 2, -1)
        heads = lambda t: t.reshape(*t.shape[:-1], c.num_heads, c.head_dim)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scale = c.head_dim ** -0.5 if c.scale_attn_weights else 1.0
        if c.scale_attn_by_inverse_layer_idx:
            scale /= float(self.index + 1)
        if c.reorder_and_upcast_attn:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
        bias_qk = causal_bias(attention_mask, query_positions, key_positions)
        # Softmax in float32 whatever the compute dtype: bf16 softmax over long rows loses mass.
        probs = jax.nn.softmax(scores.astype(jnp.float32) + bias_qk, axis=-1)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
        context = context.reshape(*context.shape[:-2], width)
        return dense(context, *output, self.dtype, "output"), probs


class DecoderLayer(nn.Module):
    config: GPT2Config
    index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, attention_mask, query_positions=None):
        """Pre-norm layer. With ``query_positions`` [B, K] only those rows come out (every row
        still serves as a key and value), equal to those rows of the full output."""
        c = self.config
        attended, probs = Attention(c, self.index, self.dtype, name="attention")(
            _norm(c, self.dtype, "attn_norm")(x), attention_mask, query_positions)
        x = (x if query_positions is None else take_rows(x, query_positions)) + attended
        ffn_in = DenseParams(c.intermediate_size, name="ffn_in")(c.hidden_size)
        ffn_out = DenseParams(c.hidden_size, name="ffn_out")(c.intermediate_size)
        h = dense(_norm(c, self.dtype, "mlp_norm")(x), *ffn_in, self.dtype, "ffn_in")
        x = x + dense(activation(c.hidden_act)(h), *ffn_out, self.dtype, "ffn_out")
        return x, probs


class CausalLM(nn.Module):
    """Decoder + LM head. See :func:`lm_forward` for the pure functional entry point;
    ``stop_layer`` returns ``{"hidden": output of layer stop_layer - 1}`` instead."""

    config: GPT2Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, *, token_type_ids=None, output_positions=None,
                 output_hidden_states: bool = False, output_attentions: bool = False,
                 hidden=None, start_layer: int = 0, stop_layer: int | None = None):
        c = self.config
        x = first_hidden(hidden, start_layer, self.dtype, lambda: Embeddings(
            c, self.dtype, name="embeddings")(input_ids, token_type_ids))
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
        final_norm = _norm(c, self.dtype, "final_norm")
        x = final_norm(rows_at(x, rows, output_positions, gathered))
        if c.tie_word_embeddings:
            wte = self.variables["params"]["embeddings"]["wte"]["embedding"]
            logits = x @ wte.T.astype(self.dtype)
        else:
            head = DenseParams(c.vocab_size, use_bias=False, name="lm_head")(c.hidden_size)
            logits = dense(x, *head, self.dtype, "lm_head")
        if output_hidden_states:
            # As transformers: the last hidden state is ln_f's output, the state the head reads.
            hidden_states[-1] = x if rows is None else final_norm(last)
        # Logits always come out in float32: the loss and the ranking need the precision.
        return mlm_outputs(logits.astype(jnp.float32), hidden_states, attentions,
                           output_hidden_states, output_attentions)


def lm_forward(
    params: Any,
    input_ids: jax.Array | None,
    attention_mask: jax.Array,
    *,
    config: GPT2Config,
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
    ``token_type_ids``, when given, are embedded with ``wte`` and added, as transformers does.
    ``hidden_states`` are the layers' inputs and outputs, the last one after ``ln_f``."""
    return CausalLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids=token_type_ids,
        output_positions=output_positions, output_hidden_states=output_hidden_states,
        output_attentions=output_attentions, hidden=hidden, start_layer=start_layer)


def encode_prefix(
    params: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    config: GPT2Config,
    stop_layer: int,
    token_type_ids: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The output of layer ``stop_layer - 1`` (the embeddings for 0): ``[B, L, H]``."""
    check_stop_layer(stop_layer, config.num_layers)
    return CausalLM(config, dtype).apply(
        {"params": params}, input_ids, attention_mask, token_type_ids=token_type_ids,
        stop_layer=stop_layer)["hidden"]


def init_params(config: GPT2Config, rng: jax.Array, seq_len: int = 8) -> Any:
    """Randomly initialised params (Flax default initialisers) for ``config``."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return CausalLM(config).init(rng, ids, jnp.ones_like(ids))["params"]
