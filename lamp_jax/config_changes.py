"""What a resume compares: the configuration fields that shape a run's trajectory.

A run resumed under other settings is not the run its files describe: a new learning rate from
step 9 on gives other masks than either setting alone. So a resume compares the configuration
the run was trained under with the new one, field by field, as :data:`RESUME_FIELDS` decides:

* ``trajectory``: the field changes what the run computes (the data it sees, how masks start,
  move and are selected). A change refuses the resume with every difference at once
  (:class:`~lamp_jax.errors.UsageError`), unless ``config.on_config_change = "continue"``,
  which resumes under the new values and records the change (``metrics.jsonl``, ``run.json``'s
  ``config_history``, ``metrics.json`` and the report).
* ``layout``: the field decides the shape of the checkpoints (model, relations, masked layers
  and matrices, mask mode). Its resolved value is checked by
  :meth:`lamp_jax.run_dir.RunDirectory.check_resumable`, always refused: the checkpoints
  cannot be resumed into another layout.
* ``free``: the field cannot change the masks a run learns and selects (plots, the final
  report's extras and controls, where caches and downloads live, how the work is spread over
  devices, stop and failure policies): it never blocks a resume. Device counts and relation
  chunks change which kernel adds up a sum, so the last bits of float rounding may differ, as
  they may between machines; they compute the same run.

A field of a configuration that is not in the table (a user's own field) counts as
``trajectory``. ``tests/test_config_changes.py`` checks that every field of the packaged
configurations has its decision here.
"""

from __future__ import annotations

import json
from typing import Any

TRAJECTORY, LAYOUT, FREE = "trajectory", "layout", "free"

RESUME_FIELDS: dict[str, str] = {
    # The model's weights (its architecture is also a layout check: run.json's model_config).
    "model": TRAJECTORY,
    "model_weights": TRAJECTORY,  # pretrained, or a random control
    "dtype": TRAJECTORY,
    "seed": TRAJECTORY,  # mask init, noise, batch order
    # The data: which facts, prompts and split the run trains, selects and reports on.
    "data.source": TRAJECTORY,
    "data.lama_set": TRAJECTORY,
    "data.prompts": TRAJECTORY,
    "data.max_length": TRAJECTORY,
    "data.answers": TRAJECTORY,  # which objects count, and how they are ranked
    "data.max_answer_tokens": TRAJECTORY,
    "data.split": TRAJECTORY,
    "data.fractions": TRAJECTORY,
    "data.seed": TRAJECTORY,
    "data.relations": LAYOUT,  # the relation axis of every checkpoint
    "data.cache_dir": FREE,  # where downloads are kept
    "data.on_error": FREE,  # a run that trained read its data without a stop
    # The masks.
    "mask.first_layer": LAYOUT,
    "mask.last_layer": LAYOUT,
    "mask.matrices": LAYOUT,
    "mask.mode": LAYOUT,
    "mask.tau": TRAJECTORY,
    "mask.threshold": TRAJECTORY,
    "mask.ste_grad": TRAJECTORY,
    "mask.eval_kind": TRAJECTORY,  # selection on dev uses it
    "mask.init": TRAJECTORY,
    "mask.init_value": TRAJECTORY,
    "mask.init_std": TRAJECTORY,
    "mask.init_low": TRAJECTORY,
    "mask.init_high": TRAJECTORY,
    "mask.init_sparsity": TRAJECTORY,
    # The optimiser and the loss.
    "optim.learning_rate": TRAJECTORY,
    "optim.schedule": TRAJECTORY,
    "optim.warmup_fraction": TRAJECTORY,
    "optim.clip_norm": TRAJECTORY,
    "optim.weight_decay": TRAJECTORY,
    "optim.moment_dtype": TRAJECTORY,
    "loss.sparsity_weight": TRAJECTORY,
    "loss.target_sparsity": TRAJECTORY,
    # The steps: their number, their batches, and when masks are evaluated (the selection).
    "batch_size": TRAJECTORY,
    "epochs": TRAJECTORY,  # the schedule's length and the number of steps
    "batching": TRAJECTORY,
    "eval_every": TRAJECTORY,
    # How the same run is computed or reported.
    "relation_chunk": FREE,
    "relation_parallelism": FREE,
    "cpu_devices": FREE,
    "cache_frozen_prefix": FREE,  # the same hidden states, computed once or every step
    "compile_cache_dir": FREE,
    "specialization": FREE,
    "controls.enabled": FREE,  # the final report's controls: computed from the best masks
    "controls.random_draws": FREE,
    "controls.resamples": FREE,
    "controls.confidence": FREE,
    "plots": FREE,
    "stop_after": FREE,
    "on_nonfinite": FREE,
    "on_unreadable_checkpoints": FREE,
    "on_config_change": FREE,
}


# The fields that decide the model and the relation set, and so whether the checkpoints fit at
# all: when one of them changed, a resume is first checked against the checkpoints' layout once
# the model and data are loaded (RunDirectory.check_resumable, whose refusal cannot be
# overridden), and only then for the trajectory.
LAYOUT_SOURCES = ("model", "data.source", "data.lama_set", "data.prompts", "data.answers",
                  "data.max_answer_tokens", "data.max_length",
                  *(field for field, decision in RESUME_FIELDS.items() if decision == LAYOUT))


def config_record(config: Any) -> dict[str, Any]:
    """A configuration (a ConfigDict or a dict) as ``run.json`` stores it: plain JSON values."""
    plain = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(plain, default=str))


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"learning_rate": 2.0}}`` -> ``{"optim.learning_rate": 2.0}``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(before: Any, now: Any) -> dict[str, dict[str, Any]]:
    """The fields that shape the trajectory and differ between two configurations (records or
    ConfigDicts): ``{"optim.learning_rate": {"before": 2.0, "now": 0.1}, ...}``, sorted. A field
    one of them lacks counts as ``None`` there."""
    old, new = flatten(config_record(before)), flatten(config_record(now))
    changes = {}
    for field in sorted(set(old) | set(new)):
        if RESUME_FIELDS.get(field, TRAJECTORY) != TRAJECTORY:
            continue
        if old.get(field) != new.get(field):
            changes[field] = {"before": old.get(field), "now": new.get(field)}
    return changes


def may_change_layout(before: Any, now: Any) -> bool:
    """Whether a field of :data:`LAYOUT_SOURCES` differs between two configurations."""
    old, new = flatten(config_record(before)), flatten(config_record(now))
    return any(old.get(field) != new.get(field) for field in LAYOUT_SOURCES)


def describe_changes(changes: dict[str, dict[str, Any]]) -> list[str]:
    """One line per change: ``config.optim.learning_rate: 2.0 before, 0.1 now``."""
    return [f"config.{field}: {change['before']!r} before, {change['now']!r} now"
            for field, change in changes.items()]
