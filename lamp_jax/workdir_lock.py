"""One run at a time in a workdir: the run that trains in it holds its lock until it ends.

    with hold_workdir(workdir, log) as lock:    # UsageError at once if another run holds it
        ...                                     # lock.check() now and then (a bucket's lock)

Two runs in one workdir would interleave ``metrics.jsonl``, overwrite each other's ``run.json``,
masks and checkpoints, and a resume would pick up the other's state. So ``train.py`` and
``lamp_jax.sweep`` take the workdir's lock before they load anything, and a second run is
refused with a :class:`~lamp_jax.errors.UsageError` naming the holder (host, pid, start time).
``evaluate``, ``report`` and ``load_run`` only read the files a run has committed, and never
wait for the lock.

* **A local workdir**: ``fcntl.flock`` on ``<workdir>/.lock``, which records the holder. The
  kernel drops the lock when the process ends, however it ends (``kill -9`` too), so a rerun
  takes it over at once. The holder deletes the file when it ends; a taker checks that the
  file it locked is still the one at that path, so a file deleted under it is never held.
* **A gs:// workdir**: the object ``<workdir>/.lock``, created only if it does not exist (a
  generation precondition, ``ifGenerationMatch=0``), rewritten by a heartbeat every
  :data:`HEARTBEAT_S` seconds (a background thread; each rewrite conditional on the holder's
  own last generation, so a holder that was taken over notices) and deleted at the end. A lock
  whose heartbeat is older than :data:`STALE_AFTER_S` seconds (its holder was killed, or lost
  the bucket) is taken over, again by a conditional write, so two reruns cannot both win. The
  age is the bucket's clock (the object's ``updated`` time) against this host's.
  ``LAMP_JAX_LOCK_STALE_AFTER`` sets that age (tests use a few seconds; the heartbeat then
  beats six times as often). A holder whose heartbeats have not reached the bucket for that
  age stops (:class:`~lamp_jax.errors.StorageError`): another run may have taken over.
* **Other URLs** (``s3://``): not locked (S3 writes had no precondition until recently); the
  run says so at start-up.

Several processes of one run share the lock: process 0 takes it before the others start work
(they wait at a barrier and stop with process 0's error if it could not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from lamp_jax.errors import StorageError, UsageError
from lamp_jax.paths import absolute, is_url, storage_write, unwritable_workdir

LOCK_NAME = ".lock"
# A gs:// lock's heartbeat: rewritten every HEARTBEAT_S seconds, taken over once older than
# STALE_AFTER_S (ENV_STALE_AFTER overrides it).
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
ENV_STALE_AFTER = "LAMP_JAX_LOCK_STALE_AFTER"


def stale_after() -> float:
    """Seconds without a heartbeat after which a bucket's lock is taken over."""
    return float(os.environ.get(ENV_STALE_AFTER, STALE_AFTER_S))


