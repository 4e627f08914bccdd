"""Tests of lamp_jax.analysis.evidence: paired fact bootstrap and the two-level seed bootstrap,
against exact bootstrap distributions enumerated by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lamp_jax.analysis.evidence import paired_bootstrap, seed_fact_bootstrap

LEVELS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _exact_quantile(values, probabilities, q) -> tuple[float, float]:
    """The q-quantile (smallest x with CDF(x) >= q) of a discrete distribution, and how far q is
    from the CDF's jumps around it (a bootstrap with many resamples lands on x when this
    margin is well above its sampling noise)."""
    atoms: dict[float, float] = {}
    for v, p in zip(values, probabilities, strict=True):
        key = round(float(v), 12)
        atoms[key] = atoms.get(key, 0.0) + p
    xs = sorted(atoms)
    cdf = np.cumsum([atoms[x] for x in xs])
    i = int(np.searchsorted(cdf, q - 1e-12))
    below = cdf[i - 1] if i else 0.0
    return xs[i], min(q - below, cdf[i] - q)


def _fact_resamples(per_fact_sum, per_fact_size):
    """Every equally likely ordered draw of n facts out of n, with its statistic."""
    n = len(per_fact_sum)
    for draw in itertools.product(range(n), repeat=n):
        yield sum(per_fact_sum[i] for i in draw) / sum(per_fact_size[i] for i in draw)


def _prompts(per_fact_values):
    """relation 0's prompts from a list of per-fact value lists: (diff, fact)."""
    diff = [v for values in per_fact_values for v in values]
    fact = [f for f, values in enumerate(per_fact_values) for _ in values]
    return np.array(diff, float), np.array(fact)


def _check_against_exact(interval_at, values, probabilities, low_attr="low", index=0):
    """The bootstrap's bounds at every level in LEVELS equal the exact quantiles, wherever
    the exact CDF is not within 0.006 of the level's tail (at least 4 of the 12 bounds)."""
    checked = 0
    for level in LEVELS:
        tail = (1 - level) / 2
        (low, low_margin), (high, high_margin) = (
            _exact_quantile(values, probabilities, q) for q in (tail, 1 - tail))
        result = interval_at(level)
        got_low = getattr(result, low_attr)
        got_high = getattr(result, low_attr.replace("low", "high"))
        if index is not None:
            got_low, got_high = got_low[index], got_high[index]
        if low_margin > 0.006:
            assert got_low == pytest.approx(low, abs=1e-12), (level, "low")
            checked += 1
        if high_margin > 0.006:
            assert got_high == pytest.approx(high, abs=1e-12), (level, "high")
            checked += 1
    assert checked >= 4, checked


