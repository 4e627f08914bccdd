"""ModernBERT checkpoints (``ModernBertForMaskedLM``): which transformers tensor each of our
params is.

Rows are ``(our path, Hugging Face key, layout)`` with ``{i}`` the layer index and the
encoder's keys written without their ``model.`` prefix (``lamp_jax.models.checkpoint_keys``).
A row applies only where the model has that parameter: the biases follow ``norm_bias`` /
``attention_bias`` / ``mlp_bias`` / ``classifier_bias`` / ``decoder_bias`` and layer 0 has no
``attn_norm``, all of which the Flax model decides (:func:`param_shapes`); the table only names
them.
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
from lamp_jax.models.modernbert.modeling import ModernBertConfig, init_params

PREFIX = "model"

_ENCODER_TABLE: tuple[Row, ...] = (
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

_HEAD_TABLE: tuple[Row, ...] = (
    ("mlm_head/transform/kernel", "head.dense.weight", LINEAR),
    ("mlm_head/transform/bias", "head.dense.bias", COPY),
    ("mlm_head/layer_norm/scale", "head.norm.weight", COPY),
    ("mlm_head/layer_norm/bias", "head.norm.bias", COPY),
    ("mlm_head/bias", "decoder.bias", COPY),  # the decoder's own bias is the head bias
)

DECODER_WEIGHT = "decoder.weight"

# The tokenizer class transformers' AutoTokenizer gives a checkpoint whose tokenizer_config.json
# and config.json name none (its TOKENIZER_MAPPING_NAMES).
TOKENIZER_CLASSES = {"modernbert": "TokenizersBackend"}


def param_shapes(config: ModernBertConfig) -> dict[str, tuple[int, ...]]:
    """``{path: shape}`` of every parameter the Flax model for ``config`` has."""
    return dict(traced_param_shapes(init_params, config))


def key_table(config: ModernBertConfig) -> KeyTable:
    """The rows of the parameters ``config``'s model has, in the table's order."""
    shapes = param_shapes(config)
    rows = layer_rows(_ENCODER_TABLE, _HEAD_TABLE, PREFIX, config.num_layers,
                      config.tie_word_embeddings, DECODER_WEIGHT)
    return KeyTable(rows=tuple(row for row in rows if row[0] in shapes), shapes=shapes,
                    prefix=PREFIX, decoder_weight=DECODER_WEIGHT, decoder_bias=None)
