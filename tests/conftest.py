"""Test set-up: 8 fake CPU devices so multi-device code is exercised on any machine.

The flag must be set before JAX initialises its backends, hence here, before any test imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
