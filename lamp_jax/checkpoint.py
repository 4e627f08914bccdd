"""Orbax checkpoints of the training state, the best masks, and bit-packed binary mask export.

Layout of a run directory (``workdir``)::

    checkpoints/<step>/   latest TrainState + run metadata (resume from here)
    best/<step>/          mask logits with the best dev score so far (+ the score)
    run.json              everything needed to rebuild the model and masks (see lamp_jax.api)
    masks.npz             bit-packed hard masks of the best logits, one bit per weight
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lamp_jax.masks import MATRICES, MaskSpec, hard_mask, insert_path, iter_masks
from lamp_jax.training import TrainState


def _to_saveable(state: TrainState) -> dict[str, Any]:
    # Typed PRNG keys are stored as their raw key data.
    return {"mask_logits": state.mask_logits, "opt_state": state.opt_state,
            "relation_steps": state.relation_steps, "total_steps": state.total_steps,
            "step": state.step, "rng": jax.random.key_data(state.rng)}


class RunCheckpoints:
    """Latest state (for resuming) and best masks (for reporting) of one run."""

    def __init__(self, workdir: str | Path, keep: int = 2):
        self.workdir = Path(workdir).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.latest = ocp.CheckpointManager(self.workdir / "checkpoints", options=options)
        best_options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["score"], best_mode="max")
        self.best = ocp.CheckpointManager(self.workdir / "best", options=best_options)

    def save(self, state: TrainState) -> None:
        step = int(state.step)
        if step in self.latest.all_steps():
            return
        self.latest.save(step, args=ocp.args.StandardSave(_to_saveable(state)))

    def restore_latest(self, template: TrainState) -> TrainState | None:
        """The latest saved state laid out (shapes, dtypes, shardings) like ``template``."""
        step = self.latest.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        raw = self.latest.restore(step, args=ocp.args.StandardRestore(abstract))
        return template.replace(
            mask_logits=raw["mask_logits"], opt_state=raw["opt_state"],
            relation_steps=raw["relation_steps"], total_steps=raw["total_steps"],
            step=raw["step"], rng=jax.random.wrap_key_data(raw["rng"]))

    def save_best(self, step: int, mask_logits: Any, score: float) -> bool:
        """Saves when ``score`` beats every earlier one; returns whether it did."""
        best = self.best_score()
        if best is not None and score <= best:
            return False
        self.best.save(step, args=ocp.args.StandardSave({"mask_logits": mask_logits}),
                       metrics={"score": float(score)}, force=True)
        self.best.wait_until_finished()
        (self.workdir / "best_score.json").write_text(json.dumps({"step": step, "score": score}))
        return True

    def best_score(self) -> float | None:
        path = self.workdir / "best_score.json"
        return json.loads(path.read_text())["score"] if path.exists() else None

    def restore_best(self, template_logits: Any | None = None) -> Any:
        return restore_best_masks(self.workdir, template_logits)

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_best_masks(workdir: str | Path, template_logits: Any | None = None) -> Any:
    """The best mask logits of a run, as numpy arrays (or laid out like ``template_logits``)."""
    directory = Path(workdir).absolute() / "best"
    with ocp.CheckpointManager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no best masks saved under {directory}")
        if template_logits is None:
            raw = manager.restore(step, args=ocp.args.StandardRestore())
        else:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                    {"mask_logits": template_logits})
            raw = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return raw["mask_logits"]


def export_binary_masks(
    path: str | Path,
    mask_logits: Any,
    spec: MaskSpec,
    relations: tuple[str, ...],
    threshold: float = 0.5,
) -> Path:
    """Writes the hard masks with one bit per weight (``np.packbits``): 32x smaller than logits.

    The file holds, per masked matrix ``layer_<i>/<matrix>``, the packed bits of ``[R, in, out]``
    and its shape, plus the relation names, layers, matrices and threshold.
    """
    arrays: dict[str, np.ndarray] = {}
    for i, m, leaf in iter_masks(mask_logits, spec):
        bits = np.asarray(jax.device_get(hard_mask(leaf, threshold))).astype(bool)
        arrays[f"layer_{i}/{m}"] = np.packbits(bits.reshape(-1))
        arrays[f"layer_{i}/{m}.shape"] = np.asarray(bits.shape)
    meta = {"relations": list(relations), "layers": list(spec.layers),
            "matrices": list(spec.matrices), "threshold": threshold}
    path = Path(path)
    np.savez_compressed(path, __meta__=np.asarray(json.dumps(meta)), **arrays)
    return path


def load_binary_masks(path: str | Path) -> tuple[dict[str, Any], MaskSpec, tuple[str, ...]]:
    """Inverse of :func:`export_binary_masks`: ``(0/1 float32 masks [R, ...], spec, relations)``.

    The tree has the mask-logit layout; ``multiply_masks(params, tree_r)`` applies relation r's.
    """
    with np.load(path) as data:
        meta = json.loads(str(data["__meta__"]))
        spec = MaskSpec(tuple(meta["layers"]), tuple(meta["matrices"]))
        tree: dict[str, Any] = {}
        for i in spec.layers:
            for m in spec.matrices:
                shape = tuple(int(s) for s in data[f"layer_{i}/{m}.shape"])
                bits = np.unpackbits(data[f"layer_{i}/{m}"], count=int(np.prod(shape)))
                mask = bits.reshape(shape).astype(np.float32)
                insert_path(tree, (f"layer_{i}", *MATRICES[m]), mask)
    return tree, spec, tuple(meta["relations"])
