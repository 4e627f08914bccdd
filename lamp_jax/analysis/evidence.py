"""Confidence intervals for the difference of two systems on the same held-out prompts.

**Within one run** (:func:`paired_bootstrap`): the held-out *facts* are the sample, not the
prompts: a fact's sentences share its subject and object, so they are not independent draws,
and resampling sentences one by one would understate the uncertainty. Each resample draws,
within every relation, as many facts as it has, with replacement (stratified: every relation
keeps its size, as in the split), and takes all sentences of each drawn fact. The statistic of a
relation is the mean over the resampled prompts of ``a - b`` (P@1 and MRR are prompt means, so
a fact counts by its number of prompts); macro is the mean over relations of the per-relation
statistic, computed on the same resample. The interval is the percentile interval of ``B``
resamples (``numpy.quantile``'s default, linear interpolation); "excludes zero" means both
bounds lie on one side of 0. Seeded: the same inputs and seed give the same interval.

**Across the seeds of a sweep** (:func:`seed_fact_bootstrap`): a seed changes the mask
initialisation, the noise and the batch order, not the held-out facts (those are ``data.seed``'s),
so the difference varies with the seed as well as with the facts. We use a two-level bootstrap:
each resample draws ``S`` seeds with replacement and, for every drawn seed, an independent
stratified fact resample of that seed's per-prompt values; its statistic is the mean over the
``S`` drawn seeds. The interval thus covers the mean difference a new set of ``S`` seeds on a
new draw of facts would give. Beside it we report the across-seed sample std (``ddof=1``) of
each seed's observed difference, the spread a single run shows. With one seed the two-level
bootstrap is the fact bootstrap of that run.

Inputs are per-prompt arrays: ``a``/``b`` correctness (0/1, e.g. ``rank == 1``) or reciprocal
ranks, ``relation`` (index into the relations) and ``fact`` (the prompt's fact id, e.g.
``EncodedPrompts.fact_index``). Relations without prompts get NaN and are left out of macro.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from lamp_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Interval:
    """Observed difference ``a - b`` and its percentile interval, per relation ``[R]`` and
    macro. Seed-level results also carry ``seed_std`` (the across-seed std of each seed's
    observed difference; NaN for one seed)."""

    observed: np.ndarray
    low: np.ndarray
    high: np.ndarray
    macro_observed: float
    macro_low: float
    macro_high: float
    resamples: int
    confidence: float
    seed_std: np.ndarray | None = None
    macro_seed_std: float | None = None

    @property
    def excludes_zero(self) -> np.ndarray:
        """``[R]`` whether the interval lies strictly above or strictly below 0."""
        return (self.low > 0) | (self.high < 0)

    @property
    def macro_excludes_zero(self) -> bool:
        return bool(self.macro_low > 0 or self.macro_high < 0)

    def summary(self, relations: Sequence[str]) -> dict[str, Any]:
        """A json-ready dict: per relation and macro, observed, interval and excludes_zero."""
        def row(observed, low, high, std):
            out = {"observed": float(observed), "low": float(low), "high": float(high),
                   "excludes_zero": bool(low > 0 or high < 0)}
            return out if std is None else {**out, "seed_std": float(std)}

        stds = self.seed_std if self.seed_std is not None else [None] * len(relations)
        return {"confidence": self.confidence, "resamples": self.resamples,
                "macro": row(self.macro_observed, self.macro_low, self.macro_high,
                             self.macro_seed_std),
                "per_relation": {r: row(self.observed[i], self.low[i], self.high[i], stds[i])
                                 for i, r in enumerate(relations)
                                 if not np.isnan(self.observed[i])}}


def _facts_of(relation: np.ndarray, fact: np.ndarray, num_relations: int):
    """Per relation: the prompts' fact positions ``0..n_r-1`` (``inverse``), the prompt rows,
    and each fact's number of prompts."""
    out = []
    for r in range(num_relations):
        rows = np.flatnonzero(relation == r)
        _, inverse, sizes = np.unique(fact[rows], return_inverse=True, return_counts=True)
        out.append((rows, inverse, sizes.astype(np.float64)))
    return out


