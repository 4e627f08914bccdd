"""Random parameters drawn as transformers initialises a fresh model (a random-weight control).

A family's ``init_like_transformers(config, rng)`` says, per parameter path, how transformers'
``_init_weights`` sets that tensor (a :class:`Draw`); :func:`draw_params` draws them all from one
key. Each path gets its own key (``jax.random.split`` over the sorted paths), so the same key
always gives the same params and a path's values do not depend on which other paths exist.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lamp_jax.models.checkpoint_keys import unflatten_params

NORMAL, TRUNCATED_NORMAL, ZEROS, ONES = "normal", "truncated_normal", "zeros", "ones"


@dataclasses.dataclass(frozen=True)
class Draw:
    """How one tensor starts: ``normal(0, std)``; ``truncated_normal(0, std)`` cut at
    ``+-cutoff * std`` (torch's ``trunc_normal_``); all zeros; all ones. ``zero_rows``: rows
    set to zero after drawing (an embedding's ``padding_idx``)."""

    kind: str
    std: float = 0.0
    cutoff: float = 0.0
    zero_rows: tuple[int, ...] = ()


def normal(std: float, zero_rows: tuple[int | None, ...] = ()) -> Draw:
    """``normal(0, std)``; ``zero_rows`` may hold None (no padding index), which is dropped."""
    return Draw(NORMAL, std, zero_rows=tuple(r for r in zero_rows if r is not None))


def truncated_normal(std: float, cutoff: float) -> Draw:
    return Draw(TRUNCATED_NORMAL, std, cutoff)


def norm_or_bias(path: str) -> Draw:
    """A norm's scale starts at one, a bias (of a norm or a dense layer) at zero."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "scale":
        return Draw(ONES)
    if leaf == "bias":
        return Draw(ZEROS)
    raise ValueError(f"{path} is neither a norm's scale nor a bias")


def draw(spec: Draw, shape: tuple[int, ...], key: jax.Array) -> jax.Array:
    """One float32 tensor of ``shape`` as ``spec`` says."""
    if spec.kind == ZEROS:
        return jnp.zeros(shape, jnp.float32)
    if spec.kind == ONES:
        return jnp.ones(shape, jnp.float32)
    if spec.kind == NORMAL:
        value = spec.std * jax.random.normal(key, shape, jnp.float32)
    elif spec.kind == TRUNCATED_NORMAL:
        value = spec.std * jax.random.truncated_normal(key, -spec.cutoff, spec.cutoff, shape,
                                                       jnp.float32)
    else:
        raise ValueError(f"unknown draw {spec.kind!r}")
    rows = [r for r in spec.zero_rows if 0 <= r < shape[0]]
    return value.at[jnp.asarray(rows, jnp.int32)].set(0.0) if rows else value


def draw_params(shapes: Mapping[str, tuple[int, ...]], rule: Callable[[str], Draw],
                rng: jax.Array) -> dict[str, Any]:
    """The params pytree with one tensor per ``shapes`` path (``a/b/kernel``), each drawn as
    ``rule(path)`` says, from its own key split off ``rng``."""
    paths = sorted(shapes)
    keys = jax.random.split(rng, len(paths))
    return unflatten_params({path: draw(rule(path), tuple(shapes[path]), key)
                             for path, key in zip(paths, keys, strict=True)})
