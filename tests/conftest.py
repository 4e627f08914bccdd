"""Test set-up: 8 fake CPU devices so multi-device code is exercised on any machine.

The flag must be set before JAX initialises its backends, hence here, before any test imports jax.
What tests need from outside the repository (torch, scikit-learn, CKBC data) they ask for with
``tests/needs.py``: a skip on a developer's machine, a failure in CI.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One persistent compilation cache for the whole session: the xdist workers inherit this
# process's environment, and so do the train.py processes tests start, so a program compiled
# by one test (the step, the ranking, the prefix of a shape) is loaded by the others instead of
# compiled again. It only changes when compilation happens, never what runs.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), f"lamp_jax_test_compile_cache_{os.getpid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILE_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build_once(tmp_path_factory, name: str, build) -> Path:
    """``build(directory)`` run once per test session, whatever the number of xdist workers:
    the first worker to ask builds it under a file lock, the others wait for it and reuse it.
    Callers treat the directory as read-only (copy it to write into a run)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # <session temp>/popen-gw<N>: share the parent
        base = base.parent
    directory = base / f"shared_{name}"
    with FileLock(str(directory) + ".lock"):
        if not (directory / ".built").exists():
            if directory.exists():  # a build that failed half way
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            build(directory)
            (directory / ".built").touch()
    return directory


EMBEDDED_RUN_ARGS = ("--config.plots=False", "--config.epochs=20")


@pytest.fixture(scope="session")
def embedded_run_dir(tmp_path_factory) -> Path:
    """``python train.py`` on the embedded default shortened to 20 epochs (its masks are
    specialized well before 40), in a fresh process as a user runs it (2 CPU devices here),
    trained once per session. It is also the uninterrupted reference of the kill -9 soak test.
    Tests that write into a run copy it first."""

    def build(directory: Path) -> None:
        done = subprocess.run(
            [sys.executable, "train.py", f"--workdir={directory / 'run'}", *EMBEDDED_RUN_ARGS],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    return build_once(tmp_path_factory, "embedded_run", build) / "run"


# A short run of the embedded default (9 steps, checkpoints at 3, 6 and 9): the uninterrupted
# reference of the storage-fault and workdir-lock drills.
SHORT_RUN_ARGS = ("--config.epochs=3", "--config.plots=False", "--config.specialization=False",
                  "--config.controls.enabled=False")


@pytest.fixture(scope="session")
def short_run_dir(tmp_path_factory) -> Path:
    """``python train.py`` with :data:`SHORT_RUN_ARGS`, in a fresh process, once per session."""

    def build(directory: Path) -> None:
        done = subprocess.run(
            [sys.executable, "train.py", f"--workdir={directory / 'run'}", *SHORT_RUN_ARGS],
            cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    return build_once(tmp_path_factory, "short_run", build) / "run"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer BERT covering the LAMA fixture's words (tests/test_end_to_end.py)."""
    from tests.test_end_to_end import make_tiny_model

    return build_once(tmp_path_factory, "tiny_model", lambda d: make_tiny_model(d / "model")
                      ) / "model"


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict]:
    """train_and_evaluate of the tiny model on the LAMA fixture (``_config``: every relation's
    mask prunes), trained once per session; ``(workdir, summary)``."""
    from tests.test_end_to_end import _config

    def build(directory: Path) -> None:
        from lamp_jax.loop import train_and_evaluate

        summary = train_and_evaluate(_config(tiny_model_dir), directory / "run",
                                     log=lambda *_: None)
        (directory / "summary.json").write_text(json.dumps(summary))

    directory = build_once(tmp_path_factory, "tiny_run", build)
    return directory / "run", json.loads((directory / "summary.json").read_text())


# Interpreter teardown with torch (the test-only reference, also imported by transformers) and
# JAX/Orbax native threads both alive intermittently aborts (SIGABRT, empty stacks, after the
# summary is printed), turning a green run red. Once pytest has reported, leave without teardown.
_exit_status = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(
            "JAX_COMPILATION_CACHE_DIR") == COMPILE_CACHE:  # the session's own, not a user's
        shutil.rmtree(COMPILE_CACHE, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status["code"])
