"""Llama, Qwen2 and Qwen3 parameters drawn as transformers initialises a fresh model."""

from __future__ import annotations

from typing import Any

import jax

from lamp_jax.models.initializers import Draw, draw_params, norm_or_bias, normal
from lamp_jax.models.llama.modeling import LlamaConfig
from lamp_jax.models.llama.params import param_shapes


def init_like_transformers(config: LlamaConfig, rng: jax.Array) -> Any:
    """Random params distributed as transformers 5 initialises a fresh ``LlamaForCausalLM`` /
    ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM``, none of which overrides
    ``PreTrainedModel._init_weights``; with ``std = config.initializer_range`` (0.02 when 0):

    * ``embed_tokens`` (``nn.Embedding`` with ``padding_idx = pad_token_id``):
      ``normal(0, std)``, the ``pad_token_id`` row zero;
    * every ``nn.Linear`` weight (q/k/v/o, gate/up/down, an untied ``lm_head``):
      ``normal(0, std)``; their biases zero;
    * every RMSNorm weight (Qwen3's q/k norms included): one.

    A tied ``lm_head`` is the embedding, its padding row zero too. The same ``rng`` gives the
    same params.
    """
    std = config.initializer_range or 0.02

    def rule(path: str) -> Draw:
        if path == "embeddings/embed_tokens/embedding":
            return normal(std, zero_rows=(config.pad_token_id,))
        if path.endswith("/kernel"):
            return normal(std)
        return norm_or_bias(path)

    return draw_params(param_shapes(config), rule, rng)