def test_identical_systems_give_exactly_zero():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 50).astype(float)
    result = paired_bootstrap(a, a, rng.integers(0, 3, 50), np.arange(50) // 2)
    assert np.all(result.low == 0) and np.all(result.high == 0)
    assert result.macro_low == result.macro_high == 0
    assert not result.excludes_zero.any() and not result.macro_excludes_zero


@pytest.mark.parametrize("a_value, b_value", [(1.0, 0.0), (0.75, 0.25), (0.0, 0.5)])
def test_a_constant_difference_gives_a_degenerate_interval(a_value, b_value):
    relation = np.repeat([0, 1, 2], [7, 3, 12])
    fact = np.arange(22) // 3
    result = paired_bootstrap(np.full(22, a_value), np.full(22, b_value), relation, fact)
    d = a_value - b_value
    assert np.all(result.low == d) and np.all(result.high == d) and np.all(result.observed == d)
    assert result.macro_low == result.macro_high == result.macro_observed == d
    assert result.macro_excludes_zero and result.excludes_zero.all()


# Four facts of 1, 2, 3 and 1 prompts; correctness of a and b per prompt.
A = [[1], [1, 0], [1, 1, 1], [0]]
B = [[0], [0, 0], [1, 0, 0], [0]]


def test_interval_is_the_exact_fact_bootstrap_quantile():
    a, fact = _prompts(A)
    b, _ = _prompts(B)
    sums = [sum(x) - sum(y) for x, y in zip(A, B, strict=True)]
    sizes = [len(x) for x in A]
    values = list(_fact_resamples(sums, sizes))
    probabilities = [1 / len(values)] * len(values)

    def at(level):
        return paired_bootstrap(a, b, np.zeros(len(a), int), fact, resamples=40_000, seed=1,
                                confidence=level)

    _check_against_exact(at, values, probabilities)
    result = at(0.95)
    assert result.observed[0] == pytest.approx(sum(sums) / sum(sizes))
    assert result.macro_observed == result.observed[0]
    assert result.macro_low == result.low[0] and result.macro_high == result.high[0]


def test_a_facts_sentences_are_resampled_together():
    # Fact 0: six prompts where a wins; facts 1-5: one prompt each, a tie.
    per_fact = [[1.0] * 6, [0.0], [0.0], [0.0], [0.0], [0.0]]
    diff, fact = _prompts(per_fact)
    values = list(_fact_resamples([6.0, 0, 0, 0, 0, 0], [6, 1, 1, 1, 1, 1]))
    probabilities = [1 / len(values)] * len(values)
    relation = np.zeros(len(diff), int)

    def by_fact(level):
        return paired_bootstrap(diff, np.zeros_like(diff), relation, fact, resamples=40_000,
                                confidence=level)

    _check_against_exact(by_fact, values, probabilities)
    result = by_fact(0.95)
    # (5/6)^6 of the resamples hold no fact 0; fewer than 2.5 % hold it 4 times or more.
    assert result.low[0] == 0.0 and result.high[0] == pytest.approx(18 / 21)
    # Resampling the 11 sentences one by one: a binomial(11, 6/11) share, far from 0.
    by_sentence = paired_bootstrap(diff, np.zeros_like(diff), relation, np.arange(len(diff)),
                                   resamples=40_000)
    assert by_sentence.low[0] > 0.2


def test_resampling_is_stratified_by_relation():
    # Two relations of two facts each: the macro's exact distribution is the convolution of the
    # two relations' own resamples (each keeps two facts); pooled resampling would differ.
    first, second = [[1.0], [0.0, 0.0]], [[1.0, 1.0, 0.0], [0.0]]
    d1, f1 = _prompts(first)
    d2, f2 = _prompts(second)
    diff = np.concatenate([d1, d2])
    relation = np.repeat([0, 1], [len(d1), len(d2)])
    fact = np.concatenate([f1, f2 + 10])
    one = list(_fact_resamples([1.0, 0.0], [1, 2]))
    two = list(_fact_resamples([2.0, 0.0], [3, 1]))
    values = [(x + y) / 2 for x in one for y in two]
    probabilities = [1 / len(values)] * len(values)

    def at(level):
        return paired_bootstrap(diff, np.zeros_like(diff), relation, fact, resamples=40_000,
                                seed=3, confidence=level)

    _check_against_exact(at, values, probabilities, "macro_low", index=None)
    _check_against_exact(at, one, [1 / len(one)] * len(one), index=0)
    assert at(0.95).macro_observed == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_same_seed_same_interval_other_seed_other_draws():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 2, (2, 200)).astype(float)
    relation, fact = rng.integers(0, 4, 200), np.arange(200) // 2
    first = paired_bootstrap(a, b, relation, fact, seed=9)
    again = paired_bootstrap(a, b, relation, fact, seed=9)
    other = paired_bootstrap(a, b, relation, fact, seed=10)
    assert np.array_equal(first.low, again.low) and np.array_equal(first.high, again.high)
    assert not (np.array_equal(first.low, other.low) and np.array_equal(first.high, other.high))
    # Relations without prompts: NaN, and left out of macro.
    sparse = paired_bootstrap(a, b, relation * 2, fact, num_relations=8)
    assert np.isnan(sparse.observed[1::2]).all()
    assert sparse.macro_observed == pytest.approx(np.mean(first.observed))


def test_two_level_bootstrap_resamples_seeds_exactly():
    # Differences constant within each seed: the fact level adds nothing, and the statistic is
    # the mean of three seeds drawn with replacement from these three.
    per_seed = np.array([0.0, 0.25, 1.0])
    relation, fact = np.repeat([0, 1], [6, 4]), np.arange(10) // 2
    a = np.repeat(per_seed[:, None], 10, axis=1)
    values = [np.mean(per_seed[list(draw)]) for draw in itertools.product(range(3), repeat=3)]
    probabilities = [1 / 27] * 27

    def at(level):
        return seed_fact_bootstrap(a, np.zeros(10), relation, fact, resamples=40_000,
                                   confidence=level)

    _check_against_exact(at, values, probabilities, "macro_low", index=None)
    _check_against_exact(at, values, probabilities, index=1)
    result = at(0.95)
    assert result.macro_observed == pytest.approx(per_seed.mean())
    assert result.macro_seed_std == pytest.approx(per_seed.std(ddof=1))
    assert result.seed_std == pytest.approx([per_seed.std(ddof=1)] * 2)


def test_two_level_bootstrap_of_one_seed_is_the_fact_bootstrap():
    a, fact = _prompts(A)
    b, _ = _prompts(B)
    sums = [sum(x) - sum(y) for x, y in zip(A, B, strict=True)]
    values = list(_fact_resamples(sums, [len(x) for x in A]))
    probabilities = [1 / len(values)] * len(values)

    def at(level):
        return seed_fact_bootstrap(a[None], b, np.zeros(len(a), int), fact, resamples=40_000,
                                   seed=2, confidence=level)

    _check_against_exact(at, values, probabilities)
    assert np.isnan(at(0.9).macro_seed_std)


def test_two_level_bootstrap_adds_the_fact_level_within_each_seed():
    # Two seeds with the same per-prompt values: the seed draw changes nothing, so the two-level
    # statistic is the mean of two independent fact resamples of one seed: enumerate it.
    per_fact = [[1.0, 1.0], [0.0]]
    a, fact = _prompts(per_fact)
    single = list(_fact_resamples([2.0, 0.0], [2, 1]))  # 0, 2/3, 2/3, 1
    values = [(x + y) / 2 for x in single for y in single]
    probabilities = [1 / len(values)] * len(values)

    def at(level):
        return seed_fact_bootstrap(np.stack([a, a]), np.zeros_like(a), np.zeros(len(a), int),
                                   fact, resamples=40_000, seed=4, confidence=level)

    _check_against_exact(at, values, probabilities)
    assert at(0.95).macro_seed_std == 0.0
