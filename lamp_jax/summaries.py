"""TensorBoard scalars of a training run, written next to ``metrics.jsonl``.

    %tensorboard --logdir runs/        # in Colab / Jupyter: every run under runs/, live

What is written, at every dev evaluation: ``train/ce`` (mean over relations with data),
``dev/macro_P1``, ``dev/micro_P1``, ``dev_P1/<relation>`` (P@1; TensorBoard tags allow no
"@"; relations with dev prompts) and ``sparsity/<relation>`` (the fraction of masked weights
the binary mask prunes).

The event files are written here, by :func:`event_record`: TensorBoard's format is a TFRecord
file of ``Event`` protocol buffers, and the few fields scalars need (wall time, step, a tag and
a float, the file version, a session start) take a dozen lines to encode. ``tf.summary`` and
flax's ``clu.metric_writers`` need TensorFlow, hundreds of MB that nothing else here uses;
tensorboardX, used before, imports torch wherever torch is installed (about 1 s of import
time in every process, measured with ``python -X importtime``). Each write is in the file
when it returns (flushed; tensorboardX's ``SummaryWriter.flush()`` did not drain its writer
thread's queue). A resumed run starts its
file with a session start at the resumed step, as ``SummaryWriter(purge_step=...)`` did, so
TensorBoard drops the events the interrupted run logged past its last checkpoint.

A run directory in a bucket (``gs://...``, :mod:`lamp_jax.paths`): the events are written to a
local temporary directory and copied into the run directory at every write, through the same
``etils.epath`` as every other file of the run (tensorboardX's own gs:// and s3:// writers
would each need a client library and credentials of their own).
"""

from __future__ import annotations

import math
import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from lamp_jax.hosts import is_main
from lamp_jax.paths import as_path, is_url, storage_write, write_bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protocol-buffer field: its key, then the payload (length-prefixed for type 2)."""
    length = _varint(len(payload)) if wire_type == 2 else b""
    return _varint(number << 3 | wire_type) + length + payload


def event_bytes(wall_time: float, step: int, *, scalar: tuple[str, float] | None = None,
                file_version: str | None = None, session_start: bool = False) -> bytes:
    """An ``Event`` (tensorboard/compat/proto/event.proto) encoded as the protobuf library
    does: wall_time = 1 (double), step = 2 (int64, left out when 0, proto3's default),
    file_version = 3, summary = 5 (``Summary.value`` = 1: ``tag`` = 1, ``simple_value`` = 2,
    a float), session_log = 7 (``status`` = 1, START = 1)."""
    out = _field(1, 1, struct.pack("<d", wall_time))
    if step:
        out += _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if scalar is not None:
        tag, value = scalar
        summary_value = _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", value))
        out += _field(5, 2, _field(1, 2, summary_value))
    if session_start:
        out += _field(7, 2, _field(1, 0, _varint(1)))
    return out


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """The record format's checksum: CRC-32C (Castagnoli), rotated and offset ("masked")."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def event_record(event: bytes) -> bytes:
    """One TFRecord: length (uint64), its checksum, the data, the data's checksum."""
    header = struct.pack("<Q", len(event))
    return (header + struct.pack("<I", _masked_crc32c(header)) + event
            + struct.pack("<I", _masked_crc32c(event)))


class ScalarWriter:
    """Writes scalars to ``workdir`` on process 0 (a no-op elsewhere); each :meth:`write` is
    in the file (and in a bucket) when it returns."""

    def __init__(self, workdir: str | os.PathLike, start_step: int = 0):
        self._file = None
        self._staging = None  # a URL workdir: (local directory written to, the workdir)
        if is_main():
            logdir = os.fspath(workdir)
            if is_url(workdir):
                local = tempfile.TemporaryDirectory(prefix="lamp_jax_events_")
                self._staging = (local, as_path(workdir))
                logdir = local.name
            os.makedirs(logdir, exist_ok=True)
            # TensorBoard reads files named *tfevents*. The second and the host, as
            # TensorFlow names them, and a random suffix: a run resumed within the second it
            # stopped must not write into the stopped one's file.
            name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}."
                    f"{uuid.uuid4().hex[:8]}")
            self._path = os.path.join(logdir, name)
            now = time.time()
            records = [event_record(event_bytes(now, 0, file_version="brain.Event:2"))]
            if start_step:  # TensorBoard hides what the old file logged from here on
                records.append(event_record(event_bytes(now, start_step, session_start=True)))
            self._file = storage_write(self._path, lambda: open(self._path, "wb"))  # noqa: SIM115
            self._append(records)

    def write(self, step: int, scalars: Mapping[str, float | None]) -> None:
        if self._file is None:
            return
        now = time.time()
        # None / NaN: nothing measured (no train data this step, no dev prompts).
        self._append([event_record(event_bytes(now, step, scalar=(name, float(value))))
                      for name, value in scalars.items()
                      if value is not None and not math.isnan(value)])
        self._upload()

    def _append(self, records: list[bytes]) -> None:
        """Writes ``records`` and flushes: TensorBoard shows each evaluation as it happens."""
        def append() -> None:
            for record in records:
                self._file.write(record)
            self._file.flush()

        storage_write(self._path, append)

    def close(self) -> None:
        if self._file is not None:
            storage_write(self._path, self._file.close)
            self._upload()
            if self._staging is not None:
                self._staging[0].cleanup()
            self._file = self._staging = None

    def _upload(self) -> None:
        """Copies the staged event files into a URL workdir (whole files: objects)."""
        if self._staging is None:
            return
        local, target = self._staging
        for file in sorted(Path(local.name).iterdir()):
            write_bytes(target / file.name, file.read_bytes())
