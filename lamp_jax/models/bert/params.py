"""BERT, RoBERTa and DistilBERT checkpoints: which transformers tensor each of our params is.

One encoder table for BERT and RoBERTa (same module names), one for DistilBERT, and each
variant's MLM head; rows are ``(our path, Hugging Face key, layout)`` with ``{i}`` the layer
index and the encoder's keys written without their ``bert.`` / ``roberta.`` / ``distilbert.``
prefix (``lamp_jax.models.checkpoint_keys``).
"""

from __future__ import annotations

from typing import NamedTuple

from lamp_jax.models.bert.modeling import BertConfig
from lamp_jax.models.checkpoint_keys import COPY, LINEAR, KeyTable, Row, layer_rows

_BERT_LIKE_TABLE: tuple[Row, ...] = (
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

_DISTILBERT_TABLE: tuple[Row, ...] = (
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


def _head(transform: str, norm: str, bias: str) -> tuple[Row, ...]:
    return (
        ("mlm_head/transform/kernel", f"{transform}.weight", LINEAR),
        ("mlm_head/transform/bias", f"{transform}.bias", COPY),
        ("mlm_head/layer_norm/scale", f"{norm}.weight", COPY),
        ("mlm_head/layer_norm/bias", f"{norm}.bias", COPY),
        ("mlm_head/bias", bias, COPY),
    )


class _Variant(NamedTuple):
    prefix: str  # of the encoder's keys
    encoder: tuple[Row, ...]
    head: tuple[Row, ...]
    decoder_weight: str
    decoder_bias: str | None
    ignorable: tuple[str, ...]  # regexes of tensors we knowingly do not use


_VARIANTS = {
    "bert": _Variant(
        "bert", _BERT_LIKE_TABLE,
        _head("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
              "cls.predictions.bias"),
        decoder_weight="cls.predictions.decoder.weight",
        decoder_bias="cls.predictions.decoder.bias",
        # Pre-training checkpoints (bert-base-uncased) also carry the pooler and the NSP head.
        ignorable=(r".*position_ids$", r"^bert\.pooler\.", r"^cls\.seq_relationship\.")),
    "roberta": _Variant(
        "roberta", _BERT_LIKE_TABLE, _head("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
        decoder_weight="lm_head.decoder.weight", decoder_bias="lm_head.decoder.bias",
        ignorable=(r".*position_ids$", r"^roberta\.pooler\.")),
    "distilbert": _Variant(
        "distilbert", _DISTILBERT_TABLE,
        _head("vocab_transform", "vocab_layer_norm", "vocab_projector.bias"),
        decoder_weight="vocab_projector.weight", decoder_bias=None,
        ignorable=(r".*position_ids$",)),
}

# TF-converted BERT checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_RENAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"),
                   (r"LayerNorm\.beta$", "LayerNorm.bias"))

# The tokenizer class transformers' AutoTokenizer gives each model type's checkpoint when
# neither tokenizer_config.json nor config.json names one (its TOKENIZER_MAPPING_NAMES).
TOKENIZER_CLASSES = {"bert": "BertTokenizer", "roberta": "RobertaTokenizer",
                     "xlm-roberta": "XLMRobertaTokenizer", "camembert": "CamembertTokenizer",
                     "distilbert": "BertTokenizer"}


def param_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ours, derived from the config alone (no initialisation)."""
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
    norm_shape = (h,)  # every other parameter is a LayerNorm's scale or bias
    return {ours: shapes.get(ours, norm_shape) for ours, _, _ in _rows(config)}


def _rows(config: BertConfig) -> list[Row]:
    variant = _VARIANTS[config.family]
    encoder = variant.encoder
    if not config.type_vocab_size:  # no token-type embeddings (DistilBERT's table has none)
        encoder = tuple(row for row in encoder if "token_type" not in row[0])
    return layer_rows(encoder, variant.head, variant.prefix, config.num_layers,
                      config.tie_word_embeddings, variant.decoder_weight)


def key_table(config: BertConfig) -> KeyTable:
    """The key table of ``config``'s variant, made concrete for its layers and switches."""
    variant = _VARIANTS[config.family]
    return KeyTable(rows=tuple(_rows(config)), shapes=param_shapes(config),
                    prefix=variant.prefix, decoder_weight=variant.decoder_weight,
                    decoder_bias=variant.decoder_bias, ignorable=variant.ignorable,
                    renames=_LEGACY_RENAMES)
