"""Orbax checkpoints of the training state and the best masks, and bit-packed mask export.

What they are in a run directory (``workdir``; :mod:`lamp_jax.run_dir` owns its layout)::

    checkpoints/<step>/   latest TrainState (resume from here)
    best/<step>/          mask logits with the best dev score so far (+ the score)
    masks.npz             bit-packed hard masks of the best logits, one bit per weight

Checkpoints open on any topology. Per-relation arrays are saved with the relation axis the
saving mesh had, inert slots included (:func:`lamp_jax.placement.relation_slots`; they always
come last). A restore names the shapes and shardings it wants: the reading process's own
devices (1 in a notebook, 8 on a host, several processes), the relation axis truncated or
zero-padded to its own slot count (inert slots hold nothing worth keeping). Nothing refers to
the devices that saved it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from lamp_jax.hosts import is_main, to_host, write_text
from lamp_jax.masks import MATRIX_PATHS, MaskSpec, hard_mask, insert_path, iter_masks
from lamp_jax.paths import absolute, as_path, load_npz, save_npz, storage_write
from lamp_jax.step import TrainState

# Gigabytes Orbax serialises at once. Each array in flight costs a host copy (compression
# buffers) until written: 8 random float32 arrays of 0.4 GB took +2.15 GB of RSS to save with
# Orbax's default (96) and +0.70 GB with 1, and saved faster (13.9 -> 10.5 s). bert-base x 16
# relations (8.2 GB of state) ran out of memory in its first save with the default.
CONCURRENT_GB = 1
T = TypeVar("T")


def _handler() -> ocp.PyTreeCheckpointHandler:
    # Uncompressed. Mask logits and Adam moments are float32 noise to zstd (a 12-run sweep
    # group's state: 402 MB compressed, 433 MB not), and compressing them cost more than the
    # rest of a save: that group trained in 133 s saving with zstd, 110 s without it, and 109 s
    # saving nothing. Checkpoints written compressed by earlier versions still read.
    return ocp.PyTreeCheckpointHandler(save_concurrent_gb=CONCURRENT_GB,
                                       restore_concurrent_gb=CONCURRENT_GB,
                                       use_compression=False)


def _save(tree: Any) -> ocp.args.PyTreeSave:
    return ocp.args.PyTreeSave(tree)


def _restore(target: Any, strict: bool = True) -> ocp.args.PyTreeRestore:
    """Restores into ``target``'s shapes, dtypes and shardings (numpy leaves: on the host);
    ``strict=False`` truncates or zero-pads each array to the target's shape."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    if not strict:
        restore_args = jax.tree.map(
            lambda a: dataclasses.replace(a, strict=False) if hasattr(a, "strict") else a,
            restore_args)
    return ocp.args.PyTreeRestore(item=target, restore_args=restore_args)


def _to_saveable(state: TrainState) -> dict[str, Any]:
    """The state as Orbax stores it: typed PRNG keys as their raw key data. ``state`` may be
    abstract (``jax.ShapeDtypeStruct`` leaves with shardings: a restore target)."""
    rng = state.rng
    if isinstance(rng, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, rng)
        rng = jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding)
    else:
        rng = jax.random.key_data(rng)
    return {"mask_logits": state.mask_logits, "opt_state": state.opt_state,
            "relation_steps": state.relation_steps, "total_steps": state.total_steps,
            "step": state.step, "rng": rng}


class UnreadableCheckpointsError(RuntimeError):
    """A run directory holds checkpoints and none of them can be read."""

    def __init__(self, directory: Any, failures: list[tuple[int, str]]):
        self.directory, self.failures = directory, failures
        lines = "\n".join(f"  step {step}: {reason}" for step, reason in failures)
        super().__init__(
            f"cannot resume: none of the {len(failures)} checkpoint(s) under {directory} can "
            f"be read, and nothing was changed:\n{lines}\nIf they may become readable again "
            "(e.g. a bucket that failed for a while), rerun the same command later. To start "
            "this run over, losing them, rerun with "
            "--config.on_unreadable_checkpoints=start_over (deletes this run's checkpoints, "
            "best masks and logs first), or use a fresh --workdir.")


