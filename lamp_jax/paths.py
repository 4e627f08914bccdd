"""Run directories on a local disk or in a bucket: how every file of a run is named and written.

A run directory (``--workdir``) is a local path or a bucket URL: ``gs://bucket/dir`` (Google
Cloud Storage; needs ``gcsfs``) or ``s3://bucket/dir`` (needs ``s3fs``). Files go through
``etils.epath``, checkpoints through Orbax and TensorStore, which write to exactly these two
kinds of bucket (epath also opens ``az://`` and ``hf://``, Orbax does not, so they are refused).
Local paths behave as with ``pathlib``: the files and their names are the same as before URLs
were accepted.

Objects in a bucket are written whole, so everything here writes whole files: numpy archives
and figures are rendered to bytes first (neither numpy nor matplotlib writes to a URL), and
appending to a text file rewrites it.

Every write of a run's files and checkpoints goes through :func:`storage_write`: a write that
fails (a full disk, a permission lost mid-run, a bucket error) raises
:class:`~lamp_jax.errors.StorageError` naming the path and the error, and a write to a bucket
that has not completed within :func:`storage_deadline` seconds raises it too, so that a run
never hangs on storage that went away. Transient bucket errors (HTTP 408, 429, 5xx, a refused
or dropped connection) are retried within that bound by the clients themselves: gcsfs tries a
request 6 times with exponential backoff (pauses of about 1, 2, 4, 8 and 16 s), TensorStore
(checkpoint arrays) with its own backoff.
"""

from __future__ import annotations

import errno
import io
import os
import re
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from etils import epath

from lamp_jax.errors import StorageError

T = TypeVar("T")

# Opened by etils.epath and by Orbax/TensorStore alike; any other "scheme://" is refused rather
# than taken for a local directory.
URL_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

PathLike = str | os.PathLike

# Seconds a write to a bucket may take before the run stops (StorageError), plus one second per
# STORAGE_BYTES_PER_SECOND bytes written. gcsfs's own retries of a refused connection take about
# 31 s (so a bucket back within about half a minute costs nothing); TensorStore's defaults retry
# a dead bucket for many minutes (measured: still retrying after 7 minutes).
ENV_STORAGE_TIMEOUT = "LAMP_JAX_STORAGE_TIMEOUT"
STORAGE_TIMEOUT_S = 60.0
STORAGE_BYTES_PER_SECOND = 20e6


