"""Tests of lamp_jax.analysis.stability: overlap of pruned sets, its chance level (exact
enumeration and Monte Carlo), between relations and across seeds; and its heat map."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from lamp_jax.analysis.stability import (
    expected_intersection,
    expected_jaccard,
    overlap_across_seeds,
    overlap_between_relations,
    pruned_sets,
)
from lamp_jax.masks import MaskSpec, logit, sparsity_stats
from lamp_jax.plots import overlap_heatmap

THRESHOLD = 0.4
SPEC = MaskSpec(layers=(0, 1), matrices=("value", "ffn_out"))


def _logits(rng, relations=4, shift=None):
    """Mask logits of SPEC's leaves [R, in, out], each relation with its own sparsity."""
    shift = rng.normal(size=relations) if shift is None else shift

    def leaf(shape):
        return rng.normal(size=(relations, *shape)) + shift[:, None, None]

    return {f"layer_{i}": {"attention": {"value": {"kernel": leaf((8, 6))}},
                           "ffn_out": {"kernel": leaf((12, 8))}} for i in (0, 1)}


def _by_enumeration(k1: int, k2: int, n: int) -> float:
    """E[J] with A = {0..k1-1} fixed (no loss, by symmetry) and B every k2-subset."""
    values = [len(set(b) & set(range(k1))) / len(set(b) | set(range(k1)))
              for b in itertools.combinations(range(n), k2)]
    return float(np.mean(values))


def _by_full_sum(k1: int, k2: int, n: int) -> float:
    """E[J] summed over the whole support: in exact rational arithmetic (math.comb) for a
    support of up to 100 terms, else with log-binomials from math.lgamma."""
    support = range(max(0, k1 + k2 - n), min(k1, k2) + 1)
    if len(support) <= 100:
        total = sum(Fraction(math.comb(k1, i) * math.comb(n - k1, k2 - i), k1 + k2 - i) * i
                    for i in support)
        return float(total / math.comb(n, k2))

    def log_choose(a, b):
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    total = 0.0
    for i in support:
        p = math.exp(log_choose(k1, i) + log_choose(n - k1, k2 - i) - log_choose(n, k2))
        total += p * i / (k1 + k2 - i)
    return total


@pytest.mark.parametrize("k1, k2, n", [(3, 5, 10), (1, 1, 6), (6, 7, 9), (0, 4, 8), (8, 8, 8)])
def test_expected_jaccard_is_exact_on_small_sets(k1, k2, n):
    assert expected_jaccard(k1, k2, n) == pytest.approx(_by_enumeration(k1, k2, n), rel=1e-12)
    assert expected_jaccard(k2, k1, n) == pytest.approx(expected_jaccard(k1, k2, n), rel=1e-12)


def test_expected_jaccard_is_not_the_ratio_of_expectations_and_matches_monte_carlo():
    k1, k2, n = 3, 5, 10
    ratio_of_expectations = (k1 * k2 / n) / (k1 + k2 - k1 * k2 / n)
    assert abs(expected_jaccard(k1, k2, n) - ratio_of_expectations) > 0.01
    rng = np.random.default_rng(0)
    k1, k2, n, draws = 60, 90, 200, 20_000
    a = np.argsort(rng.random((draws, n)), axis=1) < k1
    b = np.argsort(rng.random((draws, n)), axis=1) < k2
    inter = (a & b).sum(axis=1)
    jaccard = inter / (a | b).sum(axis=1)
    se = jaccard.std() / math.sqrt(draws)
    assert abs(jaccard.mean() - expected_jaccard(k1, k2, n)) < 4 * se
    assert abs(inter.mean() - expected_intersection(k1, k2, n)) < 4 * inter.std() / math.sqrt(
        draws)


@pytest.mark.parametrize("k1, k2, n", [(400_000, 300_000, 1_000_000), (3, 5, 1_000_000),
                                       (999_990, 999_995, 1_000_000), (20, 3000, 1_000_000)])
def test_expected_jaccard_of_large_sets_equals_the_full_sum(k1, k2, n):
    assert expected_jaccard(k1, k2, n) == pytest.approx(_by_full_sum(k1, k2, n), rel=1e-9)


def test_pruned_sets_are_the_hard_masks_zeros():
    logits = _logits(np.random.default_rng(1))
    sets = pruned_sets(logits, SPEC, THRESHOLD)
    stats = sparsity_stats(logits, SPEC, THRESHOLD)
    for name, pruned in sets.items():
        np.testing.assert_allclose(pruned.mean(axis=1), stats[name])
    leaf = logits["layer_1"]["ffn_out"]["kernel"]
    assert np.array_equal(sets["layer_1/ffn_out"], (leaf <= logit(THRESHOLD)).reshape(4, -1))


def _naive(a: np.ndarray, b: np.ndarray, n: int) -> tuple[float, float]:
    """J and E[J] of two boolean pruned sets, by sets."""
    sa, sb = set(np.flatnonzero(a).tolist()), set(np.flatnonzero(b).tolist())
    return len(sa & sb) / len(sa | sb), expected_jaccard(len(sa), len(sb), n)