class StateCheckpoints:
    """The latest training states of a run, or of the runs of a sweep group: what a run
    resumes from. ``directory`` is ``<workdir>/checkpoints``."""

    def __init__(self, directory: str | Path, keep: int = 2, background: bool = True):
        """``background``: saves return at once and write while training goes on (after a
        copy of the state to the host); else they write before returning."""
        self.directory = absolute(directory)  # a local path or a URL (lamp_jax.paths)
        # Each manager names its cross-process barriers with its own prefix: the latest state
        # saves in the background while the best masks save, and two barriers of one name in
        # flight at once fail ("Barrier ...set_value_start is already ongoing"; seen with 2
        # processes on a loaded machine).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=background,
                                               multiprocessing_options=_barriers("latest"))
        self.manager = _checkpoint_write(self.directory, lambda: ocp.CheckpointManager(
            self.directory, options=options, item_handlers=_handler()), 0)
        self._pending_bytes = 0  # of a save that may still be writing in the background

    def save(self, state: TrainState, step: int) -> dict[str, float] | None:
        """Saves the state as that of ``step`` (once); returns its bytes and the seconds the
        call took (in the background, the copy to the host; else the whole write). A save that
        fails raises :class:`~lamp_jax.errors.StorageError`: this one, or the one before it,
        which failed in the background."""
        if step in self.manager.all_steps():
            return None
        tree = _to_saveable(state)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
        start = time.perf_counter()
        self.wait()
        _checkpoint_write(self.directory, lambda: self.manager.save(step, args=_save(tree)),
                          nbytes)
        self._pending_bytes = nbytes
        return {"bytes": nbytes, "seconds": time.perf_counter() - start}

    def restore_latest(self, template: TrainState, log=print) -> TrainState | None:
        """The newest readable state, laid out (shapes, dtypes, shardings) like ``template``,
        whatever devices and relation slots the run that saved it had; None when the run has
        no checkpoint yet.

        A checkpoint that cannot be read (truncated or corrupted files) is reported and the next
        older one is tried: resuming from an older step replays deterministically to the same
        result. When checkpoints exist and none can be read, this raises
        :class:`UnreadableCheckpointsError` and changes nothing: silently starting over would
        let the new run's saves push the old checkpoints out. Half-written checkpoints never
        appear here (Orbax commits by atomic rename).
        """
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_saveable(template))
        failures: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                # strict=False: the relation axis is truncated or padded to this run's slots.
                raw = self.manager.restore(step, args=_restore(abstract, strict=False))
            except Exception as err:  # tensorstore/orbax raise many types for damaged files
                reason = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                failures.append((step, reason))
                log(f"warning: checkpoint step {step} under {self.directory} cannot be read "
                    f"({reason}); trying an older one")
                continue
            return template.replace(
                mask_logits=raw["mask_logits"], opt_state=raw["opt_state"],
                relation_steps=raw["relation_steps"], total_steps=raw["total_steps"],
                step=raw["step"], rng=jax.random.wrap_key_data(raw["rng"]))
        if failures:
            raise UnreadableCheckpointsError(self.directory, failures)
        return None

    def wait(self) -> None:
        """Waits for a save in the background; raises StorageError if it failed."""
        _checkpoint_write(self.directory, self.manager.wait_until_finished, self._pending_bytes)
        self._pending_bytes = 0

    def close(self) -> None:
        self.wait()
        self.manager.close()


def _checkpoint_write(directory: Any, write: Callable[[], T], nbytes: int) -> T:
    """A checkpoint save or wait (or a manager that creates its directory) as a write to the
    run's storage (:func:`lamp_jax.paths.storage_write`). Orbax commits a checkpoint by renaming
    its temporary directory (in a bucket: by writing ``commit_success.txt`` last), so a failed
    save leaves nothing that a restore would take for a checkpoint."""
    return storage_write(directory, write, nbytes, failures=(Exception,))


