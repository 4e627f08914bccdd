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
"""

from __future__ import annotations

import io
import os
import re
from typing import Any

import numpy as np
from etils import epath

# Opened by etils.epath and by Orbax/TensorStore alike; any other "scheme://" is refused rather
# than taken for a local directory.
URL_SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

PathLike = str | os.PathLike


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


def append_text(path: PathLike, text: str) -> None:
    """Appends ``text`` to ``path`` (in a bucket: rewrites the object with ``text`` added)."""
    path = as_path(path)
    if not is_url(path):
        with open(path, "a") as f:
            f.write(text)
        return
    old = path.read_text() if path.exists() else ""
    path.write_text(old + text)


def save_npz(path: PathLike, **arrays: Any) -> None:
    """``np.savez_compressed`` to a local path or a URL."""
    path = as_path(path)
    if not is_url(path):
        np.savez_compressed(path, **arrays)
        return
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.write_bytes(buffer.getvalue())


def load_npz(path: PathLike):
    """``np.load`` of an ``.npz`` from a local path or a URL (use it as a context manager)."""
    path = as_path(path)
    return np.load(io.BytesIO(path.read_bytes()) if is_url(path) else path)


def save_figure(fig, path: PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` to a local path or a URL (the format from the file's suffix)."""
    path = as_path(path)
    if not is_url(path):
        fig.savefig(path, **kwargs)
        return
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or None, **kwargs)
    path.write_bytes(buffer.getvalue())
