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


def read_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file in ``directory``: ``{tag: {step: value}}``."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset:offset + 8]
            (length,) = struct.unpack("<Q", header)
            (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
            assert length_crc == masked_crc(header), f"{path}: bad length checksum"
            record = data[offset + 12:offset + 12 + length]
            (record_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
            assert record_crc == masked_crc(record), f"{path}: bad record checksum"
            offset += 16 + length
            event = Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_crc32c_known_answer():
    assert crc32c(b"123456789") == 0xE3069283


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
