"""Tests of control masks (lamp_jax.analysis.control_masks) and mask-free baselines
(lamp_jax.analysis.baselines), each against a plain numpy / Python computation."""

from __future__ import annotations

import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.analysis.baselines import (
    candidate_matrix,
    object_fact_counts,
    prior_ranks,
    relation_prior,
    restricted_rank,
)
from lamp_jax.analysis.control_masks import (
    magnitude_masks,
    pruned_counts,
    random_mask_draws,
    random_masks,
    relation_multipliers,
)
from lamp_jax.masks import (
    MATRIX_PATHS,
    MaskInit,
    MaskMode,
    MaskSpec,
    init_mask_logits,
    iter_masks,
    multiply_masks,
)

THRESHOLD = 0.3  # not the default, so a function that ignores it is caught


def _params(seed: int = 0) -> dict:
    """Two layers of kernels at BERT's paths; ties in |W| on purpose (values on a coarse grid,
    both signs)."""
    rng = np.random.default_rng(seed)

    def kernel(shape):
        return jnp.asarray(rng.integers(-6, 7, size=shape) / 4.0, jnp.float32)

    layer = lambda: {"attention": {"query": {"kernel": kernel((6, 5))},  # noqa: E731
                                   "value": {"kernel": kernel((6, 5))}},
                     "ffn_in": {"kernel": kernel((6, 9))}}
    return {"layer_0": layer(), "layer_1": layer(), "embeddings": {"word": kernel((11, 6))}}


SPEC = MaskSpec(layers=(0, 1), matrices=("query", "value", "ffn_in"))
RELATIONS = 4


@pytest.fixture(scope="module")
def learned():
    params = _params()
    logits = init_mask_logits(SPEC, params, RELATIONS, MaskInit("normal", 0.0, 1.5),
                              MaskMode(), jax.random.PRNGKey(3))
    # One relation prunes nothing, one prunes everything in a leaf: the edge counts.
    logits["layer_0"]["ffn_in"]["kernel"] = logits["layer_0"]["ffn_in"]["kernel"].at[1].set(9.0)
    logits["layer_1"]["attention"]["query"]["kernel"] = (
        logits["layer_1"]["attention"]["query"]["kernel"].at[2].set(-9.0))
    return params, logits


def _numpy_pruned(logits) -> list[np.ndarray]:
    """[R] pruned count of every leaf in spec order, by numpy: sigmoid(G) <= t."""
    return [np.sum(1 / (1 + np.exp(-np.asarray(g, np.float64))) <= THRESHOLD, axis=(1, 2))
            for _, _, g in iter_masks(logits, SPEC)]


def test_control_masks_prune_exactly_the_learned_counts(learned):
    params, logits = learned
    expected = _numpy_pruned(logits)
    assert [np.asarray(c).tolist() for _, _, c in iter_masks(
        pruned_counts(logits, THRESHOLD), SPEC)] == [e.tolist() for e in expected]
    assert any(0 in e for e in expected) and any(30 in e for e in expected)  # the edges occur
    draws = random_mask_draws(0, logits, draws=5, threshold=THRESHOLD)
    magnitude = magnitude_masks(params, logits, THRESHOLD)
    for index, (_, _, leaf) in enumerate(iter_masks(draws, SPEC)):
        leaf = np.asarray(leaf)
        assert set(np.unique(leaf).tolist()) <= {0.0, 1.0}
        for k in range(5):
            assert np.sum(leaf[k] == 0, axis=(1, 2)).tolist() == expected[index].tolist()
    for index, (_, _, leaf) in enumerate(iter_masks(magnitude, SPEC)):
        assert np.sum(np.asarray(leaf) == 0, axis=(1, 2)).tolist() == expected[index].tolist()


def test_random_draws_differ_between_seeds_and_draws(learned):
    _, logits = learned
    a = random_masks(1, logits, THRESHOLD)
    b = random_masks(2, logits, THRESHOLD)
    same = random_masks(1, logits, THRESHOLD)
    leaf = lambda tree: np.asarray(tree["layer_1"]["ffn_in"]["kernel"])  # noqa: E731
    assert not np.array_equal(leaf(a), leaf(b))
    assert np.array_equal(leaf(a), leaf(same))
    draws = leaf(random_mask_draws(1, logits, 5, THRESHOLD))
    assert len({d.tobytes() for d in draws}) == 5
    assert not np.array_equal(draws[0, 0], draws[0, 3])  # relations draw independently


def test_random_masks_choose_every_subset_equally_often():
    # One 2 x 3 leaf whose learned mask prunes k = 2 of its n = 6 entries: 15 possible sets.
    leaf = jnp.asarray([[[-1.0, 2.0, 2.0], [2.0, -1.0, 2.0]]])
    logits = {"layer_0": {"ffn_in": {"kernel": leaf}}}
    draws = 15 * 400
    leaves = np.asarray(random_mask_draws(7, logits, draws)["layer_0"]
                        ["ffn_in"]["kernel"]).reshape(draws, 6)
    found = collections.Counter(tuple(np.flatnonzero(row == 0).tolist()) for row in leaves)
    subsets = list(itertools.combinations(range(6), 2))
    assert set(found) == set(subsets)
    observed = np.array([found[s] for s in subsets])
    chi_square = np.sum((observed - 400) ** 2 / 400)
    assert chi_square < 36.12, chi_square  # the 0.999 quantile of chi-square with 14 dof