def is_url(path: PathLike) -> bool:
    """Whether ``path`` names a location in a bucket (``gs://...``) rather than a local file."""
    return _URL.match(os.fspath(path)) is not None


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (relative local paths stay relative)."""
    text = os.fspath(path)
    match = _URL.match(text)
    if match and match.group(1) not in URL_SCHEMES:
        raise ValueError(f"{text}: unsupported URL scheme {match.group(1)}:// (a run directory "
                         f"is a local path or a {', '.join(s + '://' for s in URL_SCHEMES)} URL)")
    return epath.Path(text)


def absolute(path: PathLike) -> epath.Path:
    """A directory as written to: local paths made absolute, URLs as given."""
    path = as_path(path)
    return path if is_url(path) else path.absolute()


def storage_deadline(nbytes: int = 0) -> float:
    """Seconds a write of ``nbytes`` to a bucket may take: ``LAMP_JAX_STORAGE_TIMEOUT`` (default
    :data:`STORAGE_TIMEOUT_S`) plus one second per :data:`STORAGE_BYTES_PER_SECOND` bytes."""
    base = float(os.environ.get(ENV_STORAGE_TIMEOUT, STORAGE_TIMEOUT_S))
    return base + nbytes / STORAGE_BYTES_PER_SECOND


def storage_write(path: PathLike, write: Callable[[], T], nbytes: int = 0,
                  failures: tuple[type[Exception], ...] = (OSError,), action: str = "write") -> T:
    """``write()``, a write to the run's storage at ``path`` (a file, or the directory of a
    checkpoint), with its failure turned into one :class:`~lamp_jax.errors.StorageError` that
    names ``path`` and the error.

    On a local disk the exceptions in ``failures`` are storage failures (an ``OSError``;
    checkpoint writes pass ``(Exception,)``: TensorStore reports a full disk as a
    ``ValueError``); anything else is a bug and stays as it is. In a bucket every client error
    is one (gcsfs and TensorStore raise their own types), and the write runs in a helper thread
    that is given :func:`storage_deadline` seconds: past them the run stops with the write still
    in flight (the command line then exits at once, :mod:`lamp_jax.cli`). ``action`` names
    what was being done in the message ("cannot write ...")."""
    if not is_url(path):
        try:
            return write()
        except StorageError:
            raise
        except failures as err:
            raise _in_flight(StorageError(f"cannot {action} {path}: {describe_error(err, path)}")) \
                from err
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = write()
        except BaseException as err:  # handed to the caller's thread
            outcome["error"] = err

    seconds = storage_deadline(nbytes)
    worker = threading.Thread(target=run, name="lamp_jax-storage-write", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _in_flight(StorageError(
            f"cannot {action} {path}: no answer from the bucket within {seconds:.0f} s (gave up; "
            f"{ENV_STORAGE_TIMEOUT} sets the limit)"))
    error = outcome.get("error")
    if isinstance(error, StorageError) or (error is not None
                                            and not isinstance(error, Exception)):
        raise error
    if error is not None:
        raise _in_flight(StorageError(f"cannot {action} {path}: {describe_error(error, path)}")) \
            from error
    return outcome["value"]


def _in_flight(err: StorageError) -> StorageError:
    err.writes_in_flight = True  # see StorageError
    return err


def unwritable_workdir(path: PathLike, err: BaseException) -> StorageError:
    """The error of a workdir that cannot be written at start-up."""
    reason = describe_error(err.__cause__ or err) if isinstance(err, StorageError) else \
        describe_error(err)
    return StorageError(f"cannot write to the workdir {path}: {reason} (checkpoints, metrics and "
                        "plots go there; pick another --workdir or free space)")


def describe_error(err: BaseException, path: PathLike | None = None) -> str:
    """An error in one line: its type (unless an OSError's own words say enough), its message
    and the file it names, unless that is ``path``."""
    if isinstance(err, OSError) and err.strerror:
        name = errno.errorcode.get(err.errno or 0)
        text = f"{err.strerror} ({name})" if name else err.strerror
        named = err.filename is not None and os.fspath(err.filename) != os.fspath(path or "")
        return f"{text}: {err.filename}" if named else text
    text = " ".join(str(err).split())[:300] or "no message"
    return f"{type(err).__name__}: {text}"


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` whole (:func:`storage_write`)."""
    path = as_path(path)
    storage_write(path, lambda: path.write_bytes(data), len(data))


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text`` to ``path`` (in a bucket: rewrites the object with ``text`` added)."""
    path = as_path(path)
    if not is_url(path):
        def append() -> None:
            with open(path, "a") as f:
                f.write(text)

        storage_write(path, append)
        return

    def rewrite() -> None:
        old = path.read_text() if path.exists() else ""
        path.write_text(old + text)

    storage_write(path, rewrite)


def save_npz(path: PathLike, **arrays: Any) -> None:
    """``np.savez_compressed`` to a local path or a URL."""
    path = as_path(path)
    if not is_url(path):
        storage_write(path, lambda: np.savez_compressed(path, **arrays))
        return
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path: PathLike):
    """``np.load`` of an ``.npz`` from a local path or a URL (use it as a context manager)."""
    path = as_path(path)
    return np.load(io.BytesIO(path.read_bytes()) if is_url(path) else path)


def save_figure(fig, path: PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` to a local path or a URL (the format from the file's suffix)."""
    path = as_path(path)
    if not is_url(path):
        storage_write(path, lambda: fig.savefig(path, **kwargs))
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or None, **kwargs)
    write_bytes(path, buffer.getvalue())
