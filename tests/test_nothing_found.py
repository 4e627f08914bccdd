"""The controls can say "nothing found": a model that knows nothing (a hub-format BERT with
random weights, transformers' own initialisation) trained on LAMA ConceptNet-format prompts
shows no lead over the answer-type baselines beyond their intervals; and the report sets such a
random-weight run beside the pretrained one."""

from __future__ import annotations

import json
import shutil

import pytest

from lamp_jax.configs import default
from lamp_jax.embedded import ensure_embedded_model
from lamp_jax.loop import train_and_evaluate
from lamp_jax.sweep import with_overrides
from tests.conftest import EMBEDDED_RUN_ARGS
from tests.needs import require

transformers = require("transformers")


def _random_hub_bert(directory):
    """The embedded model's architecture and tokenizer, weights drawn by transformers'
    ``BertForMaskedLM`` initialisation and saved with ``save_pretrained``."""
    embedded = ensure_embedded_model()
    config = transformers.BertConfig.from_pretrained(embedded)
    require("torch").manual_seed(0)
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        if (embedded / name).exists():
            shutil.copy(embedded / name, directory / name)
    return directory, embedded / "lama_probe.jsonl"


def _config(**overrides):
    c = default.get_config()
    c.epochs, c.plots = 20, False  # as EMBEDDED_RUN_ARGS
    return with_overrides(c, overrides)


def test_masks_on_a_model_that_knows_nothing_find_nothing_beyond_the_answer_type(tmp_path):
    model, prompts = _random_hub_bert(tmp_path / "model")
    summary = train_and_evaluate(_config(model=str(model), **{"data.source": str(prompts)}),
                                 tmp_path / "run", log=lambda *_: None)
    controls = summary["controls"]
    # Its subnetworks learn which answers a relation takes (the full model knows nothing)...
    assert summary["test"]["full"]["macro_P@1"] < 0.05
    assert summary["test"]["pruned"]["macro_P@1"] > 0.05
    # ...and nothing beyond them: no lead over the typed ranking or the relation prior that
    # the intervals can tell from zero.
    for key in ("pruned - full_typed", "pruned - prior"):
        macro = controls["intervals"][key]["macro"]
        assert not macro["excludes_zero"], (key, macro)


def test_the_report_sets_a_random_weight_run_beside_the_pretrained_one(embedded_run_dir,
                                                                        tmp_path):
    """``lamp-jax report --control B``: the same recipe on random weights of the same
    architecture (config.model_weights="random"), its subnetworks and the interval of the
    difference over the same held-out facts."""
    from lamp_jax.cli import main

    assert EMBEDDED_RUN_ARGS == ("--config.plots=False", "--config.epochs=20")
    run = tmp_path / "pretrained"
    shutil.copytree(embedded_run_dir, run)
    control = tmp_path / "random"
    summary = train_and_evaluate(_config(model_weights="random"), control, log=lambda *_: None)
    assert main(["report", f"--workdir={run}", f"--control={control}", "--max-size=1"]) == 0
    found = json.loads((run / "report" / "findings.json").read_text())["random_weights"]
    assert found["model_weights"] == "random"
    assert found["pruned"] == pytest.approx(summary["test"]["pruned"]["macro_P@1"])
    pretrained = json.loads((run / "metrics.json").read_text())["test"]["pruned"]["macro_P@1"]
    macro = found["interval"]["macro"]
    assert macro["observed"] == pytest.approx(pretrained - found["pruned"])
    assert macro["excludes_zero"] and macro["low"] > 0.2  # the pretrained model knows more
    assert "subnetworks of a random-weight model" in (run / "report" / "index.md").read_text()
