"""Loaded by Python at start-up when this directory is on PYTHONPATH (tests/test_topology.py):
records every file this process opens for writing from Python, one JSON line per open, in
``$LAMP_JAX_WRITE_PROBE/process_<JAX_PROCESS_ID>.jsonl``. Native writers (TensorStore, which
writes Orbax's arrays) are not seen; every Python-level writer of a run (json, numpy,
matplotlib, tensorboardX, etils.epath) opens its files through these functions."""

import builtins
import io
import json
import os

_DIRECTORY = os.environ.get("LAMP_JAX_WRITE_PROBE")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

if _DIRECTORY:
    os.makedirs(_DIRECTORY, exist_ok=True)
    _log_path = os.path.join(_DIRECTORY,
                             f"process_{os.environ.get('JAX_PROCESS_ID', 'main')}.jsonl")
    _real_open, _real_os_open = builtins.open, os.open

    def _record(path, how) -> None:
        try:
            path = os.path.abspath(os.fspath(path))
        except TypeError:  # a file descriptor
            return
        if path == _log_path:
            return
        with _real_open(_log_path, "a") as log:
            log.write(json.dumps({"path": path, "how": how}) + "\n")

    def _open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            _record(file, mode)
        return _real_open(file, mode, *args, **kwargs)

    def _os_open(path, flags, *args, **kwargs):
        if flags & _WRITE_FLAGS:
            _record(path, flags)
        return _real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = _open
    os.open = _os_open
