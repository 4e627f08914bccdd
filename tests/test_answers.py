"""Answers of any length (config.data.answers="any_length"): prompts with as many masks as the
object has tokens, the loss summed over them, and the ranking among a relation's candidates,
each against an independent computation with plain forward passes."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lamp_jax.answer_ranking import evaluate_candidates, make_candidate_fn, scoring_batches
from lamp_jax.configs import default
from lamp_jax.data.answers import candidates_of, encode_answers, gold_candidates, scoring_rows
from lamp_jax.data.encode import encode_facts
from lamp_jax.data.lama_sets import read_lama_set
from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits
from lamp_jax.models import ModelConfig, init_params, mlm_forward, save_mlm
from lamp_jax.step import LossConfig, relation_loss
from lamp_jax.sweep import with_overrides
from tests import by_hand
from tests.tokenizer_fixtures import make_bert_tokenizer, words_of

PLACES = ["post office", "living room", "kitchen", "garage", "bus stop", "fire station",
          "garden", "train station shop"]
THINGS = ["stamp", "sofa", "knife", "car", "ticket", "hose", "rose", "magazine", "letter",
          "lamp", "spoon", "bike"]
MATERIALS = ["stainless steel", "wood", "glass", "solid gold", "paper", "wool"]


def _facts_file(path: Path) -> Path:
    """A LAMA ConceptNet-format file whose objects have one to three words."""
    rows, n = [], 0
    for i, thing in enumerate(THINGS):
        place = PLACES[i % len(PLACES)]
        for template in ("You are likely to find a {} in the [MASK] .",
                         "A {} is often in the [MASK] ."):
            rows.append({"sub": thing, "obj": place, "pred": "AtLocation", "uuid": f"a{n}",
                         "masked_sentences": [template.format(thing)]})
            n += 1
    for i, thing in enumerate(THINGS):
        rows.append({"sub": thing, "obj": MATERIALS[i % len(MATERIALS)], "pred": "MadeOf",
                     "uuid": f"m{i}", "masked_sentences": [f"The {thing} is made of [MASK] ."]})
    rows.append({"sub": "cake", "obj": "flour", "pred": "MadeOf", "uuid": "unknown",
                 "masked_sentences": ["The cake is made of [MASK] ."]})  # "flour": not in vocab
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    directory = tmp_path_factory.mktemp("answers")
    data = _facts_file(directory / "facts.jsonl")
    facts = read_lama_set(data).facts
    words = [w for w in words_of([s for f in facts for s in f.sentences]
                                 + [f.obj for f in facts]) if w != "flour"]
    tokenizer = make_bert_tokenizer(directory / "model", words)
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    params = init_params(config, jax.random.key(1))
    save_mlm(directory / "model", params, config, tokenizer)
    return data, facts, tokenizer, config, params, directory


def test_an_object_of_n_tokens_becomes_n_masks_and_what_cannot_be_read_is_counted(world):
    _, facts, tokenizer, *_ = world
    relations = ("AtLocation", "MadeOf")
    encoded, report = encode_answers(facts, tokenizer, relations, causal=False,
                                     max_answer_tokens=2)
    # "train station shop" (3 tokens) is too long at 2; "flour" is not in the vocabulary.
    assert report.skipped["object_too_long"] == 2 and report.skipped["object_unknown_tokens"] == 1
    # 12 AtLocation facts of 2 sentences (one fact's object too long), 12 MadeOf facts.
    assert report.kept == len(encoded) == 24 - 2 + 12
    single, _ = encode_facts(facts, tokenizer, relations)
    assert len(encoded) > len(single)  # the prompts answers of any length gain
    mask = tokenizer.mask_token_id
    for row in range(len(encoded)):
        n = int(encoded.obj_mask[row].sum())
        ids = encoded.input_ids[row][encoded.attention_mask[row] > 0].tolist()
        assert ids.count(mask) == n
        positions = [i for i, t in enumerate(ids) if t == mask]
        assert encoded.mask_pos[row, :n].tolist() == positions
        fact = facts[encoded.fact_index[row]]
        want = tokenizer(fact.obj, add_special_tokens=False)["input_ids"]
        assert encoded.obj_id[row, :n].tolist() == want
    assert sorted({int(m.sum()) for m in encoded.obj_mask}) == [1, 2]


def _by_hand_ranks(facts, tokenizer, config, params_of, encoded, candidates) -> np.ndarray:
    """Every prompt's rank among its relation's candidates: for each candidate of m tokens, the
    prompt with m masks through a plain forward pass, its tokens' log-probabilities summed."""
    forward = by_hand.forward_fn(config)
    ranks = []
    for row in range(len(encoded)):
        r = int(encoded.relation[row])
        sentence = encoded.texts[row]
        scores = {}
        for c, m in enumerate(candidates.length[r]):
            if not m:
                continue
            text = sentence.replace("[MASK]", tokenizer.mask_token * int(m))
            ids = np.asarray([tokenizer(text)["input_ids"]], np.int32)
            logits = np.asarray(forward(params_of(r), ids, np.ones_like(ids))["logits"])[0]
            positions = np.flatnonzero(ids[0] == tokenizer.mask_token_id)
            scores[c] = sum(by_hand.log_softmax(logits[p])[candidates.ids[r, c, j]]
                            for j, p in enumerate(positions))
        gold = scores[int(gold_candidates(encoded.subset([row]), candidates)[0])]
        ranks.append(1 + sum(s > gold for s in scores.values()))
    return np.asarray(ranks)


