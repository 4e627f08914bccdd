"""Storage faults lose nothing: a full disk during a checkpoint, a workdir that turns read-only,
a bucket that goes away. The run stops with one line naming the path and the error and exit
status 75, the last committed checkpoint is what a restore takes, and the rerun, once the
storage is back, ends with the masks of an uninterrupted run.

The full disk is injected where Python writes (tests/storage_faults/sitecustomize.py): from
the first write of the checkpoint of step 6 on, every write under the workdir fails with ENOSPC.
The bucket is the suite's fake GCS server, stopped during training and started again."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lamp_jax.checkpoint import BestMasks, StateCheckpoints
from lamp_jax.errors import StorageError
from lamp_jax.hosts import append_text, write_text
from lamp_jax.paths import ENV_STORAGE_TIMEOUT, save_npz
from lamp_jax.workdir_lock import ENV_STALE_AFTER
from tests.conftest import SHORT_RUN_ARGS
from tests.storage_faults.sitecustomize import install

ROOT = Path(__file__).resolve().parents[1]
FAULTS = Path(__file__).parent / "storage_faults"


def _train(workdir, *extra: str) -> list[str]:
    return [sys.executable, "train.py", f"--workdir={workdir}", *SHORT_RUN_ARGS, *extra]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_full_disk_during_a_checkpoint_stops_with_75_and_the_rerun_ends_as_a_lone_run(
        short_run_dir, tmp_path):
    work = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(FAULTS), str(ROOT)]),
           "LAMP_JAX_FAULT_UNDER": str(work),
           "LAMP_JAX_FAULT_AT": str(work / "checkpoints" / "6.orbax-checkpoint-tmp")}
    # Never a hang: Orbax's threads of the failed save would keep the process 300 s.
    full = subprocess.run(_train(work), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert full.returncode == 75, full.stderr[-3000:]
    # One line of ours naming the file it could not write and why (Orbax's threads may log
    # their failed background save around it).
    (line,) = _errors(full.stderr)
    assert re.fullmatch(rf"error: cannot write {re.escape(str(work))}/\S+: No space left on "
                        r"device \(ENOSPC\)(: \S+)?", line), line
    # The checkpoint of step 6 was never committed; step 3's is what a restore takes.
    states = StateCheckpoints(work / "checkpoints")
    assert states.manager.all_steps() == [3]
    states.close()
    assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    # Space freed: the same command resumes from step 3 and ends as the uninterrupted run.
    again = subprocess.run(_train(work), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 3" in again.stdout
    assert (work / "masks.npz").read_bytes() == (short_run_dir / "masks.npz").read_bytes()
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["resumed_from"] == [3]
    assert metrics["test"] == json.loads((short_run_dir / "metrics.json").read_text())["test"]


def _state(value: float):
    from lamp_jax.optim import OptimConfig, make_optimizer
    from lamp_jax.step import init_train_state

    logits = {"layer_0": {"query": {"kernel": jax.numpy.full((2, 8, 8), value)}}}
    return init_train_state(logits, make_optimizer(OptimConfig()), 10, jax.random.key(0))


def test_a_checkpoint_failing_in_the_background_surfaces_at_the_wait_and_commits_nothing(
        tmp_path):
    """Orbax writes a background checkpoint in threads of its own: their failure is raised as
    a StorageError naming the directory at the next wait (or save), and the failed step is
    never among the checkpoints a restore takes."""
    states = StateCheckpoints(tmp_path / "checkpoints", background=True)
    states.save(_state(1.0), 1)
    states.wait()
    uninstall = install(str(tmp_path), "2.orbax-checkpoint-tmp")
    try:
        states.save(_state(2.0), 2)  # returns: the write is in the background
        with pytest.raises(StorageError, match=rf"cannot write {tmp_path}/checkpoints: No space "
                                               r"left on device \(ENOSPC\)"):
            states.wait()
    finally:
        uninstall()
    assert states.manager.all_steps() == [1]
    reopened = StateCheckpoints(tmp_path / "checkpoints")
    assert reopened.manager.all_steps() == [1]
    restored = reopened.restore_latest(_state(0.0))
    np.testing.assert_array_equal(restored.mask_logits["layer_0"]["query"]["kernel"], 1.0)
    reopened.close()


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_every_writer_of_a_run_stops_with_a_storage_error_and_keeps_the_old_file(tmp_path,
                                                                                  error):
    """A workdir that turns read-only (or loses its permission, or fills up) after start: the
    run's text files, metrics log, masks and best masks each raise StorageError naming the
    path, and a file written before keeps its old contents (written atomically)."""
    write_text(tmp_path / "run.json", "old")
    best = BestMasks(tmp_path, background=False)
    uninstall = install(str(tmp_path), str(tmp_path), error)
    try:
        for write, name in ((lambda: write_text(tmp_path / "run.json", "new"), "run.json"),
                            (lambda: append_text(tmp_path / "metrics.jsonl", "{}\n"),
                             "metrics.jsonl"),
                            (lambda: save_npz(tmp_path / "masks.npz", x=np.zeros(3)),
                             "masks.npz")):
            with pytest.raises(StorageError, match=rf"^cannot write {tmp_path}/{name}: "
                                                   rf"{os.strerror(error)}"):
                write()
        with pytest.raises(StorageError, match=rf"cannot write {tmp_path}/best: "):
            best.save(3, {"g": np.zeros((2, 4), np.float32)}, 0.5)
    finally:
        uninstall()
    assert (tmp_path / "run.json").read_text() == "old"


def test_a_bucket_that_goes_away_stops_the_run_with_75_and_the_rerun_resumes(
        short_run_dir, tmp_path):
    """A gs:// run while the fake GCS server is stopped (its objects kept on disk) and started
    again: a second run meanwhile is refused naming the first and its heartbeat; the first
    stops within the storage deadline with one line and status 75; the rerun takes over the
    lock the first could not delete (its heartbeat stale), resumes from the last committed
    checkpoint and ends with the masks of the uninterrupted local run."""
    from etils import epath

    from tests.test_workdir_url import BUCKET, FakeGcs

    server = FakeGcs(tmp_path / "server.log", root=tmp_path / "bucket")
    try:
        run = f"gs://{BUCKET}/runs/outage"
        # The first run's deadline for a bucket write, s (the others keep the default: on a
        # loaded machine their first requests to the bucket may take seconds).
        short = {**os.environ, ENV_STORAGE_TIMEOUT: "8"}

        def committed() -> list[int]:
            directory = epath.Path(run) / "checkpoints"
            return sorted(int(p.name) for p in directory.iterdir()
                          if p.name.isdigit() and (p / "commit_success.txt").exists()) \
                if directory.exists() else []

        log = tmp_path / "first.log"
        first = subprocess.Popen(_train(run), cwd=ROOT, env=short, stdout=log.open("w"),
                                 stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while first.poll() is None and time.time() < deadline and 3 not in committed():
            time.sleep(0.1)
        assert first.poll() is None, log.read_text()[-3000:]
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(_train(run), cwd=ROOT, capture_output=True, text=True,
                                    timeout=120)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        assert re.fullmatch(rf"error: {re.escape(run)} is in use by another run: pid "
                            rf"{first.pid} on host .*, last heartbeat \d+ s ago \(its lock: .*",
                            second.stderr.strip()), second.stderr
        server.stop()
        stopped = time.time()
        assert first.wait(timeout=120) == 75, log.read_text()[-3000:]
        # Within the deadline after its next write (an evaluation: a second apart here).
        assert time.time() - stopped < 30
        (line,) = _errors(log.read_text())
        assert re.fullmatch(rf"error: cannot write {re.escape(run)}/\S+: no answer from the "
                            r"bucket within \d+ s \(gave up; LAMP_JAX_STORAGE_TIMEOUT sets the "
                            r"limit\)", line), line
        assert server.start()
        steps = committed()
        assert steps and steps[-1] < 9
        stale = 8  # s; the first run's last heartbeat was before the server stopped
        time.sleep(max(0.0, stopped + stale + 1 - time.time()))
        again = subprocess.run(_train(run), cwd=ROOT,
                               env={**os.environ, ENV_STALE_AFTER: str(stale)},
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert f"took over the lock of {run} from pid {first.pid}" in again.stdout
        assert f"resumed from step {steps[-1]}" in again.stdout
        assert ((epath.Path(run) / "masks.npz").read_bytes()
                == (short_run_dir / "masks.npz").read_bytes())
    finally:
        server.close()
