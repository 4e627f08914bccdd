"""Analyses of a trained run: specialization, combination, KBC, representations, the report."""

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.analysis import combine, kbc, qa, representations, specialization
from lamp_jax.api import load_run
from lamp_jax.data import RelationBatcher, read_ckbc
from lamp_jax.embedded import ensure_embedded_model
from lamp_jax.models import load_mlm, mlm_forward
from lamp_jax.ranking import evaluate, make_rank_fn, specialization_matrix
from lamp_jax.report import world_triples, write_report
from tests import by_hand
from tests.needs import CKBC_DIR, require, require_path

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def run_dir(embedded_run_dir, tmp_path_factory):
    """A copy of the session's embedded run (tests/conftest.py): the report writes into it."""
    workdir = tmp_path_factory.mktemp("run") / "run"
    shutil.copytree(embedded_run_dir, workdir)
    return workdir


@pytest.fixture(scope="module")
def run(run_dir):
    return load_run(run_dir)


def _test_batches(run, run_dir):
    from lamp_jax.data import encode_facts, read_lama_set, split_by_fact

    info = json.loads((run_dir / "run.json").read_text())
    facts = read_lama_set(info["data"]).facts
    encoded, _ = encode_facts(facts, run.mlm.tokenizer, run.relations)
    fractions = tuple(info["config"]["data"]["fractions"])
    test = encoded.subset(split_by_fact(encoded, fractions, 0)["test"])
    return list(RelationBatcher(test, 16).eval_batches())


def test_specialization_matrix_equals_each_mask_broadcast_to_every_relation(run, run_dir):
    """The matrix moves prompts, not masks (R rolled evaluations). The reference: row a is
    one ordinary evaluation with relation a's mask copied to every relation's slot."""
    import jax

    batches = _test_batches(run, run_dir)
    rank_fn = make_rank_fn(run.mlm.config, run.mode)
    matrix = specialization_matrix(
        lambda g, b: evaluate(rank_fn, g, run.mlm.params, b, run.relations), run.mask_logits,
        batches, run.relations)
    num = len(run.relations)
    for a in range(num):
        broadcast = jax.tree.map(lambda g, a=a: np.repeat(g[a:a + 1], num, axis=0),
                                 run.mask_logits)
        row = evaluate(rank_fn, broadcast, run.mlm.params, batches, run.relations)
        np.testing.assert_allclose(matrix[a], row.precision_at(1), err_msg=run.relations[a])
    summary = specialization.summarize(matrix, np.zeros(len(matrix)))
    assert summary["own_mask_macro_P@1"] > summary["other_masks_macro_P@1"] + 0.1


def test_combinations_are_ordered_and_the_chooser_reports_its_search(run):
    ors = combine.combine(run.mask_logits, [0, 1, 2], "or")
    ands = combine.combine(run.mask_logits, [0, 1, 2], "and")
    votes = combine.combine(run.mask_logits, [0, 1, 2], "vote")
    single = combine.combine(run.mask_logits, [1], "soft")
    for o, a, v, s, g in zip(*(jax.tree.leaves(t) for t in (ors, ands, votes, single,
                                                          run.mask_logits)), strict=True):
        each = (np.asarray(g[:3]) > 0).astype(np.float32)
        assert np.all(np.asarray(o) >= each.max(0)) and np.all(np.asarray(a) <= each.min(0))
        assert np.all((np.asarray(a) <= np.asarray(v)) & (np.asarray(v) <= np.asarray(o)))
        np.testing.assert_allclose(s, jax.nn.sigmoid(g[1]), rtol=1e-6)
    # A score that prefers masks keeping many weights: the chooser must find the max.
    found = combine.choose_combination(
        lambda m: float(sum(jnp.sum(x) for x in jax.tree.leaves(m))), run.mask_logits,
        range(4), max_size=2, methods=("or", "and"))
    scores = [row["score"] for row in found["search"]]
    assert found["best"]["score"] == max(scores) and scores == sorted(scores, reverse=True)
    assert len(found["search"]) == 4 + 6 * 2  # singles once, pairs with both methods
    assert found["best"]["method"] == "or" and len(found["best"]["relations"]) == 2


