"""Runs one command as N joined JAX processes on this machine (a pod in miniature).

    lamp-jax launch --processes 2 -- lamp-jax train --workdir runs/two
    lamp-jax launch --processes 2 -- lamp-jax evaluate --workdir runs/two

Every process gets the environment that ``train.py``, ``lamp_jax.evaluate`` and
``lamp_jax.report`` read to join the run (:mod:`lamp_jax.hosts`): a loopback coordinator
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. On
a CPU each process gets ``--devices-per-process`` devices (default: the cores divided among
the processes). Process 0's output is shown as is; the others' lines are prefixed with their
index. When a process fails, the others are stopped after ``--grace`` seconds (they normally
stop by themselves sooner, when the coordinator misses the dead process's heartbeats) and the
launcher exits with the first failure's code. A SIGTERM to the launcher (a scheduler's
preemption notice) is passed on to every process: train.py and the sweep save their state at
one step and exit with status 75, and so does the launcher. ``python -m lamp_jax.launch`` is
``lamp-jax launch`` (:mod:`lamp_jax.cli`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.hosts import (
    ENV_ADDRESS,
    ENV_HEARTBEAT,
    ENV_PROCESS_ID,
    ENV_PROCESSES,
    PREEMPTED_EXIT,
)
from lamp_jax.placement import available_cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_environments(processes: int, port: int, devices_per_process: int,
                         heartbeat_timeout: int, base: dict[str, str] | None = None
                         ) -> list[dict[str, str]]:
    """The environment of each process: coordinator, process count and id, CPU devices."""
    base = dict(os.environ if base is None else base)
    flags = " ".join(f for f in base.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    envs = []
    for index in range(processes):
        env = dict(base)
        env.update({ENV_ADDRESS: f"127.0.0.1:{port}", ENV_PROCESSES: str(processes),
                    ENV_PROCESS_ID: str(index), ENV_HEARTBEAT: str(heartbeat_timeout),
                    "XLA_FLAGS": (flags + " --xla_force_host_platform_device_count="
                                  f"{devices_per_process}").strip()})
        envs.append(env)
    return envs


def _relay(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(prefix + line)
        sys.stdout.flush()


def launch(command: Sequence[str], processes: int, devices_per_process: int = 0,
           grace: float = 30.0, heartbeat_timeout: int = 20, port: int = 0) -> int:
    """Starts ``command`` ``processes`` times, joined; returns 0 or the first failure's code."""
    if processes < 1:
        raise UsageError(f"--processes must be >= 1, got {processes}")
    if not command:
        raise UsageError("no command given; e.g. -- lamp-jax train")
    if shutil.which(command[0]) is None:
        raise MissingFileError(f"{command[0]}: no such command (the command after -- must be a "
                               "program on PATH or the path of one, e.g. -- lamp-jax train)")
    devices = devices_per_process or max(1, available_cores() // processes)
    envs = process_environments(processes, port or free_port(), devices, heartbeat_timeout)
    children, relays = [], []
    for index, env in enumerate(envs):
        child = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1)
        children.append(child)
        relay = threading.Thread(target=_relay,
                                 args=(child.stdout, "" if index == 0 else f"[{index}] "),
                                 daemon=True)
        relay.start()
        relays.append(relay)
    failure: tuple[int, int] | None = None
    failed_at = None

    def forward(signum: int, frame) -> None:
        # A scheduler's SIGTERM (a preemption notice) reaches every process of the run: each
        # saves at the step they agree on and exits with hosts.PREEMPTED_EXIT.
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if on_main_thread else None
    try:
        while any(c.poll() is None for c in children):
            for index, child in enumerate(children):
                code = child.poll()
                if code not in (None, 0) and failure is None:
                    failure, failed_at = (index, code), time.monotonic()
                    print(f"launch: process {index} exited with {_describe(code)}; the others "
                          f"stop by themselves or are stopped in {grace:.0f} s",
                          file=sys.stderr, flush=True)
            if failure is not None and time.monotonic() - failed_at > grace:
                for child in children:
                    if child.poll() is None:
                        child.kill()
            time.sleep(0.2)
    except KeyboardInterrupt:
        for child in children:
            child.send_signal(signal.SIGINT)
        for child in children:
            child.wait()
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for relay in relays:
        relay.join(timeout=5)
    codes = [c.returncode for c in children]
    if failure is None:
        failure = next(((i, c) for i, c in enumerate(codes) if c), None)
    if failure is not None:
        resumable = all(c == PREEMPTED_EXIT for c in codes)  # every process said "rerun me"
        verdict = ("stopped; run the same command again to resume" if resumable else "failed")
        print(f"launch: {verdict}; exit codes by process: "
              f"{', '.join(f'{i}: {_describe(c)}' for i, c in enumerate(codes))}",
              file=sys.stderr, flush=True)
        return failure[1] if failure[1] > 0 else 128 - failure[1]
    return 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


if __name__ == "__main__":
    from lamp_jax.cli import launch as launch_command

    sys.exit(launch_command())
