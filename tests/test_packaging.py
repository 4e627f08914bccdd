"""What `pip install` gives a user: the package with its configs and embedded model, and the
console commands (`lamp-jax` and its three aliases); packaged configs by name on the command
line."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lamp_jax.cli import CONFIG_DIR, resolve_config_argument
from lamp_jax.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_configs_model_and_console_commands(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(REPO)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("lamp_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names
                            if n.endswith("entry_points.txt"))
    for config in ("default", "runlocal", "bert_base_conceptnet"):
        assert f"lamp_jax/configs/{config}.py" in names
    for asset in ("config.json", "model.safetensors", "vocab.txt", "lama_probe.jsonl"):
        assert f"lamp_jax/assets/embedded_mlm/{asset}" in names
    assert not any(n.startswith(("tests/", "configs/", "bench/")) for n in names)
    for command, target in (("lamp-jax", "lamp_jax.cli:main"),
                            ("lamp-jax-train", "lamp_jax.cli:train"),
                            ("lamp-jax-evaluate", "lamp_jax.cli:evaluate"),
                            ("lamp-jax-report", "lamp_jax.cli:report")):
        assert f"{command} = {target}" in entry_points


def test_config_names_resolve_to_packaged_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout, as after pip install
    packaged = str(CONFIG_DIR / "runlocal.py")
    assert resolve_config_argument(["x", "--config=runlocal", "--workdir=w"]) == [
        "x", f"--config={packaged}", "--workdir=w"]
    assert resolve_config_argument(["x", "--config", "configs/runlocal.py"]) == [
        "x", "--config", packaged]
    assert resolve_config_argument(["x", "--config=runlocal:arg"]) == [
        "x", f"--config={packaged}:arg"]
    mine = tmp_path / "mine.py"
    mine.write_text("")
    assert resolve_config_argument(["x", f"--config={mine}"]) == ["x", f"--config={mine}"]
    with pytest.raises(UsageError, match="not a packaged config .*default, "):
        resolve_config_argument(["x", "--config=nope"])
    with pytest.raises(UsageError, match="no such file"):
        resolve_config_argument(["x", "--config=elsewhere/default.py"])