def heartbeat_interval() -> float:
    """Seconds between two heartbeats: :data:`HEARTBEAT_S`, or a sixth of the stale age when
    that is shorter (a holder then misses five heartbeats before it can be taken over)."""
    return min(HEARTBEAT_S, stale_after() / 6)


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir: what the lock records."""

    host: str
    pid: int
    started: float  # unix time
    token: str = ""  # tells this holder's heartbeats from a successor's

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            record = json.loads(text)
            return cls(str(record["host"]), int(record["pid"]), float(record["started"]),
                       str(record.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def describe(self) -> str:
        started = datetime.datetime.fromtimestamp(self.started, datetime.timezone.utc)
        return (f"pid {self.pid} on host {self.host}, started "
                f"{started.strftime('%Y-%m-%d %H:%M:%S')} UTC")


def _in_use(path: Any, holder: Holder | None, heartbeat: str = "", note: str = ""
            ) -> UsageError:
    who = holder.describe() if holder else "a process that has not yet written its name"
    return UsageError(f"{path} is in use by another run: {who}{heartbeat} (its lock: "
                      f"{path}/{LOCK_NAME}{note}). Wait for it to end, stop it, or use another "
                      "--workdir.")


class LocalLock:
    """``fcntl.flock`` on ``<workdir>/.lock`` (see the module docstring)."""

    def __init__(self, workdir: Any):
        self.workdir = absolute(workdir)
        self.path = self.workdir / LOCK_NAME
        self.holder = Holder.this_process()
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = storage_write(self.path, lambda: os.open(self.path,
                                                              os.O_RDWR | os.O_CREAT, 0o644))
            except StorageError as err:
                raise unwritable_workdir(self.workdir, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise _in_use(self.workdir, Holder.parse(text)) from None
            if self._still_there(fd):
                break
            os.close(fd)  # its holder deleted it as we opened it: lock the file there now

        def record() -> None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self.holder.to_json().encode(), 0)

        try:
            storage_write(self.path, record)
        except StorageError as err:
            os.close(fd)
            raise unwritable_workdir(self.workdir, err) from err
        self._fd = fd

    def _still_there(self, fd: int) -> bool:
        """Whether the file ``fd`` locked is still ``.lock`` (a holder deletes it on release)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def check(self) -> None:
        """A local lock cannot be lost while its process lives."""

    def release(self) -> None:
        """Deletes the lock file, then drops the lock: a workdir left behind holds no trace of
        the run that held it (a run killed with ``kill -9`` leaves the file, unlocked)."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None


class BucketLock:
    """A lock object in a gs:// workdir with a heartbeat (see the module docstring), written
    through the JSON API of gcsfs's session: its Python API has no generation preconditions
    for overwrites."""

    def __init__(self, workdir: Any, log=print):
        import fsspec

        self.workdir = absolute(workdir)
        self.url = f"{self.workdir}/{LOCK_NAME}"
        self.bucket, _, self.key = self.url.removeprefix("gs://").partition("/")
        self.fs = fsspec.filesystem("gs")
        self.holder = Holder.this_process()
        self.log = log
        self.generation: str | None = None
        self._last_beat = 0.0  # time.monotonic() of the last heartbeat the bucket took
        self._lost: str | None = None  # why this process no longer holds the lock
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a heartbeat's write, or the release's delete
        self._thread: threading.Thread | None = None

    # The JSON API, each request bounded (lamp_jax.paths.storage_write).
    def _upload(self, if_generation: str) -> str | None:
        """Writes the lock if its generation is ``if_generation`` ("0": if there is none);
        returns the new generation, or None when the precondition failed."""
        metadata = json.dumps({"name": self.key, "contentType": "application/json"})
        body = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{metadata}\n"
                f"--==0==\nContent-Type: application/json\n\n{self.holder.to_json()}\n"
                "--==0==--").encode()

        def request() -> str | None:
            try:
                reply = self.fs.call(
                    "POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",
                    uploadType="multipart", ifGenerationMatch=if_generation, data=body,
                    json_out=True,
                    headers={"Content-Type": 'multipart/related; boundary="==0=="'})
            except FileExistsError:  # gcsfs's name for HTTP 412, precondition failed
                return None
            return str(reply["generation"])

        return storage_write(self.url, request)

    def _read(self) -> tuple[str, Holder | None, float] | None:
        """``(generation, holder, seconds since its last heartbeat)``; None: no lock object."""
        def request() -> tuple[str, Holder | None, float] | None:
            try:
                meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
                _, content = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key,
                                          alt="media", generation=meta["generation"])
            except FileNotFoundError:
                return None
            updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
            return (str(meta["generation"]), Holder.parse(content.decode(errors="replace")),
                    time.time() - updated.timestamp())

        return storage_write(self.url, request, action="read")

    def acquire(self) -> None:
        try:
            self.generation = self._take()
        except StorageError as err:
            raise unwritable_workdir(self.workdir, err) from err
        self._last_beat = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name="lamp_jax-lock-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _take(self) -> str:
        """Creates the lock, or takes over a stale one; returns its generation."""
        for _ in range(3):  # the object may vanish or change hands between two requests
            generation = self._upload("0")
            if generation is not None:
                return generation
            found = self._read()
            if found is None:
                continue
            old, holder, age = found
            limit = stale_after()
            if age <= limit:
                raise _in_use(self.workdir, holder, f", last heartbeat {age:.0f} s ago",
                              f"; one without a heartbeat for {limit:.0f} s is taken over, "
                              f"{ENV_STALE_AFTER} sets that age")
            generation = self._upload(old)
            if generation is None:
                continue  # another rerun took it over first
            who = holder.describe() if holder else "an unnamed holder"
            self.log(f"took over the lock of {self.workdir} from {who}: its last heartbeat was "
                     f"{age:.0f} s ago")
            return generation
        raise _in_use(self.workdir, None, note="; it changed hands during three tries")

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_interval()):
            try:
                with self._writing:
                    if self._stop.is_set():
                        return
                    generation = self._upload(self.generation)
                    if generation is None:
                        found = self._read()
                        if found and found[1] and found[1].token == self.holder.token:
                            self.generation = found[0]  # our own write; its reply was lost
                            continue
                        self._lost = "another run took it over: " + (
                            found[1].describe() if found and found[1]
                            else "the lock object is gone")
                        return
                    self.generation = generation
                self._last_beat = time.monotonic()
            except StorageError:  # the bucket did not answer: check() decides when it matters
                continue

    def check(self) -> None:
        """Raises StorageError once this run cannot be sure it still holds the workdir."""
        if self._lost:
            raise StorageError(f"lost the lock of {self.workdir}: {self._lost}")
        silent = time.monotonic() - self._last_beat
        if silent > stale_after():
            raise StorageError(f"cannot refresh the lock {self.url}: no heartbeat reached the "
                               f"bucket for {silent:.0f} s, so another run may take the workdir "
                               "over")

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock object (if it is still this run's). Where
        the bucket does not answer, the lock is left to go stale: the next run takes it over
        :func:`stale_after` seconds after the last heartbeat."""
        self._stop.set()
        if self.generation is None or self._lost:
            return
        # A heartbeat stuck in the bucket's retries keeps the object: leave it to go stale.
        if not self._writing.acquire(timeout=5):
            self.log(f"warning: left the lock {self.url} in place (the bucket does not answer); "
                     f"the next run takes it over {stale_after():.0f} s after its last heartbeat")
            return
        def delete() -> None:
            with contextlib.suppress(FileNotFoundError, FileExistsError):  # gone, or not ours
                self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key,
                             ifGenerationMatch=self.generation)

        try:
            storage_write(self.url, delete)
        except StorageError as err:
            self.log(f"warning: could not delete the lock {self.url} ({err}); the next run "
                     f"takes it over {stale_after():.0f} s after its last heartbeat")
        finally:
            self._writing.release()
            self.generation = None


class Unlocked:
    """A workdir that cannot be locked (``s3://``), or a process other than 0."""

    def acquire(self) -> None:
        pass

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def workdir_lock(workdir: Any, log=print) -> LocalLock | BucketLock | Unlocked:
    """The lock of ``workdir`` (not yet taken)."""
    text = os.fspath(workdir)
    if not is_url(text):
        return LocalLock(workdir)
    if text.startswith("gs://"):
        return BucketLock(workdir, log)
    log(f"warning: {text} is not locked (only local and gs:// workdirs are): make sure no other "
        "run uses it at the same time")
    return Unlocked()


@contextlib.contextmanager
def hold_workdir(workdir: Any, log=print) -> Iterator[LocalLock | BucketLock | Unlocked]:
    """Holds ``workdir``'s lock for the duration (process 0 takes it; every process stops with
    its error if it could not)."""
    from lamp_jax.hosts import is_main, main_first

    lock = workdir_lock(workdir, log) if is_main() else Unlocked()
    main_first(lock.acquire, "workdir locked")
    try:
        yield lock
    finally:
        lock.release()