def _check_hits(result):
    for side in ("full", "subnetwork"):
        h1, h3, h10, mrr = (result[side][k] for k in ("Hits@1", "Hits@3", "Hits@10", "MRR"))
        assert h1 <= h3 <= h10 <= 1.0
        assert h1 <= mrr <= h1 + (1 - h1) / 2 + 1e-9  # misses have rank >= 2


@pytest.fixture(scope="module")
def world_kbc(run):
    triples, templates = world_triples()
    return kbc.knowledge_base_completion(triples, run.mlm, run.mask_logits, run.relations,
                                         run.mode, templates), len(triples)


def test_knowledge_base_completion_on_the_world_equals_the_runs_three_splits(run, world_kbc):
    """The world's facts are exactly the run's train + dev + test prompts (one probe sentence
    each), so KBC's pooled Hits@k and MRR must be the splits' metrics pooled by count: the same
    numbers reached through triples, templates and encoding instead of the run's own data."""
    result, num_triples = world_kbc
    assert result["ranked"] == num_triples == 476
    assert sum(result["skipped_at_encoding"].values()) == 0
    _check_hits(result)
    for side, masks in (("full", None), ("subnetwork", "own")):
        splits = [run.evaluate(name, masks=masks) for name in ("train", "dev", "test")]
        count = sum(s.count.sum() for s in splits)
        assert count == num_triples
        for k in kbc.KS:
            pooled = sum(s.hits[:, s.ks.index(k)].sum() for s in splits) / count
            assert result[side][f"Hits@{k}"] == pytest.approx(pooled, rel=1e-9), (side, k)
        assert result[side]["MRR"] == pytest.approx(
            sum(s.reciprocal_rank_sum.sum() for s in splits) / count, rel=1e-6)
    # Measured: Hits@1 0.14 (full) -> 0.69 (subnetwork) with the 40-epoch default.
    assert result["subnetwork"]["Hits@1"] > result["full"]["Hits@1"] + 0.2


def test_knowledge_base_completion_on_ckbc(run):
    path = require_path(CKBC_DIR / "train.txt", "ConceptNet CKBC data (LAMP_JAX_CKBC_DIR)")
    lines = read_ckbc(path)[:400]
    result = kbc.knowledge_base_completion(lines, run.mlm, run.mask_logits, run.relations,
                                           run.mode)
    skipped = result["negative_label_skipped"] + sum(result["other_relation_skipped"].values())
    assert result["ranked"] + sum(result["skipped_at_encoding"].values()) + skipped == 400
    if result["ranked"]:
        _check_hits(result)


def test_silhouette_score_equals_scikit_learns():
    sklearn_metrics = require("sklearn.metrics")
    rng = np.random.default_rng(0)
    # Four overlapping clusters of unequal sizes in 5-D, and a cluster of one point (whose
    # silhouette is 0 by definition): a score well inside (0, 1).
    labels = np.repeat(np.arange(5), [7, 12, 20, 9, 1])
    centers = rng.normal(scale=2.0, size=(5, 5))
    points = centers[labels] + rng.normal(size=(len(labels), 5))
    ours = representations.silhouette_score(points, labels)
    assert ours == pytest.approx(sklearn_metrics.silhouette_score(points, labels), abs=1e-12)
    assert 0.1 < ours < 0.7
    shuffled = rng.permutation(labels)  # labels that ignore the clusters
    assert representations.silhouette_score(points, shuffled) == pytest.approx(
        sklearn_metrics.silhouette_score(points, shuffled), abs=1e-12)
    assert representations.silhouette_score(points, shuffled) < 0.05
    points_2d = representations.pca_2d(rng.normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1])
    assert points_2d.shape == (50, 2)


def test_qa_loaders_parse_the_real_formats():
    csqa = qa.read_commonsenseqa(FIXTURES / "commonsenseqa_sample.jsonl")
    assert len(csqa) == 10
    real = csqa[-1]
    assert real.id == "075e483d21c29a511267ef62bedc0461" and real.answer == 0
    assert real.choices == ("ignore", "enforce", "authoritarian", "yell at", "avoid")
    copa = qa.read_copa(FIXTURES / "copa_sample.xml")
    assert [(q.id, q.connective, q.answer) for q in copa] == [("1", "because", 0),
                                                              ("2", "so", 1)]
    assert copa[0].context == "My body cast a shadow over the grass"
    assert copa[0].choices == ("the sun was rising", "the grass was cut")