def saved_steps(directory: str | Path) -> list[int]:
    """The steps of the checkpoints under ``directory`` (``<workdir>/checkpoints``) by their
    names, without opening them: what a rerun will try to resume from."""
    directory = absolute(directory)
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def open_state_checkpoints(directory: str | Path, template: TrainState, *, background: bool,
                           on_unreadable: str, start_over: Callable[[], None], log=print
                           ) -> tuple[StateCheckpoints, TrainState | None]:
    """The checkpoints under ``directory`` and the newest state they hold, laid out like
    ``template`` (None: nothing saved yet). When checkpoints exist and none can be read,
    ``on_unreadable`` says what to do: "stop" raises :class:`UnreadableCheckpointsError` and
    changes nothing; "start_over" calls ``start_over()`` (which deletes them and every record
    of the training that made them) and starts from nothing."""
    states = StateCheckpoints(directory, background=background)
    try:
        return states, states.restore_latest(template, log)
    except UnreadableCheckpointsError as err:
        if on_unreadable != "start_over":
            raise
        log(f"warning: {str(err).splitlines()[0]}; starting over, as "
            "config.on_unreadable_checkpoints='start_over' asks")
        states.close()
        start_over()
        return StateCheckpoints(directory, background=background), None


class BestMasks:
    """The mask logits of one run with the best dev score so far, and that score
    (``<workdir>/best/<step>/``; ``best_score.json`` caches the score)."""

    def __init__(self, workdir: str | Path, background: bool = True):
        self.workdir = absolute(workdir)
        self._best: tuple[int, float] | None = None  # (step, score) of the saved best masks
        self._pending: tuple[int, float] | None = None  # a save started but not yet waited for
        self._pending_bytes = 0
        options = ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["score"], best_mode="max",
            enable_async_checkpointing=background,
            # A sweep's runs save at once: barriers of one name in flight together fail.
            multiprocessing_options=_barriers(
                "best_" + hashlib.sha1(str(self.workdir).encode()).hexdigest()[:12]))
        self.manager = _checkpoint_write(self.workdir / "best", lambda: ocp.CheckpointManager(
            self.workdir / "best", options=options, item_handlers=_handler()), 0)

    def beats(self, score: float) -> bool:
        """Whether ``score`` beats every earlier one (what :meth:`save` keeps)."""
        best = self.score()
        return best is None or score > best

    def save(self, step: int, mask_logits: Any, score: float, wait: bool = True) -> bool:
        """Saves when ``score`` beats every earlier one; returns whether it did. ``wait=False``
        returns once the write has started (a sweep starts every run's save, then waits for
        all of them: one at a time, each run's wait was 30 ms of an idle CPU); the next call,
        :meth:`commit` or :meth:`score` waits for it."""
        if not self.beats(score):
            return False
        tree = {"mask_logits": mask_logits, "score": np.float64(score)}
        nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
        _checkpoint_write(self.workdir / "best", lambda: self.manager.save(
            step, args=_save(tree), metrics={"score": float(score)}, force=True), nbytes)
        self._pending, self._pending_bytes = (step, float(score)), nbytes
        if wait:
            self.commit()
        return True

    def commit(self) -> None:
        """Waits for a started save, then caches its score in ``best_score.json``; raises
        StorageError if the save failed."""
        if self._pending is None:
            return
        _checkpoint_write(self.workdir / "best", self.manager.wait_until_finished,
                          self._pending_bytes)
        step, score = self._pending
        self._best, self._pending = self._pending, None
        write_text(self.workdir / "best_score.json", json.dumps({"step": step, "score": score}))

    def score(self) -> float | None:
        """Score of the saved best masks. ``best_score.json`` is a cache: if a kill fell between
        saving the masks and writing it, the score is read back from the checkpoint itself."""
        self.commit()
        step = self.manager.latest_step()
        if step is None:
            return None
        if self._best is not None and self._best[0] == step:
            return self._best[1]
        path = self.workdir / "best_score.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        if cached.get("step") == step:
            score = float(cached["score"])
        else:
            raw = self.manager.restore(step, args=_restore(_numpy_target(self.manager, step)))
            score = float(raw["score"])
            write_text(path, json.dumps({"step": step, "score": score}))
        self._best = (step, score)
        return score

    def wait(self) -> None:
        self.commit()

    def close(self) -> None:
        self.commit()
        self.manager.close()


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


def _numpy_target(manager: ocp.CheckpointManager, step: int) -> Any:
    """A restore target of numpy arrays with the saved shapes (``np.empty`` touches no memory):
    Orbax then reads every array onto the host, whatever devices wrote it."""
    return jax.tree.map(lambda m: np.empty(m.shape, m.dtype), manager.item_metadata(step))


