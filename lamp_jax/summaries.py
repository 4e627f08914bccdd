"""TensorBoard scalars of a training run, written next to ``metrics.jsonl``.

    %tensorboard --logdir runs/        # in Colab / Jupyter: every run under runs/, live

What is written, at every dev evaluation: ``train/ce`` (mean over relations with data),
``dev/macro_P1``, ``dev/micro_P1``, ``dev_P1/<relation>`` (P@1; TensorBoard tags allow no
"@"; relations with dev prompts) and ``sparsity/<relation>`` (the fraction of masked weights
the binary mask prunes).

Why tensorboardX: it writes TensorBoard's event files with protobuf alone. ``tf.summary`` and
flax's ``clu.metric_writers`` need TensorFlow, hundreds of MB that nothing else here uses. Only
process 0 writes. The events are written synchronously (tensorboardX's record writer, not its
``SummaryWriter``): ``SummaryWriter.flush()`` flushes the file but not the queue its writer
thread drains, so an evaluation's scalars could reach the file, and a bucket, only with the
next flush 30 s later (measured: 40 bytes, the header alone, after ``add_scalar`` and
``flush``). A resumed run starts its file with a purge marker at the resumed step, as
``SummaryWriter(purge_step=...)`` does, so TensorBoard drops the events the interrupted run
logged past its last checkpoint.

A run directory in a bucket (``gs://...``, :mod:`lamp_jax.paths`): the events are written to a
local temporary directory and copied into the run directory at every write, through the same
``etils.epath`` as every other file of the run (tensorboardX's own gs:// and s3:// writers
would each need a client library and credentials of their own).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from lamp_jax.hosts import is_main
from lamp_jax.paths import as_path, is_url


class ScalarWriter:
    """Writes scalars to ``workdir`` on process 0 (a no-op elsewhere); each :meth:`write` is
    in the file (and in a bucket) when it returns."""

    def __init__(self, workdir: str | os.PathLike, start_step: int = 0):
        self._writer = None
        self._staging = None  # a URL workdir: (local directory written to, the workdir)
        if is_main():
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            logdir = os.fspath(workdir)
            if is_url(workdir):
                local = tempfile.TemporaryDirectory(prefix="lamp_jax_events_")
                self._staging = (local, as_path(workdir))
                logdir = local.name
            os.makedirs(logdir, exist_ok=True)
            # tensorboardX names files by the second and the host: a run resumed within the
            # second it stopped would overwrite the stopped one's file without a suffix.
            self._writer = EventsWriter(os.path.join(logdir, "events"),
                                        filename_suffix=f".{uuid.uuid4().hex[:8]}")
            if start_step:  # TensorBoard hides what the old file logged from here on
                self._writer.write_event(Event(step=start_step, wall_time=time.time(),
                                               session_log=SessionLog(
                                                   status=SessionLog.START)))
            self._writer.flush()

    def write(self, step: int, scalars: Mapping[str, float | None]) -> None:
        if self._writer is None:
            return
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for name, value in scalars.items():
            # None / NaN: nothing measured (no train data this step, no dev prompts).
            if value is not None and not math.isnan(value):
                self._writer.write_event(Event(step=step, wall_time=now,
                                               summary=scalar(name, float(value))))
        self._writer.flush()  # TensorBoard shows each evaluation as it happens
        self._upload()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._upload()
            if self._staging is not None:
                self._staging[0].cleanup()
            self._writer = self._staging = None

    def _upload(self) -> None:
        """Copies the staged event files into a URL workdir (whole files: objects)."""
        if self._staging is None:
            return
        local, target = self._staging
        for file in sorted(Path(local.name).iterdir()):
            (target / file.name).write_bytes(file.read_bytes())