def test_qa_scoring_picks_answers_the_model_knows(run):
    """In a knowledge phrasing the model answers 99% of facts: the rule must pick those."""
    from lamp_jax import world

    facts = [f for f in world.make_facts(0) if f.relation == "AtLocation"][:12]
    questions = []
    for f in facts:
        wrong = next(o for o in world.RELATIONS["AtLocation"].objects if o != f.obj)
        questions.append(qa.Question(f.subject, f"the {f.subject} is kept in the",
                                     (wrong, f.obj), 1, suffix=" ."))
    assert qa.accuracy(run.mlm.params, run.mlm, questions) >= 11 / 12
    scores = qa.score_choices(run.mlm.params, run.mlm, questions)
    assert scores.shape == (12, 2) and np.all(scores <= 0)


def _qa_scores_by_hand(params, mlm, question) -> list[float]:
    forward = by_hand.forward_fn(mlm.config)
    before = f"{question.context} {question.connective}".strip()
    return [by_hand.pseudo_log_likelihood(forward, params, mlm.tokenizer, before, choice,
                                          question.suffix) for choice in question.choices]


def _qa_accuracy_by_hand(params, mlm, questions) -> float:
    return float(np.mean([int(np.argmax(_qa_scores_by_hand(params, mlm, q))) == q.answer
                          for q in questions]))


def test_qa_scores_of_multi_token_choices_equal_a_hand_computation():
    """Each choice's score: the mean over its tokens of log P(token | that token masked), one
    unpadded forward per token here, against the batched, padded scorer (in batches of 4, so
    that the last batch is padded with repeated rows)."""
    mlm = load_mlm(ensure_embedded_model())
    questions = [
        # Choices of 1, 2 and 3 tokens: a sum instead of a mean would reorder them.
        qa.Question("a", "the cup is kept in the", ("kitchen", "warm garage", "very cheap office"),
                    0, suffix=" ."),
        qa.Question("b", "the fork", ("will break easily", "can spin"), 1, "so", " ."),
        qa.Question("c", "people store the bag in the", ("attic", "closet"), 1),
    ]
    got = qa.score_choices(mlm.params, mlm, questions, batch_size=4)
    want = np.full((3, 3), np.nan)
    for q, question in enumerate(questions):
        scores = _qa_scores_by_hand(mlm.params, mlm, question)
        want[q, :len(scores)] = scores
    np.testing.assert_allclose(got, want, rtol=1e-5)  # NaN where a question has no 3rd choice
    assert np.isnan(got[1:, 2]).all() and np.all(want[0] < -0.01)
    predicted = np.nanargmax(want, axis=1)
    assert qa.accuracy(mlm.params, mlm, questions, batch_size=4) == pytest.approx(
        np.mean(predicted == [q.answer for q in questions]))


