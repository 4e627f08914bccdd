"""The host/device and process boundary: the one place that knows a run may span processes.

A run on a pod (or on one machine with :mod:`lamp_jax.launch`) is N processes that each run
the same program on the same global arrays; every process holds only its own devices' shards.
Three rules keep the rest of the code free of process logic:

* **reading a global array on the host goes through** :func:`to_host` (it gathers the shards
  other processes hold; ``np.asarray`` on such an array raises);
* **files other than checkpoints are written by process 0 only** (:func:`is_main`,
  :func:`write_text`); every process takes part in Orbax saves and restores, which coordinate
  themselves;
* **every process makes the same decisions**: they read the same data, build the same global
  batches and see the same (gathered) metrics, so control flow never diverges.

:func:`initialize` joins the processes (``jax.distributed.initialize``): auto-detected on TPU,
SLURM, Open MPI, ..., or from an explicit coordinator address, process count and process id
(flags, or the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
``JAX_PROCESS_ID`` that :mod:`lamp_jax.launch` sets).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from lamp_jax import paths
from lamp_jax.errors import StorageError, UsageError
from lamp_jax.paths import as_path, is_url, storage_write

ENV_ADDRESS, ENV_PROCESSES, ENV_PROCESS_ID = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# Seconds without a heartbeat after which the coordinator declares a process dead and the
# others stop (JAX's own default is 100).
ENV_HEARTBEAT = "LAMP_JAX_HEARTBEAT_TIMEOUT"
# Exit status of a process whose peer died (EX_TEMPFAIL: rerunning the command resumes).
PEER_LOST_EXIT = 75
# Exit status of a run that answered a preemption notice with a checkpoint (EX_TEMPFAIL too).
PREEMPTED_EXIT = 75
# What JAX says when a collective or the coordination service loses a process. Not every
# barrier error: "barrier ... already ongoing" is a bug in this process, and must say so.
_PEER_FAILURE_SIGNS = ("connection closed", "connection reset", "heartbeat",
                       "task is set to error", "unavailable:", "tasks have crashed")
# How the runtime's status text begins when another library re-raises it as its own type.
_RUNTIME_STATUS_PREFIXES = ("unknown:", "internal:", "unavailable:", "aborted:",
                            "deadline_exceeded:")


def distributed_requested(flag: bool, environ: dict[str, str] | None = None) -> bool:
    """``--distributed`` was given, or a launcher set this process's id in the environment."""
    environ = os.environ if environ is None else environ
    return flag or ENV_PROCESS_ID in environ


