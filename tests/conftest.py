"""Test set-up: 8 fake CPU devices so multi-device code is exercised on any machine.

The flag must be set before JAX initialises its backends, hence here, before any test imports jax.
What tests need from outside the repository (torch, scikit-learn, CKBC data) they ask for with
``tests/needs.py``: a skip on a developer's machine, a failure in CI.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_run_dir(tmp_path_factory):
    """The embedded default run shortened to 20 epochs (its masks are specialized well before
    40), trained once per session. Tests that write into a run copy it first."""
    from lamp_jax.configs import default
    from lamp_jax.trainer import train_and_evaluate

    workdir = tmp_path_factory.mktemp("embedded_run")
    config = default.get_config()
    config.epochs, config.plots = 20, False
    train_and_evaluate(config, workdir, log=lambda *_: None)
    return workdir


# Interpreter teardown with torch (the test-only reference, also imported by transformers) and
# JAX/Orbax native threads both alive intermittently aborts (SIGABRT, empty stacks, after the
# summary is printed), turning a green run red. Once pytest has reported, leave without teardown.
_exit_status = {"code": 0}


def pytest_sessionfinish(session, exitstatus):
    _exit_status["code"] = int(exitstatus)


def pytest_unconfigure(config):
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status["code"])
