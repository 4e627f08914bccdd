"""BERT, RoBERTa and DistilBERT parameters drawn as transformers initialises a fresh model."""

from __future__ import annotations

from typing import Any

import jax

from lamp_jax.models.bert.modeling import BertConfig
from lamp_jax.models.bert.params import param_shapes
from lamp_jax.models.initializers import Draw, draw_params, norm_or_bias, normal


def init_like_transformers(config: BertConfig, rng: jax.Array) -> Any:
    """Random params distributed as transformers 5 initialises a fresh ``BertForMaskedLM`` /
    ``RobertaForMaskedLM`` / ``DistilBertForMaskedLM`` (``PreTrainedModel._init_weights`` and
    the families' overrides), with ``std = config.initializer_range`` (0.02 when 0):

    * every ``nn.Linear`` weight (attention, FFN, the head's transform, an untied decoder):
      ``normal(0, std)``, its bias zero;
    * every ``nn.Embedding``: ``normal(0, std)`` with its ``padding_idx`` row zero: the word
      embeddings' ``pad_token_id`` row, and for RoBERTa also the position embeddings' (whose
      ``padding_idx`` is ``pad_token_id`` too); token-type embeddings have none;
    * every LayerNorm: weight one, bias zero; the MLM head's bias zero.

    DistilBERT's ``sinusoidal_pos_embds`` is not modelled (its checkpoints learn positions).
    A tied decoder is the word embeddings. The same ``rng`` gives the same params.
    """
    std = config.initializer_range or 0.02
    pad = config.pad_token_id
    padded = {"embeddings/word_embeddings/embedding"}
    if config.family == "roberta":
        padded.add("embeddings/position_embeddings/embedding")

    def rule(path: str) -> Draw:
        if path in padded:
            return normal(std, zero_rows=(pad,))
        if path.endswith(("/embedding", "/kernel")):
            return normal(std)
        return norm_or_bias(path)

    return draw_params(param_shapes(config), rule, rng)