def initialize_if_requested(flag: bool = False, coordinator_address: str | None = None,
                            num_processes: int | None = None,
                            process_id: int | None = None) -> bool:
    """:func:`initialize` when :func:`distributed_requested`; returns whether it joined. The
    entry points (train.py, evaluate, report) call this first thing."""
    if not distributed_requested(flag):
        return False
    initialize(coordinator_address, num_processes, process_id)
    return True


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout: int | None = None) -> None:
    """Joins this process to the others of its run (call before any JAX computation).

    Arguments left as None come from the environment (see the module docstring) and, where
    that has none either, from JAX's cluster auto-detection. On CPU devices, cross-process
    collectives use gloo (JAX's CPU default has none).
    """
    env = os.environ
    address = coordinator_address or env.get(ENV_ADDRESS)
    if num_processes is None and ENV_PROCESSES in env:
        num_processes = int(env[ENV_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in env:
        process_id = int(env[ENV_PROCESS_ID])
    if heartbeat_timeout is None:
        heartbeat_timeout = int(env.get(ENV_HEARTBEAT, 100))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)


def use_compile_cache(directory: str) -> str | None:
    """Keeps JAX's compiled programs in ``directory`` (``~`` expanded; a ``gs://`` URL works
    too), so that a resumed or repeated run loads them instead of compiling; returns the
    directory used, or None when off (``""``). ``JAX_COMPILATION_CACHE_DIR``, when set, wins
    (tests and launchers set it). Call it before the first compilation: JAX reads the setting
    when it first compiles."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return env
    if not directory:
        return None
    if not paths.is_url(directory):
        directory = os.path.expanduser(directory)
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    return directory


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress (process 0)."""
    return jax.process_index() == 0


def main_log(log):
    """``log`` on process 0, a no-op elsewhere (N copies of every line help nobody)."""
    return log if is_main() else (lambda *args, **kwargs: None)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm progress bar on process 0, shown only when it writes to a terminal (tqdm's
    ``disable=None``): a log file or a pipe gets no bar lines."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if is_main() else True, **kwargs)


def to_host(tree: Any) -> Any:
    """Every leaf as a numpy array holding its global value, on every process.

    Arrays whose shards all live in this process are fetched; an array that spans processes is
    gathered from all of them (a collective: every process must call this at the same point).
    """
    def fetch(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_replicated:  # one device's copy is the whole value
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            # Shard by shard: jax.device_get of an array on several devices keeps the host
            # copy inside the array for as long as the array lives (bert-base x 16 relations:
            # 2.7 GB more for the rest of the run, once the best masks were read).
            out = np.empty(x.shape, x.dtype)
            for shard in x.addressable_shards:
                out[shard.index] = np.asarray(shard.data)
            return out
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def put_global(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Places an array (identical on every process) as a global array with ``sharding``; each
    process materialises only the shards of its own devices."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put_global(jax.random.key_data(x), sharding))
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = to_host(x)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def sync(name: str) -> None:
    """Waits until every process gets here (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def main_first(action: Callable[[], None], name: str) -> None:
    """Runs ``action`` on process 0 while the other processes wait (``name``: what for). When
    it raises, every process raises: process 0 its own error, the others a
    :class:`~lamp_jax.errors.UsageError` or :class:`~lamp_jax.errors.StorageError` with its
    message (without this they would wait for process 0 until the heartbeat timeout)."""
    error: Exception | None = None
    if is_main():
        try:
            action()
        except Exception as err:  # shared below, then raised here too
            error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        text = f"{type(error).__name__}\n{error}" if error is not None else ""
        buffer = np.zeros(4096, np.uint8)
        encoded = np.frombuffer(text.encode()[:4096], np.uint8)
        buffer[: encoded.size] = encoded
        shared = bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).rstrip(b"\0")
        if error is None and shared:
            kind, _, message = shared.decode(errors="replace").partition("\n")
            raise (StorageError if kind == "StorageError" else UsageError)(
                f"process 0 ({name}): {message}")
    if error is not None:
        raise error


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``path`` atomically (a reader never sees half a file), on process 0 only; a failed
    write raises :class:`~lamp_jax.errors.StorageError` and leaves the old file as it was
    (:func:`lamp_jax.paths.storage_write`).

    ``path`` may be a URL (``gs://...``, :mod:`lamp_jax.paths`): there one object upload is
    atomic by itself."""
    if not is_main():
        return
    path = as_path(path)
    if is_url(path):
        storage_write(path, lambda: path.write_text(text))
        return
    tmp = path.with_name(f".{path.name}.tmp")

    def replace() -> None:
        tmp.write_text(text)
        os.replace(tmp, path)

    storage_write(path, replace)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to ``path`` on process 0 only (:func:`lamp_jax.paths.append_text`)."""
    if is_main():
        paths.append_text(path, text)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    import platform
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def return_free_memory() -> bool:
    """Hands the C heap's free pages back to the kernel (glibc's ``malloc_trim``); False where
    there is no glibc. Host copies made for a checkpoint or an evaluation are freed but stay
    mapped in glibc's arenas, so the resident set creeps up between large steps."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` says that another process of the run is gone (a collective or barrier
    lost its peer), as opposed to a bug or bad input in this process.

    The runtime's error may reach us wrapped: a checkpoint write that was in a collective when
    the peer died is a :class:`~lamp_jax.errors.StorageError` whose cause is what the checkpoint
    library re-raised (a ``ValueError`` carrying the runtime's ``UNKNOWN: Gloo ...`` text). So
    the whole chain is read; a plain Python error counts only with the runtime's status prefix
    and a peer sign in its text."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err).lower()
        runtime_status = isinstance(err, jax.errors.JaxRuntimeError) or \
            text.lstrip().startswith(_RUNTIME_STATUS_PREFIXES)
        if runtime_status and any(sign in text for sign in _PEER_FAILURE_SIGNS):
            return True
        err = err.__cause__ or err.__context__
    return False


# The ids this process passes to JAX's preemption sync point, one per call, increasing over the
# process's life as JAX's (process-wide) sync manager counts them: a notice heard between two
# calls is due at the id after the last one seen. The run's step would not do: a notice during
# the set-up of a resumed run (first step 13) was due at 1 and never met, and that run trained
# on to its end; nor would a count per loop (a sweep's next group would start again at 1).
_SYNC_POINT_CALLS = itertools.count(1)


class PreemptionNotice:
    """A preemption notice turned into a stop at a step that every process of the run agrees on.

    SIGTERM is the notice: a preemptible (spot) VM's, a cluster scheduler's stop, a TPU pod's
    maintenance event, a plain ``kill``. Without this the run dies at once and loses every step
    since its last checkpoint (an epoch, by default). The training loop enters this around its
    steps and asks :meth:`reached` after each one: True means save the state now and stop.

    One process: a Python handler notes the signal (and the previous handler is back on exit).
    Several: JAX's preemption service (``jax.distributed``, on by default) hears SIGTERM in
    whichever process gets it and agrees with the others on the next step that all of them
    reach (``multihost_utils.reached_preemption_sync_point``), so the collective save starts at
    the same step everywhere, in processes that got no signal too; a notice during set-up
    (once the processes have joined) is due at the first step. Every process must ask at every
    step of the loop, as the loop does.
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.received: int | None = None
        self._installed = False
        self._previous: Any = None
        self._service = True  # jax_enable_preemption_service may have turned JAX's off

    def __enter__(self) -> PreemptionNotice:
        self.received = None
        # Python handlers can only be set from the main thread (a loop in another thread
        # keeps the default: SIGTERM stops the process at once, as before).
        self._installed = (jax.process_count() == 1
                           and threading.current_thread() is threading.main_thread())
        if self._installed:
            self._previous = signal.signal(self.signum, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc_info: Any) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is the best guess.
            signal.signal(self.signum, signal.SIG_DFL if self._previous is None
                          else self._previous)
            self._installed, self._previous = False, None

    def reached(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (the number of steps done)."""
        if jax.process_count() == 1:
            return self.received is not None
        if not self._service:
            return False
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(next(_SYNC_POINT_CALLS))
        except RuntimeError:  # the service is off: only kill -9 style interruptions remain
            self._service = False
            return False


@contextlib.contextmanager
def stop_with_peers() -> Iterator[None]:
    """Turns "another process died" into one clear line and a prompt exit.

    Without it the survivor prints a JAX/Gloo traceback, then waits in JAX's shutdown barrier
    for the dead process until the heartbeat timeout and aborts. Here it says what happened
    and leaves at once (``os._exit`` skips that barrier) with :data:`PEER_LOST_EXIT`.
    """
    try:
        yield
    except Exception as err:
        if jax.process_count() > 1 and is_peer_failure(err):
            first_line = str(err).strip().splitlines()[0][:300]
            sys.stdout.flush()
            sys.stderr.write(
                f"lamp-jax: process {jax.process_index()} of {jax.process_count()}: another "
                f"process of this run is gone ({type(err).__name__}: {first_line}); stopping "
                "this one too. Start the same command in every process again to resume from "
                "the latest checkpoint.\n")
            sys.stderr.flush()
            os._exit(PEER_LOST_EXIT)
        raise