@pytest.mark.slow  # about 20 s: the report itself takes 12
def test_report_sections_agree_with_independent_computations(run_dir, run, world_kbc):
    sklearn_metrics = require("sklearn.metrics")
    qa_relations = ("AtLocation", "MadeOf", "IsA")
    out = write_report(run_dir, max_size=1, log=lambda *_: None,
                       qa_file=str(FIXTURES / "commonsenseqa_sample.jsonl"), qa_format="csqa",
                       qa_relations=qa_relations, qa_method="soft")
    index = (out / "index.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["attention.png", "combination.png", "overlap.png", "representations.png",
                       "sparsity_curve.png", "specialization.png"]
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", index)) == figures
    assert "Zero-shot multiple-choice QA" in index
    section = {name: json.loads((out / f"{name}.json").read_text())
               for name in ("specialization", "combination", "representations", "kbc", "qa")}
    relations, paths = list(run.relations), run.spec.paths()
    trained = run.metrics  # metrics.json: the trainer's own evaluation at the end of training

    # Specialization: the report's matrix against the one train.py computed, and its
    # diagonal against each relation's own test P@1.
    spec = section["specialization"]
    assert spec["relations"] == relations
    np.testing.assert_allclose(spec["matrix"], trained["specialization"], atol=1e-12)
    np.testing.assert_allclose(np.diag(spec["matrix"]), [
        trained["test"]["pruned"]["per_relation"][r]["P@1"] for r in relations], atol=1e-12)
    assert spec["full_model_macro_P@1"] == pytest.approx(trained["test"]["full"]["macro_P@1"])

    # Combination (max_size=1): relation a's binary mask used for every relation scores the
    # mean of row a of the dev specialization matrix; its soft mask, the same with
    # expectation inference.
    dev = run.eval_batches("dev")
    expected = {}
    for method, mode in (("or", run.mode), ("soft", run.mode.for_inference("expectation"))):
        rank_fn = make_rank_fn(run.mlm.config, mode)
        matrix = specialization_matrix(
            lambda g, b, rank_fn=rank_fn: evaluate(rank_fn, g, run.mlm.params, b, run.relations),
            run.mask_logits, dev, run.relations)
        expected.update({(r, method): float(np.nanmean(matrix[a]))
                         for a, r in enumerate(relations)})
    search = section["combination"]["search"]
    assert len(search) == len(expected) == 2 * len(relations)
    for row in search:
        assert row["score"] == pytest.approx(expected[row["relations"][0], row["method"]],
                                             rel=1e-6), row
    assert section["combination"]["best"] == search[0]
    assert [row["score"] for row in search] == sorted(row["score"] for row in search)[::-1]

    # KBC of the embedded world: what knowledge_base_completion gives (tested against the
    # run's splits above), through the report's json.
    assert section["kbc"] == {"embedded world facts": json.loads(json.dumps(world_kbc[0]))}

    # Representations: silhouettes of [MASK] states computed here, one relation at a time, with
    # the masks multiplied in by hand, scored by scikit-learn.
    batch = run.eval_batches("test")[0]
    real = batch["weight"] > 0
    labels = np.repeat(np.arange(len(relations)), batch["weight"].shape[1]).reshape(real.shape)
    forward = jax.jit(lambda p, ids, mask: mlm_forward(p, ids, mask, config=run.mlm.config,
                                                       output_hidden_states=True))
    silhouettes = {}
    for name in ("full model", "own subnetwork"):
        states = []
        for r in range(len(relations)):
            params = run.mlm.params if name == "full model" else by_hand.with_multipliers(
                run.mlm.params, by_hand.relation_multipliers(run.mask_logits, paths, r,
                                                             "threshold"))
            last = np.asarray(forward(params, batch["input_ids"][r],
                                      batch["attention_mask"][r])["hidden_states"][-1])
            states.append(last[np.arange(len(last)), batch["mask_pos"][r]][real[r]])
        silhouettes[name] = sklearn_metrics.silhouette_score(np.concatenate(states),
                                                             labels[real])
        assert section["representations"][name]["silhouette"] == pytest.approx(
            silhouettes[name], abs=1e-5), name
    # Not a comparison of equal values: the subnetworks move the [MASK] states (the embedded
    # default over seeds 0-2: 0.335 full, 0.331 +- 0.011 own subnetworks; see the README).
    assert abs(silhouettes["own subnetwork"] - silhouettes["full model"]) > 1e-3

    # QA: accuracies of the full model and of kernel * mean(sigmoid(G)) over the three
    # relations, each choice scored by hand.
    result = section["qa"]
    questions = qa.read_commonsenseqa(FIXTURES / "commonsenseqa_sample.jsonl")
    assert result["questions"] == 10 and result["relations"] == list(qa_relations)
    chosen = [relations.index(r) for r in qa_relations]
    soft = {p: by_hand.sigmoid(np.asarray(by_hand.get_path(run.mask_logits, p))[chosen]).mean(0)
            for p in paths}
    full = _qa_accuracy_by_hand(run.mlm.params, run.mlm, questions)
    combined = _qa_accuracy_by_hand(by_hand.with_multipliers(run.mlm.params, soft), run.mlm,
                                    questions)
    assert (result["full_accuracy"], result["combined_accuracy"]) == pytest.approx(
        (full, combined))
    # Measured 0.8 and 0.6: a report that scored the full model twice would not pass.
    assert full != combined