def test_overlap_between_relations_matches_a_set_computation():
    logits = _logits(np.random.default_rng(2))
    result = overlap_between_relations(logits, SPEC, THRESHOLD)
    sets = pruned_sets(logits, SPEC, THRESHOLD)
    for name, pruned in sets.items():
        for a, b in itertools.product(range(4), repeat=2):
            jaccard, expected = _naive(pruned[a], pruned[b], pruned.shape[1])
            assert result[name].jaccard[a, b] == pytest.approx(jaccard)
            assert result[name].expected[a, b] == pytest.approx(expected)
            assert result[name].ratio[a, b] == pytest.approx(jaccard / expected)
    pooled = np.concatenate(list(sets.values()), axis=1)
    sizes = [p.shape[1] for p in sets.values()]
    for a, b in itertools.product(range(4), repeat=2):
        union = np.count_nonzero(pooled[a] | pooled[b])
        assert result["total"].jaccard[a, b] == pytest.approx(
            np.count_nonzero(pooled[a] & pooled[b]) / union)
        e_inter = sum(p[a].sum() * p[b].sum() / n for p, n in zip(sets.values(), sizes,
                                                                  strict=True))
        e_union = pooled[a].sum() + pooled[b].sum() - e_inter
        assert result["total"].expected[a, b] == pytest.approx(e_inter / e_union)
    assert np.allclose(np.diag(result["total"].jaccard), 1.0)


def _random_tree(rng, counts: dict[str, int]):
    """Mask logits of one relation whose leaf ``name`` prunes ``counts[name]`` uniformly random
    entries (-1 there, +1 elsewhere)."""
    tree: dict = {}
    for name, k in counts.items():
        layer, matrix = name.split("/")
        shape = (8, 6) if matrix == "value" else (12, 8)
        values = np.ones(shape[0] * shape[1])
        values[rng.permutation(values.size)[:k]] = -1.0
        leaf = values.reshape(1, *shape)
        node = tree.setdefault(layer, {})
        node = node.setdefault("attention", {}) if matrix == "value" else node
        node.setdefault("value" if matrix == "value" else "ffn_out", {})["kernel"] = leaf
    return tree


def test_random_masks_overlap_at_chance_level_per_matrix_and_in_total():
    # Independent uniformly random pruned sets of fixed sizes: the mean J over many draws is
    # E[J] per matrix, and the pooled J's mean is the total's chance level.
    rng = np.random.default_rng(3)
    first = {"layer_0/value": 10, "layer_0/ffn_out": 60, "layer_1/value": 30,
             "layer_1/ffn_out": 5}
    second = {"layer_0/value": 20, "layer_0/ffn_out": 40, "layer_1/value": 40,
              "layer_1/ffn_out": 50}
    draws = 4000
    rows: dict[str, list[float]] = {name: [] for name in (*first, "total")}
    for _ in range(draws):
        pairs, result = overlap_across_seeds([_random_tree(rng, first),
                                              _random_tree(rng, second)], SPEC, THRESHOLD)
        for name in rows:
            rows[name].append(result[name].jaccard[0, 0])
    assert pairs == [(0, 1)]
    for name, values in rows.items():
        values = np.array(values)
        expected = result[name].expected[0, 0]
        if name != "total":
            n = 48 if name.endswith("value") else 96
            assert expected == expected_jaccard(first[name], second[name], n)
        se = values.std() / math.sqrt(draws)
        assert abs(values.mean() - expected) < 4 * se, (name, values.mean(), expected, se)
        assert abs(np.mean(values / expected) - 1) < 4 * se / expected  # ratio ~ 1 at chance


def test_overlap_across_seeds_pairs_every_seed_once():
    rng = np.random.default_rng(4)
    trees = [_logits(rng) for _ in range(3)]
    pairs, result = overlap_across_seeds(trees, SPEC, THRESHOLD)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    assert result["total"].jaccard.shape == (3, 4)
    for p, (s, t) in enumerate(pairs):
        first, second = pruned_sets(trees[s], SPEC, THRESHOLD), pruned_sets(trees[t], SPEC,
                                                                            THRESHOLD)
        for r in range(4):
            jaccard, expected = _naive(first["layer_0/value"][r], second["layer_0/value"][r], 48)
            assert result["layer_0/value"].jaccard[p, r] == pytest.approx(jaccard)
            assert result["layer_0/value"].expected[p, r] == pytest.approx(expected)
    _, same = overlap_across_seeds([trees[0], trees[0]], SPEC, THRESHOLD)
    assert np.all(same["total"].jaccard == 1.0)
    with pytest.raises(ValueError, match="at least two seeds"):
        overlap_across_seeds(trees[:1], SPEC, THRESHOLD)


def test_overlap_heatmap_shows_the_matrix():
    relations = ["AtLocation", "IsA", "PartOf"]
    matrix = np.array([[1.0, 0.2, 0.4], [0.2, 1.0, 0.3], [0.4, 0.3, 1.0]])
    fig = overlap_heatmap(relations, matrix)
    ax = fig.axes[0]
    assert np.array_equal(ax.images[0].get_array(), matrix)
    assert [t.get_text() for t in ax.get_yticklabels()] == relations
    assert ax.images[0].get_clim() == (0.0, 1.0)