def test_candidate_ranking_equals_plain_forwards_for_the_full_model_and_subnetworks(world):
    _, facts, tokenizer, config, params, _ = world
    relations = ("AtLocation", "MadeOf")
    encoded, _ = encode_answers(facts, tokenizer, relations, causal=False, max_answer_tokens=3)
    candidates = candidates_of({"all": encoded}, facts)
    assert sorted(set(candidates.length[0][candidates.length[0] > 0].tolist())) == [1, 2, 3]
    rows = scoring_rows(encoded, tokenizer, candidates, causal=False)
    batches = scoring_batches(rows, candidates, gold_candidates(encoded, candidates), 2, 4)
    spec = MaskSpec.create(config, first_layer=0)
    logits = init_mask_logits(spec, params, 2, MaskInit("normal", 0.5, 1.0), MaskMode(),
                              jax.random.key(3))
    for mask_logits in (None, logits):
        mode = MaskMode("threshold")
        got = evaluate_candidates(make_candidate_fn(config, mode), mask_logits, params, batches,
                                  relations)
        params_of = (lambda r: params) if mask_logits is None else (
            lambda r, g=mask_logits: by_hand.with_multipliers(params, by_hand.relation_multipliers(
                g, spec.paths(), r, "threshold")))
        want = _by_hand_ranks(facts, tokenizer, config, params_of, encoded, candidates)
        np.testing.assert_array_equal(got.prompt_ranks["rank"], want)
        assert len(set(want.tolist())) > 2  # not all the same rank


def test_the_loss_of_an_answer_is_the_sum_of_its_tokens_cross_entropies(world):
    _, facts, tokenizer, config, params, _ = world
    encoded, _ = encode_answers(facts, tokenizer, ("AtLocation",), causal=False,
                                max_answer_tokens=3)
    batch = {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask,
             "mask_pos": encoded.mask_pos, "obj_id": encoded.obj_id,
             "obj_mask": encoded.obj_mask, "weight": np.ones(len(encoded), np.float32)}
    spec = MaskSpec.create(config, first_layer=0)
    logits = jax.tree.map(lambda g: g[0], init_mask_logits(
        spec, params, 1, MaskInit("normal", 0.5, 1.0), MaskMode(), jax.random.key(4)))
    loss, metrics = relation_loss(logits, params, batch, None, model_config=config,
                                  loss_config=LossConfig(MaskMode("threshold")))
    masked = by_hand.with_multipliers(params, by_hand.relation_multipliers(
        jax.tree.map(lambda g: g[None], logits), spec.paths(), 0, "threshold"))
    total = 0.0
    for row in range(len(encoded)):
        ids = encoded.input_ids[row:row + 1]
        out = np.asarray(mlm_forward(masked, ids, encoded.attention_mask[row:row + 1],
                                     config=config)["logits"])[0]
        n = int(encoded.obj_mask[row].sum())
        total += sum(-by_hand.log_softmax(out[encoded.mask_pos[row, j]])[encoded.obj_id[row, j]]
                     for j in range(n))
    assert float(loss) == pytest.approx(total / len(encoded), rel=1e-5)
    assert float(metrics["count"]) == len(encoded)
    ce = optax.softmax_cross_entropy_with_integer_labels(jnp.zeros((1, 5)), jnp.zeros(1, int))
    assert float(ce[0]) == pytest.approx(np.log(5))  # optax's CE: the reference's formula


def test_a_run_with_answers_of_any_length_trains_and_its_metrics_recompute(world, tmp_path):
    """train_and_evaluate with data.answers="any_length": the prompts it gains over single
    tokens are trained and evaluated, and its test P@1 of the subnetworks equals the by-hand
    ranking of the held-out prompts with the masks of masks.npz."""
    from lamp_jax.api import load_run
    from lamp_jax.loop import train_and_evaluate

    data, facts, tokenizer, config, params, directory = world
    c = default.get_config()
    c.model, c.data.source = str(directory / "model"), str(data)
    c.data.answers, c.data.max_answer_tokens = "any_length", 3
    c.batch_size, c.epochs, c.optim.learning_rate, c.mask.init_value = 4, 4, 0.5, 0.3
    c = with_overrides(c, {"plots": False})
    said: list[str] = []
    summary = train_and_evaluate(c, tmp_path / "run", log=said.append)
    assert any("object_unknown_tokens=1" in line for line in said), said
    run = load_run(tmp_path / "run")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    test_facts = [f for f in facts if any(f.uuid == row["uuid"] for row in split["test"])]
    encoded, _ = encode_answers(test_facts, tokenizer, run.relations, causal=False,
                                max_answer_tokens=3)
    all_encoded, _ = encode_answers(facts, tokenizer, run.relations, causal=False,
                                    max_answer_tokens=3)
    candidates = candidates_of({"all": all_encoded}, facts)
    for r, relation in enumerate(run.relations):
        rows = np.flatnonzero(encoded.relation == r)
        ranks = _by_hand_ranks(test_facts, tokenizer, run.mlm.config, lambda _, r=r: by_hand
                               .with_multipliers(run.mlm.params, by_hand.relation_multipliers(
                                   run.mask_logits, run.spec.paths(), r, "threshold")),
                               encoded.subset(rows), candidates)
        got = summary["test"]["pruned"]["per_relation"][relation]
        assert got["P@1"] == pytest.approx(float(np.mean(ranks == 1)))
        assert got["MRR"] == pytest.approx(float(np.mean(1 / ranks)))
    assert any(int(m.sum()) > 1 for m in encoded.obj_mask)  # multi-token answers were held out
