"""A sweep's plan: the grid of configurations x seeds, and the groups that train together.

A group is the trials that differ only in :data:`VALUE_KEYS` (learning rate, mask init, seed):
the same program, so one jitted step maps over them (:mod:`lamp_jax.sweep.group`). Every other
setting (mask mode, temperature, epochs, model, ...) changes the program and makes a group of
its own; groups train one after another.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from lamp_jax.errors import UsageError

# Settings that only change values, not the program: the trials of a group may differ in
# these, and in nothing else.
VALUE_KEYS = ("seed", "optim.learning_rate", "mask.init", "mask.init_value", "mask.init_std",
              "mask.init_low", "mask.init_high", "mask.init_sparsity")


@dataclasses.dataclass(frozen=True)
class Trial:
    """One (configuration, seed) of a sweep: ``overrides`` are the grid's values for it. It
    trains into a run directory of its own, ``<workdir>/runs/<name>``."""

    overrides: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.overrides) or "base config"

    @property
    def name(self) -> str:
        """Its run directory's name under ``<workdir>/runs``."""
        return slug(",".join([*(f"{k}={v}" for k, v in self.overrides), f"seed={self.seed}"]))

    def config(self, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """Its configuration: the base with the grid's values and its seed (no plots: the
        sweep's own figure shows every run)."""
        return with_overrides(base, dict(self.overrides, seed=self.seed, plots=False))


def with_overrides(base: ml_collections.ConfigDict, overrides: dict[str, Any]
                   ) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(base.to_dict())
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def parse_grid(base: ml_collections.ConfigDict, grid: Sequence[str]) -> dict[str, list[Any]]:
    """``["optim.learning_rate=0.01,0.1", ...]`` -> ``{"optim.learning_rate": [0.01, 0.1]}``,
    each value converted to the type of the config's field; UsageError naming the ``--grid``
    item that names no field, repeats one, or gives a value of the wrong type."""
    out: dict[str, list[Any]] = {}
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise UsageError(f"--grid {item!r}: expected key=value1,value2,...")
        try:
            current = with_overrides(base, {})
            for part in key.split("."):
                current = current[part]
        except (KeyError, AttributeError) as err:
            raise UsageError(f"--grid {item!r}: the config has no field {key!r} (lamp-jax sweep "
                             "--help-config lists every field)") from err
        if key in out:
            raise UsageError(f"--grid {key} is given twice")
        if key == "seed":
            raise UsageError("--grid seed=...: use --seeds N (seeds config.seed .. + N - 1)")
        out[key] = [_convert(v.strip(), current, key) for v in values.split(",")]
    return out


def _convert(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise UsageError(f"--grid {key}: {text!r} is not true/false")
        return text.lower() == "true"
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--grid {key}: {text!r} is not a whole number") from None
    if isinstance(current, float) or current is None:
        try:
            return float(text)
        except ValueError:
            if current is not None:
                raise UsageError(f"--grid {key}: {text!r} is not a number") from None
    return text


def plan_groups(base: ml_collections.ConfigDict, grid: dict[str, list[Any]], seeds: int
                ) -> list[tuple[dict[str, Any], list[Trial]]]:
    """``[(program overrides, trials)]``: one group per combination of the grid's program
    settings; in each, every combination of its value settings x seeds."""
    program = {k: v for k, v in grid.items() if k not in VALUE_KEYS}
    values = {k: v for k, v in grid.items() if k in VALUE_KEYS}
    groups = []
    for combo in itertools.product(*program.values()):
        fixed = dict(zip(program, combo, strict=True))
        runs = [Trial(tuple(fixed.items()) + tuple(zip(values, v, strict=True)),
                    base.seed + s)
                for v in itertools.product(*values.values()) for s in range(seeds)]
        groups.append((fixed, runs))
    return groups


def check_group(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """The trials of a group may differ in :data:`VALUE_KEYS` only."""
    def program(config):
        flat = dict(_flatten(config.to_dict()))
        return {k: v for k, v in flat.items() if k not in VALUE_KEYS}

    first = program(configs[0])
    for config in configs[1:]:
        other = program(config)
        differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differing:
            raise ValueError(f"the trials of a group must differ only in {VALUE_KEYS}; these "
                             f"differ: {differing}")


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def slug(text: str) -> str:
    """A directory name for a label: characters other than letters, digits and ``.,=+-``
    become ``_``."""
    return re.sub(r"[^A-Za-z0-9.,=+-]+", "_", text)


