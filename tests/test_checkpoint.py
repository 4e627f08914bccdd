"""Checkpoint files: written uncompressed, compressed ones of earlier versions still read, and a
sweep's best masks saved together each kept as their own run's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

from lamp_jax.checkpoint import BestMasks, restore_best_masks


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_checkpoints_are_written_uncompressed(tmp_path):
    """zstd shrank a sweep group's float32 state by 7% and cost a fifth of its wall time
    (README, sweeps). Zeros would compress to almost nothing: uncompressed, every byte is
    written."""
    logits = {"layer_2/query": np.zeros((4, 256, 256), np.float32)}
    best = BestMasks(tmp_path, background=False)
    assert best.save(3, logits, 0.5)
    best.close()
    assert _bytes_under(tmp_path / "best" / "3") >= logits["layer_2/query"].nbytes


def test_compressed_checkpoints_of_earlier_versions_still_read(tmp_path):
    """Earlier versions saved through Orbax's StandardCheckpointHandler, with zstd."""
    rng = np.random.default_rng(0)
    query = np.zeros((3, 256, 256), np.float32)
    query[:, 0] = rng.normal(size=(3, 256))  # mostly zeros: zstd shrinks it to a fraction
    logits = {"layer_2/query": query}
    directory = tmp_path / "best"
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(directory, options=options,
                               item_handlers=ocp.StandardCheckpointHandler()) as manager:
        manager.save(7, args=ocp.args.StandardSave({"mask_logits": logits,
                                                    "score": np.float64(0.25)}))
        manager.wait_until_finished()
    assert _bytes_under(directory / "7") < logits["layer_2/query"].nbytes  # it was compressed
    restored = restore_best_masks(tmp_path, 2)
    np.testing.assert_array_equal(restored["layer_2/query"], logits["layer_2/query"][:2])
    assert BestMasks(tmp_path).score() == 0.25


def test_best_masks_saved_together_each_keep_their_own_run(tmp_path):
    """A sweep starts every improved run's save, then waits for all of them."""
    rng = np.random.default_rng(1)
    runs = [tmp_path / f"run{v}" for v in range(3)]
    logits = [{"m": rng.normal(size=(2, 8, 8)).astype(np.float32)} for _ in runs]
    best = [BestMasks(r) for r in runs]
    for v, b in enumerate(best):
        assert b.save(5, logits[v], 0.1 * (v + 1), wait=False)
    assert [b.score() for b in best] == [0.1, 0.2, 0.30000000000000004]  # waits for the save
    for b in best:
        assert not b.beats(b.score()) and b.beats(b.score() + 0.01)
        b.close()
    for v, r in enumerate(runs):
        np.testing.assert_array_equal(restore_best_masks(r, 2)["m"], logits[v]["m"])
        assert (r / "best_score.json").read_text() == (
            f'{{"step": 5, "score": {0.1 * (v + 1)}}}')
