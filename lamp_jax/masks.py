"""Pruning masks: which matrices, how they are initialised, sampled, thresholded and applied.

A *mask-logit tree* mirrors the part of the model's params tree that is pruned, e.g.
``{"layer_6": {"attention": {"query": {"kernel": G}}, "ffn_in": {"kernel": G'}}}``, every leaf
shaped like the kernel it masks with a leading relation axis ``[R, in, out]``. All functions here
are pure; the training step vmaps them over that leading axis.

Sparsity conventions (documented once, used everywhere): *sparsity* is the fraction of mask
entries that are zero. For a hard mask it is exact; for a stochastic (binary-concrete) mask it is
the fraction of sampled entries below the threshold t, whose expectation for logit g is
``P(sigmoid((g + L) / tau) < t) = sigmoid(tau * logit(t) - g)`` with L standard logistic noise.
At t = 0.5 this is ``sigmoid(-g)``: g = 0 -> 50 %, g = 1 -> 26.9 %, g = 2.95 -> 5.0 %, the
reference's presets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax import threefry
from lamp_jax.errors import UsageError
from lamp_jax.hosts import to_host
from lamp_jax.models import FAMILIES, ModelConfig, ModernBertConfig, family_of, matrix_paths

# Every family's maskable matrices: short name -> path inside a layer's params (each family's
# ``MATRICES`` in its modeling.py, gathered by the model registry). A name means the same path
# in every family that has it, so a spec's names need no family: query/key/value (BERT, Llama),
# the fused qkv (ModernBERT, GPT-2), ffn_gate (Llama), and attn_out, ffn_in, ffn_out in all.
MATRIX_PATHS: dict[str, tuple[str, ...]] = matrix_paths()
# A MaskSpec's matrices when none are named: the BERT family's, the paper's.
DEFAULT_MATRICES: tuple[str, ...] = FAMILIES["bert"].default_matrices
MASK_KINDS = ("stochastic", "deterministic", "expectation", "threshold")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which layers and matrices are pruned. Layers are inclusive indices ``lb..lt``."""

    layers: tuple[int, ...]
    matrices: tuple[str, ...] = DEFAULT_MATRICES

    def __post_init__(self) -> None:
        unknown = [m for m in self.matrices if m not in MATRIX_PATHS]
        if unknown:
            raise ValueError(f"unknown matrices {unknown}; choose from {list(MATRIX_PATHS)}")
        if not self.layers or not self.matrices:
            raise ValueError("a mask spec needs at least one layer and one matrix")

    @classmethod
    def create(
        cls,
        config: ModelConfig | ModernBertConfig,
        first_layer: int | None = None,
        last_layer: int | None = None,
        matrices: Sequence[str] | None = None,
    ) -> MaskSpec:
        """Layers ``first_layer..last_layer`` (default: the top half, as in the paper's 6..11)
        and ``matrices`` (default: every matrix of the config's family, in its order)."""
        first = config.num_layers // 2 if first_layer is None else first_layer
        last = config.num_layers - 1 if last_layer is None else last_layer
        if not 0 <= first <= last < config.num_layers:
            raise UsageError(
                f"mask layers {first}..{last} are not within the model's 0..{config.num_layers - 1}"
                " (config.mask.first_layer, config.mask.last_layer)")
        own = family_of(config).default_matrices
        matrices = own if matrices is None else tuple(matrices)
        foreign = [m for m in matrices if m not in own]
        if foreign:
            raise UsageError(f"a {config.family} model has no matrices {foreign}; choose from "
                             f"{own} (config.mask.matrices)")
        return cls(tuple(range(first, last + 1)), matrices)

    def paths(self) -> list[tuple[str, ...]]:
        """Param paths of the masked kernels, e.g. ``("layer_6", "ffn_in", "kernel")``."""
        return [(f"layer_{i}", *MATRIX_PATHS[m]) for i in self.layers for m in self.matrices]


