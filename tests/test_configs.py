"""Config files: the paper's setting is what it claims, and train.py's CLI wiring works."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lamp_jax.config_checks import validate_config

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))


@pytest.mark.parametrize("name", ["default", "runlocal", "bert_base_conceptnet",
                                  "roberta_base_conceptnet", "distilbert_conceptnet", "trex",
                                  "google_re", "modernbert_conceptnet"])
def test_configs_load(name):
    config = importlib.import_module(f"lamp_jax.configs.{name}").get_config()
    assert config.mask.mode in ("stochastic", "deterministic")
    assert config.batching in ("per_relation", "balanced")
    validate_config(config)


def test_lama_set_configs_are_lamas_setting_with_the_papers_recipe():
    paper = importlib.import_module("lamp_jax.configs.bert_base_conceptnet").get_config()
    for name, lama_set in (("trex", "trex"), ("google_re", "google_re")):
        c = importlib.import_module(f"lamp_jax.configs.{name}").get_config()
        # LAMA probes T-REx and Google-RE with bert-base-cased and its templates.
        assert (c.model, c.data.source, c.data.lama_set, c.data.prompts) == (
            "bert-base-cased", "lama", lama_set, "templates")
        same = ("mask", "optim", "loss", "batch_size", "epochs")
        assert {k: c.to_dict()[k] for k in same} == {k: paper.to_dict()[k] for k in same}
        assert c.data.relations == () and c.data.fractions == paper.data.fractions


def test_bert_base_config_is_the_papers_setting():
    c = importlib.import_module("lamp_jax.configs.bert_base_conceptnet").get_config()
    assert (c.model, c.data.source) == ("bert-base-uncased", "lama")
    assert (c.mask.first_layer, c.mask.last_layer) == (6, 11)
    assert (c.mask.init, c.mask.init_value, c.mask.tau) == ("constant", 1.0, 0.1)
    assert (c.optim.learning_rate, c.optim.warmup_fraction, c.optim.clip_norm) == (3e-4, 0.2, 5.0)
    assert (c.batch_size, c.epochs) == (32, 6)


@pytest.mark.slow
def test_train_py_command_line_and_its_compilation_cache(tmp_path):
    """The CLI with overrides, on a tiny local model (the test fixture of test_end_to_end);
    run twice into fresh workdirs with ``--config.compile_cache_dir``: the first run fills
    the cache, the second loads every program from it and compiles nothing new."""
    import os

    from tests.test_end_to_end import FIXTURE, make_tiny_model

    model = make_tiny_model(tmp_path / "model")
    cache = tmp_path / "compile_cache"
    # The session's own cache variable would win over the flag; every compile is cached here
    # (JAX's default skips compiles under 1 s, and the tiny model's all are).
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    entries = []
    for name in ("run", "again"):
        workdir = tmp_path / name
        cmd = [sys.executable, "train.py", "--config=configs/runlocal.py", f"--workdir={workdir}",
               f"--config.model={model}", f"--config.data.source={FIXTURE}",
               "--config.batch_size=2", "--config.mask.mode=deterministic",
               "--config.mask.init=normal", "--config.mask.init_value=1.0",
               f"--config.compile_cache_dir={cache}"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "done: test macro P@1" in done.stdout
        run = json.loads((workdir / "run.json").read_text())
        assert run["mask"]["mode"] == "deterministic" and run["config"]["batch_size"] == 2
        entries.append(sorted(p.name for p in cache.iterdir()))
    assert len(entries[0]) >= 3  # the prefix, the step and the ranking at least
    assert entries[1] == entries[0]  # nothing compiled again
