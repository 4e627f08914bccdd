"""Figures of a run: P@1 per relation, sparsity per layer and matrix, specialization heat map.

Each function takes plain arrays and returns a matplotlib Figure (usable in a notebook);
:func:`write_run_plots` saves the standard set as PNGs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import matplotlib

# Headless by default (scripts write PNGs); a Jupyter kernel keeps its inline backend, so the
# figures these functions return show up in the notebook.
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from lamp_jax.masks import MaskSpec  # noqa: E402
from lamp_jax.paths import as_path, save_figure  # noqa: E402
from lamp_jax.ranking import RankingResult  # noqa: E402


def p_at_1_per_relation(relations: Sequence[str], full: RankingResult, pruned: RankingResult):
    """Grouped bars: full model vs the relation's own subnetwork."""
    x = np.arange(len(relations))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(relations) + 2), 3.5))
    ax.bar(x - 0.2, full.precision_at(1), 0.4, label=f"full model (macro {full.macro(1):.2f})")
    ax.bar(x + 0.2, pruned.precision_at(1), 0.4,
           label=f"relation subnetwork (macro {pruned.macro(1):.2f})")
    ax.set_xticks(x, relations, rotation=45, ha="right")
    ax.set_ylabel("test P@1")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def sparsity_heatmap(relations: Sequence[str], sparsity: Mapping[str, np.ndarray],
                     spec: MaskSpec):
    """Rows: relations; columns: masked matrices grouped by layer; colour: fraction pruned."""
    columns = [f"layer_{i}/{m}" for i in spec.layers for m in spec.matrices]
    values = np.stack([np.asarray(sparsity[c]) for c in columns], axis=1)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(columns) + 3),
                                    max(3, 0.3 * len(relations) + 1.5)))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), [c.replace("layer_", "L") for c in columns], rotation=90,
                  fontsize=7)
    ax.set_yticks(range(len(relations)), relations, fontsize=8)
    fig.colorbar(image, ax=ax, label="fraction of weights pruned")
    fig.tight_layout()
    return fig


def specialization_heatmap(relations: Sequence[str], matrix: np.ndarray):
    """``matrix[a, b]``: P@1 on relation b's prompts with relation a's subnetwork."""
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(relations) + 2),) * 2)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(relations)), relations, rotation=90, fontsize=8)
    ax.set_yticks(range(len(relations)), relations, fontsize=8)
    ax.set_xlabel("prompts of relation")
    ax.set_ylabel("subnetwork (mask) of relation")
    fig.colorbar(image, ax=ax, label="test P@1")
    fig.tight_layout()
    return fig


def write_run_plots(directory: str | os.PathLike, relations, full, pruned, sparsity, spec,
                    specialization: np.ndarray | None = None) -> list[epath.Path]:
    """Saves the standard figures as PNGs into ``directory`` (a local path or a URL)."""
    directory = as_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    figures = {"p_at_1_per_relation": p_at_1_per_relation(relations, full, pruned),
               "sparsity_per_layer": sparsity_heatmap(relations, sparsity, spec)}
    if specialization is not None:
        figures["specialization"] = specialization_heatmap(relations, specialization)
    paths = []
    for name, fig in figures.items():
        path = directory / f"{name}.png"
        save_figure(fig, path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def overlap_heatmap(relations: Sequence[str], matrix: np.ndarray,
                    label: str = "Jaccard overlap of pruned weights", vmax: float | None = 1.0):
    """``matrix[a, b]``: how much relation a's and relation b's masks overlap
    (:func:`lamp_jax.analysis.stability.overlap_between_relations`); ``vmax=None`` scales the
    colours to the data (for ratios to chance)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(relations) + 2),) * 2)
    image = ax.imshow(matrix, vmin=0, vmax=vmax, cmap="viridis")
    ax.set_xticks(range(len(relations)), relations, rotation=90, fontsize=8)
    ax.set_yticks(range(len(relations)), relations, fontsize=8)
    ax.set_xlabel("mask of relation")
    ax.set_ylabel("mask of relation")
    fig.colorbar(image, ax=ax, label=label)
    fig.tight_layout()
    return fig
