"""Notebook-facing access to a finished (or running) training run.

    from lamp_jax.api import load_run
    run = load_run("runs/default")
    run.predict("You are likely to find a fork in the [MASK].", relation="AtLocation")
    run.sparsity()["total"]                  # fraction pruned, per relation
    params = run.masked_params("AtLocation") # a plain params pytree for mlm_forward
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.checkpoint import restore_best_masks
from lamp_jax.masks import MaskMode, MaskSpec, apply_masks, sparsity_stats
from lamp_jax.models.bert import mlm_forward
from lamp_jax.models.params import LoadedMLM, load_mlm
from lamp_jax.trainer import DTYPES


@dataclasses.dataclass
class Run:
    """A trained run: the frozen model, the best mask logits ``[R, ...]`` and how to use them."""

    workdir: Path
    mlm: LoadedMLM
    relations: tuple[str, ...]
    spec: MaskSpec
    mode: MaskMode  # the inference mode (threshold or expectation)
    mask_logits: Any
    metrics: dict[str, Any] | None

    def relation_index(self, relation: str) -> int:
        if relation not in self.relations:
            raise KeyError(f"unknown relation {relation!r}; this run has {list(self.relations)}")
        return self.relations.index(relation)

    def masked_params(self, relation: str, kind: str | None = None) -> Any:
        """The model's params with ``relation``'s subnetwork applied (``kind``: threshold or
        expectation; default the run's inference mode)."""
        r = self.relation_index(relation)
        mode = self.mode if kind is None else self.mode.for_inference(kind)
        logits_r = jax.tree.map(lambda g: jnp.asarray(g[r]), self.mask_logits)
        return apply_masks(self.mlm.params, logits_r, mode)

    def predict(self, prompt: str, relation: str | None = None, k: int = 5,
                kind: str | None = None) -> list[tuple[str, float]]:
        """Top-k tokens and probabilities at the prompt's ``[MASK]`` (write ``[MASK]`` for any
        tokenizer). ``relation=None`` uses the full, unpruned model."""
        tokenizer = self.mlm.tokenizer
        text = prompt.replace("[MASK]", tokenizer.mask_token)
        encoded = tokenizer([text], return_tensors="np")
        positions = np.flatnonzero(encoded["input_ids"][0] == tokenizer.mask_token_id)
        if len(positions) != 1:
            raise ValueError(f"the prompt must contain exactly one [MASK]: {prompt!r}")
        params = self.mlm.params if relation is None else self.masked_params(relation, kind)
        logits = mlm_forward(params, encoded["input_ids"], encoded["attention_mask"],
                             config=self.mlm.config, output_positions=positions[:1],
                             dtype=self.mlm.dtype)["logits"][0]
        probs = jax.nn.softmax(logits)
        top = np.argsort(-np.asarray(probs))[:k]
        return [(tokenizer.convert_ids_to_tokens(int(t)), float(probs[t])) for t in top]

    def sparsity(self) -> dict[str, np.ndarray]:
        """Fraction of pruned weights per ``layer_<i>/<matrix>`` and ``total``, each ``[R]``."""
        return sparsity_stats(self.mask_logits, self.spec, self.mode.threshold)


def load_run(workdir: str | Path, model: str | None = None) -> Run:
    """Opens a run directory written by ``train.py``. ``model`` overrides where the frozen
    model is loaded from (e.g. a local copy of the hub checkpoint on an offline machine)."""
    workdir = Path(workdir)
    path = workdir / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} is not a lamp-jax run directory (no run.json)")
    info = json.loads(path.read_text())
    mlm = load_mlm(model or info["model"], dtype=DTYPES[info.get("dtype", "float32")])
    mask = info["mask"]
    spec = MaskSpec(tuple(mask["layers"]), tuple(mask["matrices"]))
    mode = MaskMode(mask["eval_kind"], tau=mask["tau"], threshold=mask["threshold"],
                    ste_grad=mask["ste_grad"])
    metrics_path = workdir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    return Run(workdir, mlm, tuple(info["relations"]), spec, mode,
               restore_best_masks(workdir), metrics)
