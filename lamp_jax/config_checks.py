"""Checks a run configuration before anything is loaded, compiled or written.

:func:`validate_config` checks the values: every problem names the config field
(``config.mask.tau``) and what is allowed, and all problems are reported at once.
:func:`check_sources` checks that the model and the data the config names are there, and that
the data holds the relations it lists. Both raise :class:`~lamp_jax.errors.UsageError`, so a
bad command line fails in a second, with one line, instead of after model loading.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from lamp_jax.data.lama_sets import LAMA_SETS, PROMPTS, read_for_config, requested_relations
from lamp_jax.data.splits import HELD_OUT_PROTOCOLS
from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.masks import MATRIX_PATHS

_CHOICES = {
    "dtype": ("float32", "bfloat16"),
    "data.split": (*HELD_OUT_PROTOCOLS, "reference"),
    "data.on_error": ("stop", "skip"),
    "data.lama_set": LAMA_SETS,
    "data.prompts": PROMPTS,
    "mask.mode": ("stochastic", "deterministic"),
    "mask.ste_grad": ("identity", "sigmoid"),
    "mask.eval_kind": ("threshold", "expectation"),
    "mask.init": ("constant", "normal", "uniform", "target"),
    "optim.moment_dtype": ("float32", "bfloat16"),
    "optim.schedule": ("linear", "constant"),
    "batching": ("per_relation", "balanced"),
    "on_nonfinite": ("stop", "skip"),
    "on_unreadable_checkpoints": ("stop", "start_over"),
    "on_config_change": ("stop", "continue"),
    "cache_frozen_prefix": (True, False),
    "model_weights": ("pretrained", "random"),
    "data.answers": ("single_token", "any_length"),
    "controls.enabled": (True, False),
}
# field -> (lowest, highest, whether the bounds themselves are allowed)
_RANGES = {
    "data.max_length": (4, None, True),
    "data.max_answer_tokens": (1, None, True),
    "mask.tau": (0.0, None, False),
    "mask.threshold": (0.0, 1.0, False),
    "mask.init_std": (0.0, None, True),
    "mask.init_sparsity": (0.0, 1.0, False),
    "optim.learning_rate": (0.0, None, False),
    "optim.warmup_fraction": (0.0, 1.0, True),
    "optim.clip_norm": (0.0, None, True),
    "optim.weight_decay": (0.0, None, True),
    "loss.sparsity_weight": (0.0, None, True),
    "batch_size": (1, None, True),
    "epochs": (1, None, True),
    "eval_every": (0, None, True),
    "relation_chunk": (0, None, True),
    "relation_parallelism": (0, None, True),
    "cpu_devices": (0, None, True),
    "stop_after": (0, None, True),
    "controls.random_draws": (0, None, True),
    "controls.resamples": (1, None, True),
    "controls.confidence": (0.0, 1.0, False),
}


def _get(config: Any, dotted: str) -> Any:
    node = config
    for key in dotted.split("."):
        node = node[key]
    return node


def _in_range(value: Any, low: Any, high: Any, inclusive: bool) -> bool:
    if inclusive:
        return (low is None or value >= low) and (high is None or value <= high)
    return (low is None or value > low) and (high is None or value < high)


def with_defaults(stored: dict[str, Any]) -> ml_collections.ConfigDict:
    """A configuration saved by a run (``run.json``), completed with today's defaults for
    fields added since it was written (e.g. ``controls``), so that older run directories
    still evaluate and report."""
    from lamp_jax.configs import default

    def merge(base: Any, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and key in base and isinstance(base[key], Mapping):
                merge(base[key], value)
            else:
                base[key] = value

    config = default.get_config()
    with config.ignore_type():
        merge(config, stored)
    return config


def validate_config(config: Any) -> None:
    """Raises UsageError listing every out-of-range or unknown field of a train.py config."""
    problems = []
    for field, allowed in _CHOICES.items():
        value = _get(config, field)
        if value not in allowed:
            problems.append(f"config.{field} = {value!r}; choose one of {allowed}")
    for field, (low, high, inclusive) in _RANGES.items():
        value = _get(config, field)
        if not isinstance(value, int | float) or not _in_range(value, low, high, inclusive):
            brackets = "[]" if inclusive else "()"
            span = f"{brackets[0]}{low}, {'inf' if high is None else high}{brackets[1]}"
            problems.append(f"config.{field} = {value!r}; must be in {span}")
    # Which of them the model has is checked once it is loaded (MaskSpec.create).
    unknown = [m for m in config.mask.matrices if m not in MATRIX_PATHS]
    if unknown or not config.mask.matrices:
        problems.append(f"config.mask.matrices = {tuple(config.mask.matrices)!r}; choose a "
                        f"non-empty subset of {tuple(MATRIX_PATHS)}")
    for field in ("mask.first_layer", "mask.last_layer"):
        value = _get(config, field)
        if value is not None and value < 0:
            problems.append(f"config.{field} = {value}; layer indices start at 0")
    first, last = config.mask.first_layer, config.mask.last_layer
    if first is not None and last is not None and first > last:
        problems.append(f"config.mask.first_layer {first} > config.mask.last_layer {last}")
    fractions = tuple(config.data.fractions)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        problems.append(f"config.data.fractions = {fractions}; need three positive train/dev/"
                        "test shares summing to 1")
    lama_set, source = config.data.lama_set, str(config.data.source)
    if lama_set in ("trex", "google_re") and (source == "embedded" or source.endswith(".jsonl")):
        problems.append(f"config.data.lama_set = {lama_set!r} is read from LAMA's data folder, "
                        f"but config.data.source = {source!r} is "
                        f"{'the toy world' if source == 'embedded' else 'a jsonl file'}; set "
                        "config.data.source to 'lama' (download) or the path of LAMA's data/")
    target = config.loss.target_sparsity
    if target is not None and not 0.0 < target < 1.0:
        problems.append(f"config.loss.target_sparsity = {target}; must be in (0, 1) or None")
    if len(problems) == 1:
        raise UsageError(f"invalid configuration: {problems[0]}")
    if problems:
        raise UsageError(f"invalid configuration, {len(problems)} problems:\n  "
                         + "\n  ".join(problems))


def check_sources(config: Any) -> None:
    """Refuses a model or a data source that is not there, and relations that the data does not
    hold, before anything is loaded or written: the checks that need the files but not the
    model. A hub id is checked when it is fetched. The data is read here only when
    ``config.data.relations`` lists relations (it is read again once the tokenizer is loaded)."""
    from lamp_jax.data.prepare import resolve_sources  # "lama": downloads LAMA's data once

    model, data = resolve_sources(config)
    _check_model_source(str(model), str(config.model))
    if not data.exists():
        raise MissingFileError(
            f"config.data.source = {str(config.data.source)!r}: {data} does not exist "
            "(config.data.source takes 'embedded', 'lama' to download LAMA's data, the path of "
            "LAMA's data/ folder, or a jsonl file in LAMA's ConceptNet format)")
    if requested_relations(config.data.get("relations", ())):
        read_for_config(config.data, data)  # UsageError naming the relations the data holds


def _check_model_source(model: str, named: str) -> None:
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(
                f"config.model = {named!r}: {path} is not a model directory (no config.json; "
                "save_pretrained writes config.json and model.safetensors)")
        return
    if path.exists() or model.startswith((".", "/", "~")):
        what = "not a directory" if path.exists() else "no such directory"
        raise MissingFileError(
            f"config.model = {named!r}: {what} (config.model takes a hub id such as "
            "'bert-base-uncased', a directory that save_pretrained wrote, or 'embedded')")
