"""All R x R (mask of relation a, prompts of relation b) evaluations in one jitted pass."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.evaluation import batch_rank_stats
from lamp_jax.masks import MaskMode
from lamp_jax.models.bert import ModelConfig
from lamp_jax.parallel import map_relations


@partial(jax.jit, static_argnames=("model_config", "mode", "mask_chunk"))
def _cross_hits(mask_logits, frozen_params, batch, *, model_config, mode, mask_chunk):
    num = batch["input_ids"].shape[0]

    def with_mask(g_a):
        # Relation a's mask on every relation's prompts: broadcast a's logits along R.
        borrowed = jax.tree.map(lambda g: jnp.broadcast_to(g, (num, *g.shape)), g_a)
        stats = batch_rank_stats(borrowed, frozen_params, batch, model_config=model_config,
                                 mode=mode, ks=(1,))
        return stats["hits"][:, 0], stats["count"]

    return map_relations(with_mask, mask_chunk)(mask_logits)


def specialization_matrix_batched(
    mask_logits: Any,
    frozen_params: Any,
    batches: Sequence[dict[str, np.ndarray]],
    model_config: ModelConfig,
    mode: MaskMode,
    mask_chunk: int | None = None,
) -> np.ndarray:
    """``M[a, b]`` = P@1 of relation a's subnetwork on relation b's prompts (NaN: no prompts).

    One jitted call per batch evaluates all R x R pairs (vmap over masks of the vmap over
    relations); ``mask_chunk`` evaluates that many masks at a time when memory is short.
    """
    hits = count = 0.0
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k != "index"}
        h, c = _cross_hits(mask_logits, frozen_params, arrays, model_config=model_config,
                           mode=mode, mask_chunk=mask_chunk)
        hits, count = hits + np.asarray(h), count + np.asarray(c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / count


def summarize(matrix: np.ndarray, full_p_at_1: np.ndarray) -> dict[str, float]:
    """The paper's summary: own subnetwork vs other relations' vs the full model (macro)."""
    num = len(matrix)
    off = matrix[~np.eye(num, dtype=bool)].reshape(num, num - 1) if num > 1 else matrix[:, :0]
    return {"own_mask_macro_P@1": float(np.nanmean(np.diag(matrix))),
            "other_masks_macro_P@1": float(np.nanmean(off)) if off.size else float("nan"),
            "full_model_macro_P@1": float(np.nanmean(full_p_at_1))}
