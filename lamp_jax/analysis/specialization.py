"""The paper's summary of a specialization matrix (computed by
:func:`lamp_jax.ranking.specialization_matrix`)."""

from __future__ import annotations

import numpy as np


def summarize(matrix: np.ndarray, full_p_at_1: np.ndarray) -> dict[str, float]:
    """Own subnetwork vs other relations' vs the full model (macro P@1)."""
    num = len(matrix)
    off = matrix[~np.eye(num, dtype=bool)].reshape(num, num - 1) if num > 1 else matrix[:, :0]
    return {"own_mask_macro_P@1": float(np.nanmean(np.diag(matrix))),
            "other_masks_macro_P@1": float(np.nanmean(off)) if off.size else float("nan"),
            "full_model_macro_P@1": float(np.nanmean(full_p_at_1))}
