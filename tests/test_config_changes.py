"""A resume compares everything that shapes the trajectory (lamp_jax.config_changes): a change
is refused listing every difference, or, with config.on_config_change=continue, recorded in
metrics.jsonl, run.json's config_history, metrics.json and the report; fields that cannot
change the result never block a resume."""

from __future__ import annotations

import importlib
import json
import pkgutil

import pytest

import lamp_jax.configs
from lamp_jax.config_changes import FREE, LAYOUT, RESUME_FIELDS, TRAJECTORY, config_changes, flatten
from lamp_jax.config_checks import validate_config
from lamp_jax.configs import default
from lamp_jax.errors import UsageError
from lamp_jax.loop import train_and_evaluate
from lamp_jax.report import _index
from lamp_jax.run_dir import RunDirectory
from tests.test_end_to_end import _config

QUIET = {"log": lambda *_: None}
# What the issue names as shaping the trajectory, and as never blocking a resume.
SHAPES = ("optim.learning_rate", "optim.schedule", "seed", "epochs", "batch_size", "batching",
          "mask.init", "mask.init_value", "mask.tau", "mask.threshold", "mask.ste_grad",
          "mask.eval_kind", "optim.clip_norm", "optim.weight_decay", "optim.moment_dtype",
          "dtype", "loss.sparsity_weight", "data.split", "data.fractions", "data.seed",
          "data.source", "data.max_length", "eval_every")
NEVER_BLOCKS = ("plots", "compile_cache_dir", "stop_after", "on_nonfinite",
                "on_unreadable_checkpoints", "on_config_change", "cpu_devices",
                "relation_chunk", "relation_parallelism", "specialization")


def test_every_field_of_every_packaged_config_has_its_decision_in_the_table():
    fields = set()
    for module in pkgutil.iter_modules(lamp_jax.configs.__path__):
        config = importlib.import_module(f"lamp_jax.configs.{module.name}").get_config()
        fields |= set(flatten(config.to_dict()))
    assert fields == set(RESUME_FIELDS)  # none undecided, none stale
    assert set(RESUME_FIELDS.values()) == {TRAJECTORY, LAYOUT, FREE}
    assert all(RESUME_FIELDS[f] == TRAJECTORY for f in SHAPES)
    assert all(RESUME_FIELDS[f] == FREE for f in NEVER_BLOCKS)
    # The relation set and the mask layout are the checkpoints' shape (check_resumable).
    assert all(RESUME_FIELDS[f] == LAYOUT for f in ("data.relations", "mask.first_layer",
                                                    "mask.last_layer", "mask.matrices"))


def test_changes_list_trajectory_fields_old_and_new_and_nothing_else():
    before, now = default.get_config(), default.get_config()
    now.optim.learning_rate, now.data.fractions, now.plots, now.relation_chunk = 1.0, (
        0.6, 0.2, 0.2), False, 4
    now.mask.first_layer = 1  # layout: refused by check_resumable, not here
    assert config_changes(before, now) == {
        "data.fractions": {"before": [0.5, 0.2, 0.3], "now": [0.6, 0.2, 0.2]},
        "optim.learning_rate": {"before": 2.0, "now": 1.0}}
    mine = {**before.to_dict(), "my_field": 3}  # a user's own field counts as trajectory
    assert config_changes(mine, before) == {"my_field": {"before": 3, "now": None}}


def test_on_config_change_is_validated():
    config = default.get_config()
    config.on_config_change = "ignore"
    with pytest.raises(ValueError, match=r"config.on_config_change = 'ignore'; choose one of "
                                         r"\('stop', 'continue'\)"):
        validate_config(config)


def _snapshot(workdir):
    return {str(f.relative_to(workdir)): f.read_bytes() for f in sorted(workdir.rglob("*"))
            if f.is_file()}


