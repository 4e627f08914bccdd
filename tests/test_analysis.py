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
from lamp_jax.evaluation import make_rank_fn, specialization_matrix
from lamp_jax.report import world_triples, write_report

CKBC = Path(__file__).parents[2] / "shared" / "data" / "conceptnet_ckbc" / "train.txt"
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
    from lamp_jax.data import encode_facts, read_lama_jsonl, split_by_fact

    info = json.loads((run_dir / "run.json").read_text())
    facts, _ = read_lama_jsonl(info["data"])
    encoded, _ = encode_facts(facts, run.mlm.tokenizer, run.relations)
    fractions = tuple(info["config"]["data"]["fractions"])
    test = encoded.subset(split_by_fact(encoded, fractions, 0)["test"])
    return list(RelationBatcher(test, 16).eval_batches())


def test_batched_specialization_equals_the_per_mask_loop(run, run_dir):
    batches = _test_batches(run, run_dir)
    batched = specialization.specialization_matrix_batched(
        run.mask_logits, run.mlm.params, batches, run.mlm.config, run.mode)
    rank_fn = make_rank_fn(run.mlm.config, run.mode)
    looped = specialization_matrix(rank_fn, run.mask_logits, run.mlm.params, batches,
                                   run.relations)
    np.testing.assert_allclose(batched, looped)
    chunked = specialization.specialization_matrix_batched(
        run.mask_logits, run.mlm.params, batches, run.mlm.config, run.mode, mask_chunk=3)
    np.testing.assert_allclose(chunked, looped)
    summary = specialization.summarize(batched, np.zeros(len(batched)))
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


def test_knowledge_base_completion_on_the_world_and_on_ckbc(run):
    triples, templates = world_triples()
    result = kbc.knowledge_base_completion(triples, run.mlm, run.mask_logits, run.relations,
                                           run.mode, templates)
    assert result["ranked"] == len(triples)
    _check_hits(result)
    # Measured: Hits@1 0.14 (full) -> 0.69 (subnetwork) with the 40-epoch default.
    assert result["subnetwork"]["Hits@1"] > result["full"]["Hits@1"] + 0.2
    if not CKBC.exists():
        pytest.skip("CKBC data not present")
    lines = read_ckbc(CKBC)[:400]
    result = kbc.knowledge_base_completion(lines, run.mlm, run.mask_logits, run.relations,
                                           run.mode)
    skipped = result["negative_label_skipped"] + sum(result["other_relation_skipped"].values())
    assert result["ranked"] + sum(result["skipped_at_encoding"].values()) + skipped == 400
    if result["ranked"]:
        _check_hits(result)


def test_silhouette_score_on_known_clusters():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 30)
    centers = np.array([[0, 0], [50, 0], [0, 50]])
    clustered = centers[labels] + rng.normal(size=(90, 2))
    assert representations.silhouette_score(clustered, labels) > 0.9
    assert abs(representations.silhouette_score(rng.normal(size=(90, 2)), labels)) < 0.1
    points = representations.pca_2d(rng.normal(size=(50, 6)) * [5, 3, 1, 1, 1, 1])
    assert points.shape == (50, 2)


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


def test_report_writes_every_section_and_links_every_figure(run_dir):
    out = write_report(run_dir, max_size=1, log=lambda *_: None,
                       qa_file=str(FIXTURES / "copa_sample.xml"), qa_format="copa",
                       qa_relations=("CapableOf", "Desires"), qa_method="soft")
    index = (out / "index.md").read_text()
    figures = sorted(p.name for p in out.glob("*.png"))
    assert figures == ["attention.png", "combination.png", "representations.png",
                       "specialization.png"]
    assert sorted(re.findall(r"\]\(([^)]+\.png)\)", index)) == figures
    for name in ("specialization", "combination", "representations", "kbc", "qa"):
        assert json.loads((out / f"{name}.json").read_text())
    rep = json.loads((out / "representations.json").read_text())
    # Measured on the default run: silhouette 0.33 (full) -> 0.45 (own subnetworks).
    assert -1 <= rep["full model"]["silhouette"] <= 1
    result = json.loads((out / "qa.json").read_text())
    assert result["questions"] == 2 and result["relations"] == ["CapableOf", "Desires"]
    assert result["full_accuracy"] in (0.0, 0.5, 1.0)
    assert result["combined_accuracy"] in (0.0, 0.5, 1.0)
    assert "Zero-shot multiple-choice QA" in (out / "index.md").read_text()