def restore_best_masks(workdir: str | Path, num_relations: int | None = None, *,
                       template_logits: Any | None = None) -> Any:
    """The best mask logits of a run, on any topology.

    With ``template_logits`` (arrays or ``jax.ShapeDtypeStruct`` with shardings): laid out like
    them, the relation axis truncated or zero-padded to theirs. Without: numpy arrays on the
    host of every process, ``[num_relations, ...]`` (inert slots dropped).
    """
    target = None
    if template_logits is not None:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"mask_logits": template_logits, "score": np.float64(0)})
    logits = _read_newest(absolute(workdir) / "best", "read_best", target)["mask_logits"]
    return logits if target is not None else jax.tree.map(lambda g: g[:num_relations], logits)


def restore_latest_masks(workdir: str | Path, num_relations: int | None = None) -> Any:
    """The mask logits of a run's newest training state (the last checkpoint, not the best
    masks), as numpy arrays ``[num_relations, ...]`` on the host, inert slots dropped."""
    logits = _read_newest(absolute(workdir) / "checkpoints", "read_latest")["mask_logits"]
    return jax.tree.map(lambda g: g[:num_relations], logits)


def _read_newest(directory: epath.Path, barriers: str, target: Any | None = None) -> Any:
    """The newest checkpoint under ``directory``: laid out like ``target`` (the relation axis
    truncated or zero-padded to it), or as numpy arrays with the saved shapes, so that the
    saving topology does not matter."""
    options = ocp.CheckpointManagerOptions(multiprocessing_options=_barriers(barriers))
    with ocp.CheckpointManager(directory, options=options,
                               item_handlers=_handler()) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint saved under {directory}")
        if target is not None:
            return manager.restore(step, args=_restore(target, strict=False))
        return manager.restore(step, args=_restore(_numpy_target(manager, step)))


def export_binary_masks(
    path: str | Path,
    mask_logits: Any,
    spec: MaskSpec,
    relations: tuple[str, ...],
    threshold: float = 0.5,
) -> epath.Path:
    """Writes the hard masks with one bit per weight (``np.packbits``): 32x smaller than logits.

    The file holds, per masked matrix ``layer_<i>/<matrix>``, the packed bits of ``[R, in, out]``
    and its shape, plus the relation names, layers, matrices and threshold.
    """
    arrays: dict[str, np.ndarray] = {}
    for i, m, leaf in iter_masks(mask_logits, spec):
        # On the host: numpy needs no compile per matrix shape, as eager jnp ops would. Inert
        # relation slots (past the run's relations) are left out.
        bits = hard_mask(to_host(leaf)[: len(relations)], threshold).astype(bool)
        arrays[f"layer_{i}/{m}"] = np.packbits(bits.reshape(-1))
        arrays[f"layer_{i}/{m}.shape"] = np.asarray(bits.shape)
    meta = {"relations": list(relations), "layers": list(spec.layers),
            "matrices": list(spec.matrices), "threshold": threshold}
    path = as_path(path)
    if is_main():
        save_npz(path, __meta__=np.asarray(json.dumps(meta)), **arrays)
    return path


def load_binary_masks(path: str | Path) -> tuple[dict[str, Any], MaskSpec, tuple[str, ...]]:
    """Inverse of :func:`export_binary_masks`: ``(0/1 float32 masks [R, ...], spec, relations)``.

    The tree has the mask-logit layout; ``multiply_masks(params, tree_r)`` applies relation r's.
    """
    with load_npz(path) as data:
        meta = json.loads(str(data["__meta__"]))
        spec = MaskSpec(tuple(meta["layers"]), tuple(meta["matrices"]))
        tree: dict[str, Any] = {}
        for i in spec.layers:
            for m in spec.matrices:
                shape = tuple(int(s) for s in data[f"layer_{i}/{m}.shape"])
                bits = np.unpackbits(data[f"layer_{i}/{m}"], count=int(np.prod(shape)))
                mask = bits.reshape(shape).astype(np.float32)
                insert_path(tree, (f"layer_{i}", *MATRIX_PATHS[m]), mask)
    return tree, spec, tuple(meta["relations"])