def test_a_resume_under_another_learning_rate_is_refused_or_continued_and_recorded(
        tiny_model_dir, tmp_path):
    quick = {"plots": False, "specialization": False, "controls.enabled": False}
    work = tmp_path / "run"
    train_and_evaluate(_config(tiny_model_dir, stop_after=2, **quick), work, **QUIET)
    before = _snapshot(work)
    # Two trajectory fields changed (and free ones): refused, both named, old and new value;
    # nothing written.
    changed = _config(tiny_model_dir, **{"optim.learning_rate": 0.25, "seed": 7,
                                         "relation_chunk": 2, "compile_cache_dir": ""})
    said: list[str] = []
    with pytest.raises(UsageError) as refused:
        train_and_evaluate(changed, work, log=said.append)
    assert not any(line.startswith("model: ") for line in said)  # before the model loads
    assert str(refused.value).splitlines()[1:3] == [
        "  config.optim.learning_rate: 0.5 before, 0.25 now", "  config.seed: 0 before, 7 now"]
    assert str(refused.value).startswith(f"{work} was trained to step 2 under another "
                                         "configuration")
    assert "--config.on_config_change=continue" in str(refused.value)
    assert _snapshot(work) == before
    # Free fields alone never block: resumed, to step 4.
    said.clear()
    free = _config(tiny_model_dir, stop_after=2, plots=True, specialization=True,
                   cpu_devices=2, on_nonfinite="skip", compile_cache_dir="",
                   **{"controls.enabled": True})
    assert train_and_evaluate(free, work, log=said.append)["stopped_at"] == 4
    assert "resumed from step 2" in said
    # Continued: the change is recorded at the step it took effect.
    said.clear()
    summary = train_and_evaluate(
        _config(tiny_model_dir, on_config_change="continue", **{"optim.learning_rate": 0.25},
                **quick), work, log=said.append)
    change = {"optim.learning_rate": {"before": 0.5, "now": 0.25}}
    assert any(line.startswith("the configuration changed at step 4") for line in said)
    records = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "event": "config_changed", "changes": change} in records
    history = json.loads((work / "run.json").read_text())["config_history"]
    assert [(h["step"], h.get("changes")) for h in history] == [(0, None), (4, change)]
    assert history[0]["config"]["optim"]["learning_rate"] == 0.5
    assert history[1]["config"]["optim"]["learning_rate"] == 0.25
    assert summary["config_changes"] == [{"step": 4, "changes": change}]
    assert json.loads((work / "metrics.json").read_text())["config_changes"] == [
        {"step": 4, "changes": change}]
    index = _index(_SECTIONS, {}, RunDirectory(work).recorded_config_changes())
    assert "\n- at step 4: config.optim.learning_rate: 0.5 before, 0.25 now\n" in index
    assert "**The configuration changed during training**" not in _index(_SECTIONS, {}, [])


# The sections of a report, with values that do not matter here (the report's own tests make
# real ones, in tens of seconds): what the report's index says of the run's configuration.
_SECTIONS = {
    "findings": None, "kbc": {},
    "specialization": {"own_mask_macro_P@1": 0.5, "other_masks_macro_P@1": 0.1,
                       "full_model_macro_P@1": 0.2, "figure": "s.png"},
    "combination": {"best": {"relations": ["IsA"], "method": "or", "score": 0.3},
                    "full_model_dev_macro_P@1": 0.2, "search": [], "figure": "c.png"},
    "representations": {"full model": {"silhouette": 0.1}, "own subnetwork": {"silhouette": 0.2},
                        "figure": "r.png", "attention_figure": "a.png"},
}


def test_a_sweep_group_resume_is_checked_run_by_run_before_anything_loads(tmp_path):
    """Each run of a group against its own run.json: every run's differences at once."""
    from lamp_jax.config_changes import config_record
    from lamp_jax.sweep import run_sweep
    from lamp_jax.sweep.grid import parse_grid, plan_groups
    from tests.test_sweep import GRID, _sweep_base

    base = _sweep_base()
    ((_, trials),) = plan_groups(base, parse_grid(base, GRID), 2)
    for trial in trials:
        trained = trial.config(base)
        trained.optim.clip_norm = 1.0
        run = tmp_path / "runs" / trial.name
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"config": config_record(trained)}))
    (tmp_path / "groups" / "base" / "checkpoints" / "3").mkdir(parents=True)
    with pytest.raises(UsageError) as refused:
        run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=lambda *_: None)
    message = str(refused.value)
    assert message.startswith("these runs were trained to step 3 under another configuration")
    for trial in trials:
        assert (f"{tmp_path / 'runs' / trial.name}:\n    config.optim.clip_norm: 1.0 before, "
                "5.0 now") in message