def _check(a: np.ndarray, relation: np.ndarray, fact: np.ndarray, resamples: int,
           confidence: float) -> None:
    if len(relation) == 0:
        raise UsageError("no prompts to resample")
    if a.shape[-1] != len(relation) or len(relation) != len(fact):
        raise UsageError(f"per-prompt arrays differ in length: values {a.shape[-1]}, relation "
                         f"{len(relation)}, fact {len(fact)}")
    if resamples < 1 or not 0 < confidence < 1:
        raise UsageError(f"need resamples >= 1 and 0 < confidence < 1, got {resamples}, "
                         f"{confidence}")


def _interval(stats: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail], axis=0)
    return low, high


def _macro(per_relation: np.ndarray) -> np.ndarray:
    """Mean over relations (last axis), leaving out relations without prompts (NaN)."""
    present = ~np.isnan(per_relation[0])
    return per_relation[..., present].mean(axis=-1)


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    relation: np.ndarray,
    fact: np.ndarray,
    num_relations: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Stratified fact bootstrap of ``mean(a - b)`` per relation and macro (module docstring);
    ``a``, ``b``, ``relation``, ``fact`` are ``[N]``, one entry per held-out prompt."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return _bootstrap(diff[None], relation, fact, num_relations, resamples, seed, confidence,
                      over_seeds=False)


def seed_fact_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    relation: np.ndarray,
    fact: np.ndarray,
    num_relations: int | None = None,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Two-level bootstrap (seeds, then facts within each drawn seed) of the mean over seeds of
    ``a - b``; ``a`` is ``[S, N]`` (one row per seed), ``b`` ``[S, N]`` or ``[N]`` (e.g. the
    full model, the same for every seed). ``observed`` is the mean over seeds of each seed's
    difference, ``seed_std`` its across-seed std (module docstring)."""
    a = np.asarray(a, np.float64)
    if a.ndim != 2:
        raise UsageError(f"a must be [seeds, prompts], got shape {a.shape}")
    diff = a - np.broadcast_to(np.asarray(b, np.float64), a.shape)
    return _bootstrap(diff, relation, fact, num_relations, resamples, seed, confidence,
                      over_seeds=True)


def _bootstrap(diff, relation, fact, num_relations, resamples, seed, confidence, over_seeds
               ) -> Interval:
    """``diff`` [S, N]. Each resample: S seed slots (drawn with replacement when
    ``over_seeds``, else the one seed), each with its own stratified fact resample."""
    relation, fact = np.asarray(relation, np.int64), np.asarray(fact, np.int64)
    _check(diff, relation, fact, resamples, confidence)
    seeds = diff.shape[0]
    num_relations = int(relation.max()) + 1 if num_relations is None else int(num_relations)
    rng = np.random.default_rng(seed)
    drawn_seeds = (rng.integers(0, seeds, size=(resamples, seeds)) if over_seeds
                   else np.zeros((resamples, seeds), np.int64))
    observed = np.full((seeds, num_relations), np.nan)  # each seed's difference per relation
    stats = np.full((resamples, num_relations), np.nan)
    for r, (rows, inverse, sizes) in enumerate(_facts_of(relation, fact, num_relations)):
        if len(rows) == 0:
            continue
        per_fact = np.zeros((seeds, len(sizes)))  # [S, n_r] sum of a - b over the fact's prompts
        np.add.at(per_fact, (slice(None), inverse), diff[:, rows])
        observed[:, r] = per_fact.sum(axis=1) / sizes.sum()
        n = len(sizes)
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=(resamples, seeds))  # [B, S, n]
        totals = np.einsum("bsf,bsf->bs", weights, per_fact[drawn_seeds])
        stats[:, r] = (totals / (weights @ sizes)).mean(axis=1)
    low, high = _interval(stats, confidence)
    macro_low, macro_high = _interval(_macro(stats), confidence)
    by_seed_macro = _macro(observed)
    seed_std = macro_std = None
    if over_seeds:
        seed_std = (observed.std(axis=0, ddof=1) if seeds > 1
                    else np.full(num_relations, np.nan))
        macro_std = float(by_seed_macro.std(ddof=1)) if seeds > 1 else float("nan")
    return Interval(observed.mean(axis=0), low, high, float(by_seed_macro.mean()),
                    float(macro_low), float(macro_high), resamples, confidence, seed_std,
                    macro_std)
