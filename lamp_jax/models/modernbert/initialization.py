"""ModernBERT's parameters drawn as transformers initialises a fresh ``ModernBertForMaskedLM``."""

from __future__ import annotations

import math
from typing import Any

import jax

from lamp_jax.models.initializers import Draw, draw_params, norm_or_bias, truncated_normal
from lamp_jax.models.modernbert.modeling import ModernBertConfig
from lamp_jax.models.modernbert.params import param_shapes

# The matrices transformers draws at the "out" std: the ones writing into the residual stream,
# the head's dense and the untied decoder.
_OUT = ("attention/output/kernel", "ffn_out/kernel", "mlm_head/transform/kernel",
        "mlm_head/decoder/kernel")


def init_like_transformers(config: ModernBertConfig, rng: jax.Array) -> Any:
    """Random params distributed as ``ModernBertPreTrainedModel._init_weights`` (transformers 5)
    draws them: truncated normals ``trunc_normal_(0, std, -c * std, c * std)`` with
    ``c = initializer_cutoff_factor`` (3 when None) and per-module stds, ``r =
    initializer_range``:

    * ``tok_embeddings``, ``Wqkv``, ``mlp.Wi``: std ``r`` (the "embedding" and "in" stds); the
      embeddings' padding row is drawn too (the truncated normal overwrites the zero row of
      ``nn.Embedding``'s own init);
    * ``attn.Wo``, ``mlp.Wo``, ``head.dense`` and an untied ``decoder``: std
      ``r / sqrt(2 * num_hidden_layers)`` (the "out" std);
    * every linear bias and the decoder's bias zero; every LayerNorm weight one, bias zero.

    A tied decoder is the token embeddings. The same ``rng`` gives the same params.
    """
    std = config.initializer_range
    out_std = std / math.sqrt(2.0 * config.num_layers)
    cutoff = 3.0 if config.initializer_cutoff_factor is None else config.initializer_cutoff_factor

    def rule(path: str) -> Draw:
        if path.endswith(_OUT):
            return truncated_normal(out_std, cutoff)
        if path.endswith(("/embedding", "/kernel")):
            return truncated_normal(std, cutoff)
        return norm_or_bias(path)

    return draw_params(param_shapes(config), rule, rng)
