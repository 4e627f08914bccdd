"""Metrics on hand-made scores whose P@1, P@3, MRR, micro and macro are known and all differ."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.ranking import RankingResult, object_rank


def test_rank_counts_only_strictly_higher_scores():
    logits = jnp.asarray([[0.1, 0.9, 0.5, 0.9],    # object 2: 0.9 and 0.9 are higher -> rank 3
                          [0.7, 0.2, 0.7, 0.1],    # object 0: a tie with token 2 -> rank 1
                          [0.0, 0.0, 0.0, 1.0]])   # object 3: the best -> rank 1
    np.testing.assert_array_equal(object_rank(logits, jnp.asarray([2, 0, 3])), [3, 1, 1])


def _result(ranks_per_relation, ks=(1, 3)):
    hits = np.array([[sum(r <= k for r in ranks) for k in ks] for ranks in ranks_per_relation],
                    float)
    rr = np.array([sum(1 / r for r in ranks) for ranks in ranks_per_relation])
    count = np.array([len(ranks) for ranks in ranks_per_relation], float)
    return RankingResult(("A", "B", "C"), ks, hits, rr, count)


def test_micro_macro_p_at_k_and_mrr_by_hand():
    # A: ranks 1, 2, 4; B: ranks 1, 1; C: no prompts (left out of macro means).
    result = _result([[1, 2, 4], [1, 1], []])
    np.testing.assert_allclose(result.precision_at(1)[:2], [1 / 3, 1.0])
    np.testing.assert_allclose(result.precision_at(3)[:2], [2 / 3, 1.0])
    assert np.isnan(result.precision_at(1)[2])
    assert result.micro(1) == pytest.approx(3 / 5)      # pooled: 3 of 5 prompts at rank 1
    assert result.macro(1) == pytest.approx(2 / 3)      # mean of 1/3 and 1
    assert result.micro(3) == pytest.approx(4 / 5)
    assert result.macro(3) == pytest.approx(5 / 6)
    summary = result.summary()
    assert summary["micro_MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 + 1) / 5)   # 0.75
    assert summary["macro_MRR"] == pytest.approx(((1 + 1 / 2 + 1 / 4) / 3 + 1) / 2)  # 0.7917
    assert summary["count"] == 5 and set(summary["per_relation"]) == {"A", "B"}
    # The reference's bugs would give other numbers: swapped macro/micro, doubled denominator.
    assert result.macro(1) != result.micro(1) and result.micro(1) != 3 / 10
