"""What a test needs from outside the repository: a module of the dev install, a data file.

Every such need is part of the dev install (``requirements-dev.txt``) or of the workspace
(``../shared/data``), so in CI (``CI`` set to true, as ``.ci/run`` does) a missing one FAILS the
test: a test that skips there would pass without having run. Elsewhere it skips, with the
reason and the fix.

These live here rather than in ``conftest.py``: test modules import them, and importing
``conftest`` as a module makes a second copy of it next to the one pytest loaded.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

import pytest

# ConceptNet CKBC (Li et al. 2016), next to the checkout as design.md describes; read at run time,
# never copied into the repository. LAMP_JAX_CKBC_DIR points elsewhere.
CKBC_DIR = Path(os.environ.get("LAMP_JAX_CKBC_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data"
                               / "conceptnet_ckbc"))


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a need of the dev install may not be skipped)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """``import module``; when it is missing: a failure in CI, a skip elsewhere. Works at
    module level (a whole file) and inside a test."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        _missing(f"{module} is not importable ({err}); pip install -r requirements-dev.txt")
        raise  # not reached: _missing raises


def require_path(path: str | Path, what: str) -> Path:
    """``path`` when it exists; otherwise a failure in CI, a skip elsewhere."""
    path = Path(path)
    if not path.exists():
        _missing(f"{what} not found at {path}")
    return path
