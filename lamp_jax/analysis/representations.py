"""What the subnetworks change inside the model: [MASK] states and last-layer attention.

The 2-D picture is a PCA projection (numpy SVD; t-SNE/UMAP would need a new dependency), and
it comes with a number that does not depend on the projection: the silhouette score of the
relation labels in the full-dimensional [MASK] states (1 = relations perfectly separated,
0 = mixed).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.masks import MaskMode, apply_masks
from lamp_jax.models import mlm_forward


def silhouette_score(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987) with Euclidean distances; labels need >= 2 clusters."""
    points = np.asarray(points, np.float64)
    dist = np.sqrt(np.maximum(((points[:, None] - points[None]) ** 2).sum(-1), 0.0))
    scores = []
    for i, label in enumerate(labels):
        same = labels == label
        if same.sum() < 2:
            scores.append(0.0)
            continue
        a = dist[i, same].sum() / (same.sum() - 1)
        b = min(dist[i, labels == other].mean() for other in np.unique(labels) if other != label)
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def pca_2d(points: np.ndarray) -> np.ndarray:
    centered = np.asarray(points, np.float64) - np.mean(points, axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T


def answer_positions(batch: dict[str, np.ndarray]) -> np.ndarray:
    """``[R, B]`` where each prompt's answer is predicted: its [MASK] (the first of an answer's
    masks), or for a causal LM the last token before the answer."""
    positions = batch["mask_pos"] if "mask_pos" in batch else batch["positions"]
    return positions if positions.ndim == 2 else positions[..., 0]


def mask_states(mlm: Any, batch: dict[str, np.ndarray], mask_logits: Any | None,
                mode: MaskMode) -> tuple[np.ndarray, np.ndarray]:
    """Last-layer [MASK] states ``[R, B, H]`` and [MASK]'s last-layer attention (head mean)
    ``[R, B, L]`` (for answers of several tokens, at the first of them; for a causal LM at the
    token before the answer); with ``mask_logits`` each relation's prompts use that relation's
    subnetwork."""
    arrays = {k: jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask")}
    arrays["position"] = jnp.asarray(answer_positions(batch))
    states, attention = _states(mlm.params, mask_logits, arrays, config=mlm.config,
                                dtype=mlm.dtype, mode=mode)
    return np.asarray(states), np.asarray(attention)


@partial(jax.jit, static_argnames=("config", "dtype", "mode"))
def _states(params: Any, mask_logits: Any | None, arrays: dict[str, jax.Array], *, config: Any,
            dtype: Any, mode: MaskMode) -> tuple[jax.Array, jax.Array]:
    """:func:`mask_states` in one program (op by op, the forward passes of a report's
    representation section took 8 of its 45 s on the embedded run)."""

    def one(g, b):
        masked = params if g is None else apply_masks(params, g, mode)
        out = mlm_forward(masked, b["input_ids"], b["attention_mask"], config=config,
                          output_hidden_states=True, output_attentions=True, dtype=dtype)
        rows = jnp.arange(b["input_ids"].shape[0])
        state = out["hidden_states"][-1][rows, b["position"]]
        attention = out["attentions"][-1].mean(axis=1)[rows, b["position"]]
        return state, attention

    if mask_logits is None:
        return jax.vmap(lambda b: one(None, b))(arrays)
    return jax.vmap(one)(mask_logits, arrays)
