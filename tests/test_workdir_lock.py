"""One run at a time in a workdir (lamp_jax.workdir_lock): a second train.py or sweep is refused
at once naming the first, the first's files stay a lone run's, and the lock of a holder killed
by kill -9 is taken over by the rerun (local: flock; gs://: a conditional object and its
heartbeat, on the suite's fake GCS server)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lamp_jax.errors import UsageError
from lamp_jax.workdir_lock import ENV_STALE_AFTER, LOCK_NAME, Holder, workdir_lock
from tests.conftest import SHORT_RUN_ARGS

ROOT = Path(__file__).resolve().parents[1]
IN_USE = (r"error: {workdir} is in use by another run: pid {pid} on host {host}, started "
          r"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC{heartbeat} \(its lock: {workdir}/\.lock[^)]*\)\. "
          r"Wait for it to end, stop it, or use another --workdir\.")


def _train(workdir, *extra: str) -> list[str]:
    return [sys.executable, "train.py", f"--workdir={workdir}", *SHORT_RUN_ARGS, *extra]


def _committed(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) \
        if directory.exists() else []


def _evaluations(workdir: Path) -> list[tuple[int, float]]:
    """(step, dev macro P@1) of every evaluation in ``metrics.jsonl``, and nothing else."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all("event" not in r for r in records), records
    return [(r["step"], r["dev_macro_P@1"]) for r in records]


def test_a_second_train_py_in_a_workdir_is_refused_naming_the_first(short_run_dir, tmp_path):
    """The issue's drill: two runs at once in one workdir, the second with another learning
    rate. The second stops at once with one line naming the first (pid, host, start time) and
    exit status 2; the first, which held the workdir all along (stopped with SIGSTOP while the
    second tried), ends with the files of a lone run: masks.npz byte for byte, its own
    evaluations only in metrics.jsonl, its own learning rate in run.json."""
    work = tmp_path / "run"
    log = tmp_path / "first.log"
    first = subprocess.Popen(_train(work), cwd=ROOT, stdout=log.open("w"),
                             stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while first.poll() is None and time.time() < deadline and 3 not in _committed(work):
            time.sleep(0.05)  # until it trains: its first checkpoint is committed
        assert first.poll() is None, log.read_text()[-3000:]
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(_train(work, "--config.optim.learning_rate=1.0"), cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert second.returncode == 2
    assert second.stdout == ""
    assert re.fullmatch(IN_USE.format(workdir=re.escape(str(work)), pid=first.pid,
                                      host=re.escape(socket.gethostname()), heartbeat=""),
                        second.stderr.strip()), second.stderr
    assert (work / "masks.npz").read_bytes() == (short_run_dir / "masks.npz").read_bytes()
    assert _evaluations(work) == _evaluations(short_run_dir)
    run = json.loads((work / "run.json").read_text())
    assert run["config"]["optim"]["learning_rate"] == 2.0
    assert [h["step"] for h in run["config_history"]] == [0]


_HOLD = ("import sys, time; from lamp_jax.workdir_lock import workdir_lock; "
         "workdir_lock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")


def _holder(workdir: str) -> subprocess.Popen:
    """A process that takes ``workdir``'s lock and keeps it (and its heartbeat) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, workdir], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_local_lock_whose_holder_was_killed_is_taken_over_at_once(tmp_path):
    holder = _holder(str(tmp_path))
    try:
        with pytest.raises(UsageError, match=f"in use by another run: pid {holder.pid} on host"):
            workdir_lock(tmp_path).acquire()
    finally:
        holder.kill()  # SIGKILL: no handler runs, the kernel drops the flock
        holder.wait()
    lock = workdir_lock(tmp_path)
    lock.acquire()
    assert Holder.parse((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    lock.release()


def test_a_lock_file_deleted_by_its_releasing_holder_is_never_the_one_held(tmp_path,
                                                                          monkeypatch):
    """A holder deletes .lock when it ends. A taker that opened the file just before (and
    locks it just after) must not hold that deleted file, or a third run would lock a new
    .lock beside it: it locks the file at the path instead."""
    import fcntl

    import lamp_jax.workdir_lock as module

    (tmp_path / LOCK_NAME).write_text(Holder.this_process().to_json())
    real_flock, released = fcntl.flock, []

    def flock_as_the_holder_releases(fd, operation):
        if not released:
            (tmp_path / LOCK_NAME).unlink()
            released.append(fd)
        return real_flock(fd, operation)

    monkeypatch.setattr(module.fcntl, "flock", flock_as_the_holder_releases)
    lock = workdir_lock(tmp_path)
    lock.acquire()
    assert released and os.fstat(lock._fd).st_ino == (tmp_path / LOCK_NAME).stat().st_ino
    assert Holder.parse((tmp_path / LOCK_NAME).read_text()).pid == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    from tests.test_workdir_url import FakeGcs

    server = FakeGcs(tmp_path_factory.mktemp("fake_gcs") / "server.log")
    try:
        yield server
    finally:
        server.close()


def test_a_bucket_lock_is_conditional_kept_alive_by_its_heartbeat_and_taken_over_once_stale(
        gcs, monkeypatch):
    """The lock object is created only if none exists (the fake server honours
    ifGenerationMatch=0: a second taker is refused); a live holder's heartbeat keeps it from
    going stale; once its holder is killed, a rerun takes it over after the stale age."""
    from tests.test_workdir_url import BUCKET

    url = f"gs://{BUCKET}/locks/run"
    monkeypatch.setenv(ENV_STALE_AFTER, "3")  # the holder beats every 0.5 s
    holder = _holder(url)
    try:
        time.sleep(4)  # longer than the stale age: only the heartbeat keeps the lock fresh
        with pytest.raises(UsageError) as refused:
            workdir_lock(url).acquire()
        assert re.fullmatch(IN_USE.format(workdir=re.escape(url), pid=holder.pid,
                                          host=re.escape(socket.gethostname()),
                                          heartbeat=r", last heartbeat [0-2] s ago"),
                            f"error: {refused.value}"), refused.value
    finally:
        holder.kill()
        holder.wait()
    time.sleep(3.5)  # its last heartbeat goes stale
    said: list[str] = []
    lock = workdir_lock(url, said.append)
    lock.acquire()
    assert len(said) == 1 and said[0].startswith(
        f"took over the lock of {url} from pid {holder.pid} on host {socket.gethostname()}")
    lock.check()  # this process's own heartbeat
    lock.release()
    from etils import epath

    assert not epath.Path(f"{url}/{LOCK_NAME}").exists()


def test_a_sweep_is_refused_while_its_workdir_is_held(tmp_path):
    from lamp_jax.configs import default
    from lamp_jax.sweep import run_sweep

    holder = _holder(str(tmp_path))
    try:
        with pytest.raises(UsageError, match=f"in use by another run: pid {holder.pid} "):
            run_sweep(default.get_config(), ["optim.learning_rate=0.5,1.0"], seeds=1,
                      workdir=tmp_path, log=lambda *_: None)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # nothing else written
