"""LAMA's data archive: its layout, and the one download that brings it to a machine.

LAMA (Petroni et al. 2019) ships every set in one archive, :data:`LAMA_DATA_URL`, whose
``data/`` folder holds ``ConceptNet/test.jsonl``, ``TREx/P*.jsonl`` with ``relations.jsonl``
(T-REx's templates and labels) and ``Google_RE/*_test.jsonl``. :func:`fetch_lama` unzips that
folder into ``cache_dir/lama_data`` for every set, so the first set fetched brings the others
and a machine downloads the archive once.

Why only the standard library: the archive is fetched once per machine, and urllib needs no
extra dependency. Why ``.part`` names and renames: an interrupted download or unzip must never
leave a file or folder that a later run takes for LAMA's data, so the zip is written under a
``.part`` name and renamed when complete, and the folder's entries are unzipped into a staging
folder and each moved into place whole.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from lamp_jax.errors import UsageError

LAMA_DATA_URL = "https://dl.fbaipublicfiles.com/LAMA/data.zip"
#: The archive in ``cache_dir`` while it is unzipped (and after, with ``keep_zip``).
ARCHIVE_NAME = "lama_data.zip"
#: The archive's unzipped ``data/`` folder, inside ``cache_dir`` (``config.data.cache_dir``).
CACHED_DATA_DIR = "lama_data"

CONCEPTNET_FILE = Path("ConceptNet", "test.jsonl")
TREX_DIR, GOOGLE_RE_DIR, RELATIONS_FILE = "TREx", "Google_RE", "relations.jsonl"
#: The entries of ``data/`` that each set reads: what makes a cached folder (or an archive)
#: hold that set.
SET_ENTRIES: dict[str, tuple[str, ...]] = {
    "conceptnet": (CONCEPTNET_FILE.parts[0],),
    "trex": (TREX_DIR, RELATIONS_FILE),
    "google_re": (GOOGLE_RE_DIR,),
}


def fetch_lama(
    lama_set: str,
    cache_dir: str | os.PathLike[str],
    *,
    url: str | None = None,
    keep_zip: bool = False,
    timeout_s: float = 60.0,
) -> Path:
    """LAMA's ``data/`` folder holding ``lama_set``, downloaded and unzipped into
    ``cache_dir/lama_data`` unless it holds that set already: what ``config.data.source="lama"``
    reads, for every set.

    The whole ``data/`` folder is unzipped (the entries the folder lacks), so one download
    serves every set. The archive (``url``, default :data:`LAMA_DATA_URL`) is removed after
    unzipping unless ``keep_zip``.

    Raises:
      UsageError: ``lama_set`` is not one of LAMA's sets.
      ConnectionError: the download failed (e.g. no internet); the message says where to put
        a copy made by hand so the next call finds it.
      ValueError: the archive is not a zip, or lacks the entries ``lama_set`` reads.
    """
    if lama_set not in SET_ENTRIES:
        raise UsageError(f"unknown LAMA set {lama_set!r}; choose one of {tuple(SET_ENTRIES)}")
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / CACHED_DATA_DIR
    needed = SET_ENTRIES[lama_set]
    if all((target / entry).exists() for entry in needed):
        return target
    url = LAMA_DATA_URL if url is None else url
    zip_path = _download(url, cache_dir / ARCHIVE_NAME, target, timeout_s)
    _unzip_data(zip_path, url, target, needed)
    if not keep_zip:
        zip_path.unlink(missing_ok=True)
    return target


def _download(url: str, zip_path: Path, target: Path, timeout_s: float) -> Path:
    """``zip_path``, downloaded from ``url`` unless it is there already (put there by hand)."""
    if zip_path.is_file():
        return zip_path
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    partial = zip_path.with_name(zip_path.name + ".part")
    try:
        with (
            urllib.request.urlopen(url, timeout=timeout_s) as response,
            partial.open("wb") as out,
        ):
            shutil.copyfileobj(response, out, length=1 << 20)
    except (urllib.error.URLError, OSError) as err:
        partial.unlink(missing_ok=True)
        raise ConnectionError(
            f"could not download the LAMA data archive from {url}: {err}. If this machine is "
            f"offline, download it elsewhere and copy its data/ folder to {target} (or the zip "
            f"to {zip_path})."
        ) from err
    partial.replace(zip_path)
    return zip_path


def _unzip_data(zip_path: Path, url: str, target: Path, needed: tuple[str, ...]) -> None:
    """The entries of the archive's ``data/`` that ``target`` lacks, moved into it whole."""
    staging = target.with_name(target.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.namelist() if m.startswith("data/")]
            lacking = [f"data/{entry}" for entry in needed
                       if not any(m == f"data/{entry}" or m.startswith(f"data/{entry}/")
                                  for m in members)]
            if lacking:
                raise ValueError(f"{zip_path} (from {url}) has no {' nor '.join(lacking)}: "
                                 "not LAMA's data archive")
            archive.extractall(staging, members)  # zipfile drops "..", absolute parts
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted((staging / "data").iterdir()):
            if not (target / entry.name).exists():
                entry.replace(target / entry.name)
    except zipfile.BadZipFile as err:
        zip_path.unlink(missing_ok=True)
        raise ValueError(f"{zip_path} (from {url}) is not a valid zip archive: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
