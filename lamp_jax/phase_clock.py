"""Wall seconds per phase of a run and its peak memory: what ``metrics.json``'s ``resources``
and the last line of a run say (``wall seconds per phase: ...``)."""

from __future__ import annotations

import time
from typing import Any

import jax

from lamp_jax.hosts import peak_rss_bytes


class PhaseClock:
    """Wall seconds per phase of a run (load, setup, steps, evaluation, checkpoints, report)
    and peak memory. A lap ends a phase; ``lap(phase, arrays)`` first waits for the device
    work behind ``arrays``, so asynchronous steps are charged to "steps"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started_unix = time.time()
        self._start = self._mark = time.perf_counter()
        self.timeline: list[tuple[str, float, float]] = []  # (phase, from s, to s)

    def lap(self, phase: str, arrays: Any = None) -> None:
        if arrays is not None:
            jax.block_until_ready(arrays)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        self.timeline.append((phase, round(self._mark - self._start, 3),
                              round(now - self._start, 3)))
        self._mark = now

    def resources(self) -> dict[str, Any]:
        device_peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
                        for d in jax.local_devices() if d.platform != "cpu"]
        return {"phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "phase_timeline": self.timeline, "started_unix": self.started_unix,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_device_bytes": max([p for p in device_peaks if p], default=None)}

    def summary(self) -> str:
        res = self.resources()
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
        device = (f", peak device memory {res['peak_device_bytes'] / 2**30:.2f} GiB"
                  if res["peak_device_bytes"] else "")
        return (f"wall seconds per phase: {phases}; peak RSS "
                f"{res['peak_rss_bytes'] / 2**30:.2f} GiB{device}")
