"""Rotary position embeddings' variants, as transformers' ``modeling_rope_utils`` computes them.

A :class:`RopeParameters` is a config's ``rope_parameters`` (transformers 5) or ``rope_theta`` +
``rope_scaling`` (the hub's older ``config.json`` files); :func:`inverse_frequencies` gives the
inverse frequencies and the factor by which ``cos`` and ``sin`` are scaled, for a sequence of a
given length (only ``dynamic`` depends on it), in float32 as transformers computes them:

* ``default``: ``1 / theta^(2j / d)``;
* ``linear``: the default divided by ``factor`` (position interpolation);
* ``dynamic`` (dynamic NTK): the default while the sequence fits ``max_position_embeddings``;
  beyond, ``theta`` grows with the sequence length ``L`` as
  ``theta * (factor * L / max - (factor - 1))^(d / (d - 2))``. transformers keeps the largest
  length it has seen in a model object and reuses its frequencies for shorter sequences longer
  than ``max``; this function is what a freshly loaded model computes for one forward pass;
* ``llama3``: Llama 3.1's smoothing between unscaled high and ``factor``-scaled low frequencies;
* ``yarn``: YaRN's ramp between interpolated and extrapolated frequencies, with ``cos`` and
  ``sin`` scaled by its attention factor.

``longrope`` and ``proportional`` are refused (UsageError), and so is ``partial_rotary_factor``
below 1 for a scaled variant: transformers' Llama, Qwen2 and Qwen3 rotate the whole head, so
their default variant ignores the factor and the scaled ones fail on it (a shape mismatch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lamp_jax.errors import UsageError
from lamp_jax.models.layers import default_inverse_frequencies

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")

# What each variant reads from rope_parameters besides rope_type and rope_theta.
_FIELDS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
             "beta_slow", "mscale", "mscale_all_dim", "truncate"),
}


@dataclasses.dataclass(frozen=True)
class RopeParameters:
    """One config's rotary embedding (hashable: part of a static jit argument). Fields a
    variant does not read stay None."""

    rope_type: str = "default"
    rope_theta: float = 10_000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    # Kept so that a config round-trips; see the module docstring for what it does.
    partial_rotary_factor: float | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise UsageError(f"rope_type {self.rope_type!r} is not implemented; lamp-jax "
                             f"implements {', '.join(ROPE_TYPES)}")
        if self.rope_type in ("linear", "dynamic", "llama3") and self.factor is None:
            raise UsageError(f"rope_type {self.rope_type!r} needs a 'factor' in rope_parameters")
        if self.rope_type == "llama3" and None in (self.low_freq_factor, self.high_freq_factor):
            raise UsageError("rope_type 'llama3' needs 'low_freq_factor' and 'high_freq_factor' "
                             "in rope_parameters")
        partial = 1.0 if self.partial_rotary_factor is None else self.partial_rotary_factor
        if partial != 1.0 and self.rope_type != "default":
            raise UsageError(
                f"partial_rotary_factor {partial} with rope_type {self.rope_type!r}: the Llama, "
                "Qwen2 and Qwen3 architectures rotate the whole head (transformers' own models "
                "fail on this config too)")

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], max_position_embeddings: int
                     ) -> RopeParameters:
        """From a ``config.json``: transformers 5's ``rope_parameters``, or the older
        ``rope_theta`` + ``rope_scaling`` (whose variant may be called ``type``). As
        transformers, ``original_max_position_embeddings`` of ``llama3`` and ``yarn`` defaults
        to ``max_position_embeddings``."""
        params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UsageError(f"rope_parameters per layer type ({', '.join(params)}) are not "
                             "implemented for this architecture")
        rope_type = params.pop("rope_type", params.pop("type", "default"))
        theta = params.pop("rope_theta", hf.get("rope_theta", 10_000.0))
        partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor"))
        known = _FIELDS.get(rope_type, ())
        values = {name: params.get(name) for name in known}
        if rope_type in ("llama3", "yarn") and values["original_max_position_embeddings"] is None:
            values["original_max_position_embeddings"] = max_position_embeddings
        return cls(rope_type=rope_type, rope_theta=float(theta), partial_rotary_factor=partial,
                   **values)

    def to_hf_dict(self) -> dict[str, Any]:
        """``rope_parameters`` as transformers 5 writes them."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        for name in (*_FIELDS[self.rope_type], "partial_rotary_factor"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


def inverse_frequencies(rope: RopeParameters, head_dim: int, max_position_embeddings: int,
                        seq_len: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim / 2] float32, attention scaling)`` of ``rope`` for a sequence of
    ``seq_len`` positions, as transformers' ``ROPE_INIT_FUNCTIONS`` (module docstring)."""
    theta, d = rope.rope_theta, head_dim
    if rope.rope_type == "default":
        return default_inverse_frequencies(d, theta), 1.0
    if rope.rope_type == "linear":
        return default_inverse_frequencies(d, theta) / np.float32(rope.factor), 1.0
    if rope.rope_type == "dynamic":
        if seq_len <= max_position_embeddings:
            return default_inverse_frequencies(d, theta), 1.0
        f32 = np.float32
        growth = f32(rope.factor) * f32(seq_len) / f32(max_position_embeddings) - f32(
            rope.factor - 1)
        base = f32(theta) * growth ** f32(d / (d - 2))
        exponents = np.arange(0, d, 2, dtype=np.float32) / f32(d)
        return (f32(1.0) / base ** exponents).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        return _llama3(rope, default_inverse_frequencies(d, theta)), 1.0
    return _yarn(rope, d, max_position_embeddings)


def _llama3(rope: RopeParameters, inv_freq: np.ndarray) -> np.ndarray:
    f32 = np.float32
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context = rope.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = f32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / f32(factor), inv_freq)
    smooth = (f32(old_context) / wavelen - f32(low)) / f32(high - low)
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: RopeParameters, d: int, max_position_embeddings: int
          ) -> tuple[np.ndarray, float]:
    f32 = np.float32
    base, original = rope.rope_theta, rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / original
    scaling = rope.attention_factor
    if scaling is None:
        if rope.mscale and rope.mscale_all_dim:
            scaling = float(_yarn_mscale(factor, rope.mscale)
                            / _yarn_mscale(factor, rope.mscale_all_dim))
        else:
            scaling = _yarn_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (d * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate is None or rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    pos_freqs = f32(base) ** (np.arange(0, d, 2, dtype=np.float32) / f32(d))
    extrapolation = f32(1.0) / pos_freqs
    interpolation = f32(1.0) / (f32(factor) * pos_freqs)
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - f32(low)) / f32(high - low), 0, 1)
    keep = f32(1) - ramp.astype(np.float32)
    inv_freq = interpolation * (f32(1) - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(scaling)
