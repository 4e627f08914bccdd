"""TensorBoard event files of a run, read back with an independent reader of the record format
and checked against metrics.jsonl; the on-device pruned fraction against sparsity_stats."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest

from lamp_jax.api import load_run
from lamp_jax.masks import MaskSpec, pruned_fraction, sparsity_stats
from lamp_jax.run_dir import RunDirectory
from lamp_jax.summaries import ScalarWriter, event_bytes, event_record


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: the checksum TensorBoard's record format uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list:
    """The events of one file, each record's checksums checked, decoded by the protobuf
    library (tensorboardX's compiled event.proto)."""
    from tensorboardX.proto.event_pb2 import Event

    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
        assert length_crc == masked_crc(header), f"{path}: bad length checksum"
        record = data[offset + 12:offset + 12 + length]
        (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
        assert record_crc == masked_crc(record), f"{path}: bad record checksum"
        offset += 16 + length
        events.append(Event.FromString(record))
    return events


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file in ``directory``: ``{tag: {step: value}}``."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283


def test_events_are_byte_for_byte_what_tensorboardx_protobuf_encodes():
    """Our hand-encoded Event protos equal the protobuf library's encoding (tensorboardX's
    compiled event.proto), field by field: scalars (ASCII and not, large steps), the file
    version, and the session start a resumed run begins with."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    from tensorboardX.proto.summary_pb2 import Summary

    cases = [
        (event_bytes(1733350000.25, 0, file_version="brain.Event:2"),
         Event(wall_time=1733350000.25, step=0, file_version="brain.Event:2")),
        (event_bytes(12.5, 3, scalar=("dev/macro_P1", 0.625)),
         Event(wall_time=12.5, step=3, summary=Summary(value=[
             Summary.Value(tag="dev/macro_P1", simple_value=0.625)]))),
        (event_bytes(7.0, 2 ** 40 + 5, scalar=("dev_P1/P19 (place of birth) é", -1.5e-8)),
         Event(wall_time=7.0, step=2 ** 40 + 5, summary=Summary(value=[
             Summary.Value(tag="dev_P1/P19 (place of birth) é", simple_value=-1.5e-8)]))),
        (event_bytes(9.0, 12, session_start=True),
         Event(wall_time=9.0, step=12, session_log=SessionLog(status=SessionLog.START))),
    ]
    for ours, theirs in cases:
        assert ours == theirs.SerializeToString()
    record = event_record(cases[1][0])
    assert struct.unpack("<Q", record[:8])[0] == len(cases[1][0])
    assert struct.unpack("<I", record[8:12])[0] == masked_crc(record[:8])
    assert struct.unpack("<I", record[-4:])[0] == masked_crc(cases[1][0])


def test_a_resumed_writer_starts_its_file_with_a_session_start_at_its_step(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    writer = ScalarWriter(tmp_path, start_step=12)
    writer.write(15, {"dev/macro_P1": 0.5, "train/ce": None})
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    events = read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert (events[1].step, events[1].session_log.status) == (12, SessionLog.START)
    assert [(e.step, [(v.tag, v.simple_value) for v in e.summary.value])
            for e in events[2:]] == [(15, [("dev/macro_P1", 0.5)])]


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # the tiny model's run, every relation's mask prunes (tests/conftest.py)


def test_training_writes_tensorboard_scalars_that_match_metrics_jsonl(run):
    workdir, summary = run
    scalars = read_scalars(workdir)
    history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in history]
    assert steps == [2, 4, 6] and steps == [h["step"] for h in summary["history"]]
    relations = summary["relations"]
    with_dev = {row["relation"] for row in json.loads((workdir / "split.json").read_text())["dev"]}
    assert 0 < len(with_dev) < len(relations)  # a relation without dev prompts gets no dev_P1
    assert set(scalars) == {"train/ce", "dev/macro_P1", "dev/micro_P1",
                            *(f"dev_P1/{r}" for r in relations if r in with_dev),
                            *(f"sparsity/{r}" for r in relations)}
    for name, values in scalars.items():
        assert sorted(values) == steps, name
    for record in history:
        step = record["step"]
        assert scalars["dev/macro_P1"][step] == pytest.approx(record["dev_macro_P@1"], abs=1e-6)
        assert scalars["dev/micro_P1"][step] == pytest.approx(record["dev_micro_P@1"], abs=1e-6)
        assert scalars["train/ce"][step] == pytest.approx(record["train_ce"], rel=1e-6)
        per = [scalars[f"dev_P1/{r}"][step] for r in relations if r in with_dev]
        assert np.mean(per) == pytest.approx(record["dev_macro_P@1"], abs=1e-6)
    # Each relation's logged sparsity is that of its own masks: at the best step, of the best
    # masks (metrics.json); at the last step, of the final state. The relations' values
    # differ, so a permutation of relations would show.
    best = max(h["step"] for h in history if h.get("best"))
    logged = [scalars[f"sparsity/{r}"][best] for r in relations]
    np.testing.assert_allclose(logged, summary["sparsity"]["total"], atol=1e-6)
    final = sparsity_stats(RunDirectory(workdir).latest_masks(), load_run(workdir).spec,
                           0.5)["total"]
    np.testing.assert_allclose([scalars[f"sparsity/{r}"][steps[-1]] for r in relations], final,
                               atol=1e-6)
    assert len({round(v, 6) for v in logged}) == len(relations) and min(logged) > 0


def test_pruned_fraction_equals_sparsity_stats_total():
    rng = np.random.default_rng(0)
    spec = MaskSpec((0, 1), ("query", "ffn_in"))
    tree = {f"layer_{i}": {"attention": {"query": {"kernel": rng.normal(size=(3, 4, 4))}},
                           "ffn_in": {"kernel": rng.normal(size=(3, 4, 8))}} for i in (0, 1)}
    tree = jax.tree.map(lambda x: x.astype(np.float32), tree)
    for threshold in (0.5, 0.3):
        np.testing.assert_allclose(pruned_fraction(tree, threshold),
                                   sparsity_stats(tree, spec, threshold)["total"], rtol=1e-6)