@dataclasses.dataclass(frozen=True)
class MaskMode:
    """How logits become multipliers.

    kind:
      ``stochastic``    binary-concrete sample ``sigmoid((G + log u - log(1-u)) / tau)`` (training);
      ``deterministic`` ``1[sigmoid(G) > threshold]`` with a straight-through gradient (training);
      ``expectation``   ``sigmoid(G)`` (soft inference);
      ``threshold``     ``1[sigmoid(G) > threshold]`` (binary subnetwork inference, no gradient).
    ste_grad: straight-through backward of ``deterministic``: ``identity`` passes the upstream
      gradient to G unchanged (the reference), ``sigmoid`` multiplies it by sigmoid'(G).
    """

    kind: str = "stochastic"
    tau: float = 0.1
    threshold: float = 0.5
    ste_grad: str = "identity"

    def __post_init__(self) -> None:
        if self.kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {self.kind!r}; choose from {MASK_KINDS}")
        if self.ste_grad not in ("identity", "sigmoid"):
            raise ValueError(f"ste_grad must be 'identity' or 'sigmoid', not {self.ste_grad!r}")
        if not 0.0 < self.threshold < 1.0 or self.tau <= 0.0:
            raise ValueError("need 0 < threshold < 1 and tau > 0")

    def for_inference(self, kind: str = "threshold") -> MaskMode:
        return dataclasses.replace(self, kind=kind)


# --- tree helpers ------------------------------------------------------------------------------


