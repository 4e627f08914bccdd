"""Llama, Qwen2 and Qwen3 checkpoints (``*ForCausalLM``): which transformers tensor each of our
params is.

Rows are ``(our path, Hugging Face key, layout)`` with ``{i}`` the layer index and the decoder's
keys written without their ``model.`` prefix (``lamp_jax.models.checkpoint_keys``). A row
applies only where the model has that parameter: the biases follow the config's switches and
only Qwen3 has q/k norms, which the Flax model decides (:func:`param_shapes`); the table only
names them. Older checkpoints may carry each layer's ``rotary_emb.inv_freq`` buffer, which is
recomputed from the config, as transformers does.
"""

from __future__ import annotations

from lamp_jax.models.checkpoint_keys import (
    COPY,
    LINEAR,
    KeyTable,
    Row,
    layer_rows,
    traced_param_shapes,
)
from lamp_jax.models.llama.modeling import LlamaConfig, init_params

PREFIX = "model"
LM_HEAD = "lm_head.weight"

_DECODER_TABLE: tuple[Row, ...] = (
    ("embeddings/embed_tokens/embedding", "embed_tokens.weight", COPY),
    ("layer_{i}/attn_norm/scale", "layers.{i}.input_layernorm.weight", COPY),
    ("layer_{i}/attention/query/kernel", "layers.{i}.self_attn.q_proj.weight", LINEAR),
    ("layer_{i}/attention/query/bias", "layers.{i}.self_attn.q_proj.bias", COPY),
    ("layer_{i}/attention/key/kernel", "layers.{i}.self_attn.k_proj.weight", LINEAR),
    ("layer_{i}/attention/key/bias", "layers.{i}.self_attn.k_proj.bias", COPY),
    ("layer_{i}/attention/value/kernel", "layers.{i}.self_attn.v_proj.weight", LINEAR),
    ("layer_{i}/attention/value/bias", "layers.{i}.self_attn.v_proj.bias", COPY),
    ("layer_{i}/attention/output/kernel", "layers.{i}.self_attn.o_proj.weight", LINEAR),
    ("layer_{i}/attention/output/bias", "layers.{i}.self_attn.o_proj.bias", COPY),
    ("layer_{i}/attention/query_norm/scale", "layers.{i}.self_attn.q_norm.weight", COPY),
    ("layer_{i}/attention/key_norm/scale", "layers.{i}.self_attn.k_norm.weight", COPY),
    ("layer_{i}/mlp_norm/scale", "layers.{i}.post_attention_layernorm.weight", COPY),
    ("layer_{i}/ffn_gate/kernel", "layers.{i}.mlp.gate_proj.weight", LINEAR),
    ("layer_{i}/ffn_gate/bias", "layers.{i}.mlp.gate_proj.bias", COPY),
    ("layer_{i}/ffn_in/kernel", "layers.{i}.mlp.up_proj.weight", LINEAR),
    ("layer_{i}/ffn_in/bias", "layers.{i}.mlp.up_proj.bias", COPY),
    ("layer_{i}/ffn_out/kernel", "layers.{i}.mlp.down_proj.weight", LINEAR),
    ("layer_{i}/ffn_out/bias", "layers.{i}.mlp.down_proj.bias", COPY),
    ("final_norm/scale", "norm.weight", COPY),
)

# The tokenizer class transformers' AutoTokenizer gives a checkpoint whose tokenizer_config.json
# and config.json name none (its TOKENIZER_MAPPING_NAMES). It has none for llama, whose
# checkpoints name theirs (LlamaTokenizer, PreTrainedTokenizerFast, GPT2Tokenizer, ...); one that
# does not gets TokenizersBackend.
TOKENIZER_CLASSES = {"qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer"}


def param_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter the Flax model for ``config`` has."""
    return dict(traced_param_shapes(init_params, config))


def key_table(config: LlamaConfig) -> KeyTable:
    """The rows of the parameters ``config``'s model has, in the table's order."""
    shapes = param_shapes(config)
    rows = layer_rows(_DECODER_TABLE, (), PREFIX, config.num_layers, config.tie_word_embeddings,
                      LM_HEAD, decoder_path="lm_head/kernel")
    return KeyTable(rows=tuple(row for row in rows if row[0] in shapes), shapes=shapes,
                    prefix=PREFIX, decoder_weight=LM_HEAD, decoder_bias=None,
                    ignorable=(r".*\.rotary_emb\.inv_freq$",))