def test_magnitude_masks_prune_the_smallest_weights(learned):
    params, logits = learned
    expected_counts = _numpy_pruned(logits)
    magnitude = magnitude_masks(params, logits, THRESHOLD)
    for index, (layer, matrix, leaf) in enumerate(iter_masks(magnitude, SPEC)):
        kernel = params[f"layer_{layer}"]
        for key in MATRIX_PATHS[matrix]:
            kernel = kernel[key]
        flat = np.abs(np.asarray(kernel)).ravel()
        assert len(np.unique(flat)) < flat.size  # ties do occur
        order = np.lexsort((np.arange(flat.size), flat))  # by |W|, then by flat index
        for r in range(RELATIONS):
            want = np.ones(flat.size)
            want[order[: expected_counts[index][r]]] = 0
            assert np.array_equal(np.asarray(leaf[r]).ravel(), want), (layer, matrix, r)


def test_control_masks_plug_into_multiply_masks(learned):
    params, logits = learned
    masks = random_masks(4, logits, THRESHOLD)
    pruned = multiply_masks(params, relation_multipliers(masks, 2))
    kernel = np.asarray(params["layer_0"]["ffn_in"]["kernel"])
    mask = np.asarray(masks["layer_0"]["ffn_in"]["kernel"][2])
    assert np.array_equal(np.asarray(pruned["layer_0"]["ffn_in"]["kernel"]), kernel * mask)
    assert np.array_equal(pruned["embeddings"]["word"], params["embeddings"]["word"])


# --- baselines --------------------------------------------------------------------------------


def _prompts(seed: int = 0, vocab: int = 12, relations: int = 3, facts: int = 40):
    """relation, obj_id, fact_index per prompt: 1-3 prompts per fact, objects with ties."""
    rng = np.random.default_rng(seed)
    rel, obj, fact = [], [], []
    for f in range(facts):
        r, o = int(rng.integers(relations)), int(rng.integers(vocab // 2) * 2)
        for _ in range(int(rng.integers(1, 4))):
            rel.append(r), obj.append(o), fact.append(f)
    return np.array(rel), np.array(obj), np.array(fact)


def test_relation_prior_counts_facts_and_breaks_ties_by_smallest_id():
    rel, obj, fact = _prompts()
    counts = object_fact_counts(rel, obj, fact, 4, 12)  # relation 3 has no facts
    distinct = {(int(r), int(f), int(o)) for r, o, f in zip(rel, obj, fact, strict=True)}
    by_python = collections.Counter((r, o) for r, _, o in distinct)
    assert all(counts[r, o] == n for (r, o), n in by_python.items())
    assert counts.sum() == len(distinct)
    prior = relation_prior(counts)
    for r in range(3):
        items = [(o, n) for (rr, o), n in by_python.items() if rr == r]
        best = sorted(items, key=lambda item: (-item[1], item[0]))[0][0]
        assert prior[r] == best
    assert prior[3] == -1
    tied = np.array([[0, 2, 5, 5, 1]])
    assert relation_prior(tied).tolist() == [2]


def test_prior_ranks_follow_the_frequency_ordering():
    rel, obj, fact = _prompts()
    counts = object_fact_counts(rel, obj, fact, 3, 12)
    held_rel, held_obj = np.array([0, 1, 2, 0, 1, 2, 0]), np.array([0, 2, 4, 11, 7, 6, 1])
    ranks = prior_ranks(counts, held_rel, held_obj)
    prior = relation_prior(counts)
    for r, o, rank in zip(held_rel, held_obj, ranks, strict=True):
        ordering = sorted(range(12), key=lambda v, r=r: (-counts[r, v], v))
        assert rank == ordering.index(o) + 1
        assert (rank == 1) == (o == prior[r])


def test_candidate_matrix_and_restricted_rank_match_numpy():
    rel, obj, _ = _prompts(vocab=30)
    candidates = candidate_matrix(rel, obj, 3, 30)
    assert {(r, o) for r, o in zip(rel.tolist(), obj.tolist(), strict=True)} == {
        tuple(x) for x in np.argwhere(candidates).tolist()}
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 30)).astype(np.float32)
    logits[:8, :] = np.round(logits[:8, :])  # ties in some rows
    prompt_rel = rng.integers(3, size=64)
    prompt_obj = np.array([rng.choice(np.flatnonzero(candidates[r])) if i % 4 else
                           rng.integers(30) for i, r in enumerate(prompt_rel)])
    got = np.asarray(restricted_rank(jnp.asarray(logits), jnp.asarray(prompt_obj),
                                     jnp.asarray(candidates[prompt_rel])))
    for i in range(64):
        scores = np.sort(logits[i, candidates[prompt_rel[i]]])[::-1]
        target = logits[i, prompt_obj[i]]
        assert got[i] == 1 + np.searchsorted(-scores, -target, side="left")
        if i >= 8 and candidates[prompt_rel[i], prompt_obj[i]]:  # no ties: argmax agrees
            best = np.flatnonzero(candidates[prompt_rel[i]])[
                np.argmax(logits[i, candidates[prompt_rel[i]]])]
            assert (got[i] == 1) == (best == prompt_obj[i])
    last = np.asarray(restricted_rank(jnp.asarray(logits), jnp.asarray(prompt_obj),
                                      jnp.asarray(candidates[prompt_rel]), outside="last"))
    inside = candidates[prompt_rel, prompt_obj]
    assert (~inside).sum() >= 5 and inside.sum() >= 5
    assert np.array_equal(last[inside], got[inside])
    assert np.array_equal(last[~inside], 1 + candidates[prompt_rel[~inside]].sum(axis=1))
    every = np.asarray(restricted_rank(jnp.asarray(logits), jnp.asarray(prompt_obj),
                                       jnp.ones(30, bool)))
    assert np.array_equal(every, 1 + np.sum(logits > logits[np.arange(64), prompt_obj][:, None],
                                            axis=1))