def _get(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: Mapping[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``tree`` with ``path`` replaced; untouched subtrees are shared, not copied."""
    head, *rest = path
    new = dict(tree)
    new[head] = _set(tree[head], rest, value) if rest else value
    return new


def iter_masks(mask_tree: Mapping[str, Any], spec: MaskSpec):
    """Yields ``(layer, matrix, leaf)`` in the spec's order."""
    for i in spec.layers:
        for m in spec.matrices:
            yield i, m, _get(mask_tree, (f"layer_{i}", *MATRIX_PATHS[m]))


# --- initialisation ----------------------------------------------------------------------------


def logit(p: float) -> float:
    """The mask logit whose sigmoid is ``p`` (the threshold a logit must cross)."""
    return math.log(p) - math.log1p(-p)


def constant_for_sparsity(sparsity: float, mode: MaskMode) -> float:
    """The constant logit whose stochastic training mask has the given expected sparsity."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {sparsity}")
    return mode.tau * logit(mode.threshold) - logit(sparsity)


def expected_initial_sparsity(init: MaskInit, mode: MaskMode) -> float:
    """Expected fraction of zeros of the *training* mask right after initialisation.

    Stochastic: ``E_G[sigmoid(tau*logit(t) - G)]``; deterministic: ``P(G < logit(t))``.
    Computed by quadrature over the init distribution (exact for constants).
    """
    if init.kind == "target":
        return init.sparsity
    t = logit(mode.threshold)
    if mode.kind != "stochastic" and init.kind == "normal" and init.std > 0:
        return float(0.5 * (1 + math.erf((t - init.value) / (init.std * math.sqrt(2)))))
    if init.kind == "constant" or init.kind == "normal" and init.std == 0:
        grid, weights = np.array([init.value]), np.array([1.0])
    elif init.kind == "normal":
        nodes, w = np.polynomial.hermite_e.hermegauss(101)
        grid, weights = init.value + init.std * nodes, w / w.sum()
    else:  # uniform
        grid = np.linspace(init.low, init.high, 20001)
        weights = np.full(grid.shape, 1.0 / grid.size)
    if mode.kind == "stochastic":
        zero_prob = 1.0 / (1.0 + np.exp(-(mode.tau * t - grid)))
    else:
        zero_prob = (grid <= t).astype(float)
    return float(np.sum(weights * zero_prob))


@dataclasses.dataclass(frozen=True)
class MaskInit:
    """How mask logits start.

    kind ``constant`` (``value``), ``normal`` (mean ``value``, ``std``), ``uniform``
    (``low``..``high``), or ``target``: a constant (plus optional normal noise ``std``) chosen so
    that the training mask starts with expected sparsity ``sparsity``. See
    :func:`expected_initial_sparsity` for what each gives.
    """

    kind: str = "constant"
    value: float = 0.0
    std: float = 1.0
    low: float = 0.0
    high: float = 1.0
    sparsity: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "normal", "uniform", "target"):
            raise ValueError(f"unknown init {self.kind!r}")


def _target_mean(init: MaskInit, mode: MaskMode) -> float:
    if mode.kind == "stochastic" and init.std == 0:
        return constant_for_sparsity(init.sparsity, mode)
    if mode.kind != "stochastic" and init.std == 0:
        raise ValueError(
            "a deterministic mask from a constant logit is all ones or all zeros; "
            "give the 'target' init a std > 0"
        )
    lo, hi = -30.0, 30.0  # expected sparsity falls monotonically in the mean: bisect
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        s = expected_initial_sparsity(MaskInit("normal", value=mid, std=init.std), mode)
        lo, hi = (mid, hi) if s > init.sparsity else (lo, mid)
    return 0.5 * (lo + hi)


def init_mask_logits(
    spec: MaskSpec,
    params: Mapping[str, Any],
    num_relations: int,
    init: MaskInit,
    mode: MaskMode,
    rng: jax.Array,
    dtype: Any = jnp.float32,
) -> dict[str, Any]:
    """Mask logits ``[num_relations, *kernel.shape]`` for every kernel the spec selects."""
    if init.kind == "target":
        init = MaskInit("normal", value=_target_mean(init, mode), std=init.std)
    tree: dict[str, Any] = {}
    keys = jax.random.split(rng, len(spec.paths()))
    for key, path in zip(keys, spec.paths(), strict=True):
        shape = (num_relations, *_get(params, path).shape)
        if init.kind == "constant" or (init.kind == "normal" and init.std == 0):
            leaf = jnp.full(shape, init.value, dtype)
        elif init.kind == "normal":
            leaf = init.value + init.std * jax.random.normal(key, shape, dtype)
        else:
            leaf = jax.random.uniform(key, shape, dtype, init.low, init.high)
        insert_path(tree, path, leaf)
    return tree


def insert_path(tree: dict[str, Any], path: Sequence[str], leaf: Any) -> dict[str, Any]:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = leaf
    return tree


# --- from logits to multipliers ----------------------------------------------------------------


def concrete_sample(logits: jax.Array, rng: jax.Array, tau: float) -> jax.Array:
    """Binary-concrete relaxation: ``sigmoid((G + log u - log(1 - u)) / tau)``."""
    # jax.random.uniform's bits, drawn in the op that consumes them (lamp_jax/threefry.py).
    u = threefry.uniform(rng, logits.shape, logits.dtype, minval=1e-6, maxval=1.0 - 1e-6)
    # One log of u / (1 - u), the same value up to rounding: the transcendentals cost more than
    # the noise, and two logs made the sampling op 1.26x slower (one CPU core, [4, 512, 128]).
    return jax.nn.sigmoid((logits + jnp.log(u / (1.0 - u))) / tau)


def hard_mask(logits: jax.Array, threshold: float) -> jax.Array:
    """``1[sigmoid(G) > t]`` computed as ``G > logit(t)`` (no rounding at the boundary)."""
    return (logits > logit(threshold)).astype(logits.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def straight_through_mask(logits: jax.Array, threshold: float, ste_grad: str) -> jax.Array:
    """Hard mask forward; backward passes the gradient straight through to the logits."""
    return hard_mask(logits, threshold)


def _ste_fwd(logits, threshold, ste_grad):
    return hard_mask(logits, threshold), logits


def _ste_bwd(threshold, ste_grad, logits, upstream):
    if ste_grad == "identity":
        return (upstream,)
    s = jax.nn.sigmoid(logits)
    return (upstream * s * (1 - s),)


straight_through_mask.defvjp(_ste_fwd, _ste_bwd)


def logits_to_mask(logits: jax.Array, mode: MaskMode, rng: jax.Array | None = None) -> jax.Array:
    """One leaf: logits -> multipliers in [0, 1] according to ``mode``."""
    if mode.kind == "stochastic":
        if rng is None:
            raise ValueError("stochastic masks need an rng")
        return concrete_sample(logits, rng, mode.tau)
    if mode.kind == "deterministic":
        return straight_through_mask(logits, mode.threshold, mode.ste_grad)
    if mode.kind == "expectation":
        return jax.nn.sigmoid(logits)
    return hard_mask(jax.lax.stop_gradient(logits), mode.threshold)


def compute_masks(
    mask_logits: Mapping[str, Any], mode: MaskMode, rng: jax.Array | None = None
) -> Any:
    """Every leaf of a mask-logit tree -> multipliers (independent noise per leaf)."""
    leaves, treedef = jax.tree.flatten(mask_logits)
    rngs = list(jax.random.split(rng, len(leaves))) if rng is not None else [None] * len(leaves)
    masks = [logits_to_mask(g, mode, r) for g, r in zip(leaves, rngs, strict=True)]
    return jax.tree.unflatten(treedef, masks)


def apply_masks(
    frozen_params: Mapping[str, Any],
    mask_logits: Mapping[str, Any],
    mode: MaskMode,
    rng: jax.Array | None = None,
) -> dict[str, Any]:
    """Params with every masked kernel replaced by ``kernel * mask`` (for ONE relation).

    Pure: ``frozen_params`` is not modified and only the masked kernels are new arrays; the
    frozen params are wrapped in ``stop_gradient`` so they never receive gradients.
    """
    return multiply_masks(frozen_params, compute_masks(mask_logits, mode, rng))


def multiply_masks(frozen_params: Mapping[str, Any], masks: Mapping[str, Any]) -> dict[str, Any]:
    """Params with ``kernel * mask`` for every leaf of ``masks`` (multipliers, not logits)."""
    frozen = jax.lax.stop_gradient(frozen_params)
    out = frozen
    for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
        keys = [k.key for k in path]
        kernel = _get(frozen, keys)
        if mask.shape != kernel.shape:
            raise ValueError(
                f"mask for {'/'.join(keys)} has shape {mask.shape}, kernel {kernel.shape}; "
                "pass ONE relation's masks (no leading relation axis)"
            )
        out = _set(out, keys, kernel * jnp.asarray(mask).astype(kernel.dtype))
    return out


# --- regulariser, statistics, combination ------------------------------------------------------


def expected_density(mask_logits: Mapping[str, Any], mode: MaskMode) -> jax.Array:
    """Differentiable expected fraction of kept weights (the L0 surrogate of Louizos et al.).

    For a concrete mask ``P(m > t) = sigmoid(G - tau*logit(t))``; for the other kinds we use
    ``sigmoid(G - logit(t))`` as the smooth stand-in of the hard indicator.
    """
    shift = (mode.tau if mode.kind == "stochastic" else 1.0) * logit(mode.threshold)
    leaves = jax.tree.leaves(mask_logits)
    total = sum(jnp.sum(jax.nn.sigmoid(g - shift)) for g in leaves)
    return total / sum(g.size for g in leaves)


def sparsity_penalty(
    mask_logits: Mapping[str, Any],
    mode: MaskMode,
    weight: float,
    target_sparsity: float | None = None,
) -> jax.Array:
    """``weight * density`` (push towards sparser masks) or, with a target,
    ``weight * (density - (1 - target))**2`` (hold the density at the target)."""
    density = expected_density(mask_logits, mode)
    if target_sparsity is None:
        return weight * density
    return weight * (density - (1.0 - target_sparsity)) ** 2


def sparsity_stats(
    mask_logits: Mapping[str, Any], spec: MaskSpec, threshold: float = 0.5
) -> dict[str, np.ndarray]:
    """Sparsity of the hard masks: ``{"layer_<i>/<matrix>": [R], ..., "total": [R]}``.

    ``total`` weighs each matrix by its size (the fraction of all masked weights that are off).
    """
    stats, zeros, count = {}, 0, 0
    for i, m, leaf in iter_masks(mask_logits, spec):
        off = to_host(leaf) <= logit(threshold)
        per_relation = off.reshape(off.shape[0], -1)
        stats[f"layer_{i}/{m}"] = per_relation.mean(axis=1)
        zeros = zeros + per_relation.sum(axis=1)
        count += per_relation.shape[1]
    stats["total"] = zeros / count
    return stats


@partial(jax.jit, static_argnames="threshold")
def pruned_fraction(mask_logits: Mapping[str, Any], threshold: float = 0.5) -> jax.Array:
    """``[R]`` fraction of all masked weights the hard mask prunes, per relation, computed on
    the devices (only R numbers reach the host): :func:`sparsity_stats`'s ``total``."""
    leaves = jax.tree.leaves(mask_logits)
    off = sum(jnp.sum(g <= logit(threshold), axis=tuple(range(1, g.ndim)), dtype=jnp.int32)
              for g in leaves)
    return off / sum(g[0].size for g in leaves)


def combine_masks(
    binary_masks: Mapping[str, Any], relations: Sequence[int], how: str = "or"
) -> Any:
    """Combines the hard masks ``[R, ...]`` of several relations into one ``[...]`` mask.

    ``or`` keeps a weight any chosen relation keeps (the paper's union), ``and`` only weights all
    keep, ``vote`` weights a strict majority keeps.
    """
    idx = jnp.asarray(list(relations))

    def combine(leaf):
        chosen = leaf[idx] > 0.5
        if how == "or":
            return chosen.any(axis=0).astype(leaf.dtype)
        if how == "and":
            return chosen.all(axis=0).astype(leaf.dtype)
        if how == "vote":
            return (chosen.sum(axis=0) * 2 > len(relations)).astype(leaf.dtype)
        raise ValueError(f"unknown combination {how!r}; choose or, and, vote")

    return jax.tree.map(combine, binary_masks)
