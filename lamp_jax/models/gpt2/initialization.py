"""GPT-2's parameters drawn as transformers initialises a fresh ``GPT2LMHeadModel``."""

from __future__ import annotations

import math
from typing import Any

import jax

from lamp_jax.models.gpt2.modeling import GPT2Config
from lamp_jax.models.gpt2.params import param_shapes
from lamp_jax.models.initializers import Draw, draw_params, norm_or_bias, normal

# The residual projections: transformers redraws their Conv1D weights at a smaller scale.
_RESIDUAL_OUT = ("attention/output/kernel", "ffn_out/kernel")


def init_like_transformers(config: GPT2Config, rng: jax.Array) -> Any:
    """Random params distributed as ``GPT2PreTrainedModel._init_weights`` (transformers 5)
    draws them, with ``std = config.initializer_range``:

    * ``wte``, ``wpe`` (``nn.Embedding``, no padding index) and an untied ``lm_head``
      (``nn.Linear``): ``normal(0, std)`` (``PreTrainedModel._init_weights``);
    * every ``Conv1D`` weight: ``normal(0, std)``, its bias zero;
    * ``attn.c_proj`` and ``mlp.c_proj`` then again at ``std / sqrt(2 * n_layer)`` (GPT-2's
      scaled init of the residual layers);
    * every LayerNorm: weight one, bias zero.

    The same ``rng`` gives the same params.
    """
    std = config.initializer_range
    residual_std = std / math.sqrt(2 * config.num_layers)

    def rule(path: str) -> Draw:
        if path.endswith(_RESIDUAL_OUT):
            return normal(residual_std)
        if path.endswith(("/embedding", "/kernel")):
            return normal(std)
        return norm_or_bias(path)

    return draw_params(param_shapes(config), rule, rng)
