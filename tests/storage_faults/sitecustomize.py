"""A storage fault for tests: the disk under a directory fills up (or turns read-only) at the
first write to a given path, and from then on every write under that directory fails.

Loaded by Python at start-up when this directory is on PYTHONPATH (tests/test_storage_faults.py),
configured by the environment:

    LAMP_JAX_FAULT_UNDER    the directory whose storage fails (absolute path)
    LAMP_JAX_FAULT_AT       the fault starts at the first write to a path containing this text
                            (e.g. "checkpoints/6.orbax-checkpoint-tmp": the disk fills during the
                            checkpoint of step 6)
    LAMP_JAX_FAULT_ERRNO    ENOSPC (default: a full disk), EROFS or EACCES

Writes are seen where Python makes them: opening a file for writing (``open``, ``io.open``,
``os.open``) and creating a directory (``os.mkdir``, which ``os.makedirs`` and
``Path.mkdir`` call). That is every writer of a run but TensorStore, which writes the arrays of
a checkpoint natively; Orbax writes each checkpoint's directories and metadata from Python, so a
checkpoint still fails part way, as on a full disk. Files opened before the fault keep writing.
In-process tests use :func:`install` (it returns the function that removes the fault).
"""

import builtins
import errno
import io
import os

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def install(under: str, at: str, error: int = errno.ENOSPC):
    """Makes writes under ``under`` fail with ``error`` from the first write to a path containing
    ``at`` on; returns a function that restores the real ``open``, ``os.open`` and ``os.mkdir``."""
    under = os.path.abspath(under)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    state = {"full": False}

    def check(path) -> None:
        try:
            path = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return
        if path != under and not path.startswith(under + os.sep):
            return
        if at in path:
            state["full"] = True
        if state["full"]:
            raise OSError(error, os.strerror(error), path)

    def fault_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    def fault_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            check(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fault_mkdir(path, *args, **kwargs):
        check(path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = fault_open
    os.open, os.mkdir = fault_os_open, fault_mkdir

    def uninstall() -> None:
        builtins.open = io.open = real_open
        os.open, os.mkdir = real_os_open, real_mkdir

    return uninstall


if os.environ.get("LAMP_JAX_FAULT_UNDER"):
    install(os.environ["LAMP_JAX_FAULT_UNDER"], os.environ["LAMP_JAX_FAULT_AT"],
            getattr(errno, os.environ.get("LAMP_JAX_FAULT_ERRNO", "ENOSPC")))
