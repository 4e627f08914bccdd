"""Tests of the held-out protocols of lamp_jax.data.splits: subject-, object- and
template-disjoint splits, their reports, their wiring through prepare_data, and that the default
by-fact split is unchanged."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from lamp_jax.config_checks import validate_config
from lamp_jax.configs.default import get_config
from lamp_jax.data.encode import encode_facts
from lamp_jax.data.lama import Fact
from lamp_jax.data.prepare import prepare_data, resolve_sources
from lamp_jax.data.splits import (
    HELD_OUT_PROTOCOLS,
    SPLITS,
    held_out_split,
    normalised_subject,
    sentence_template,
    split_by_fact,
    split_fact_ids,
    split_groups,
)
from lamp_jax.errors import UsageError
from tests.tokenizer_fixtures import make_bert_tokenizer, words_of

FRACTIONS = (0.5, 0.2, 0.3)
# relation -> its templates ({s}: the subject); "Fears" has one template only.
TEMPLATES = {
    "LivesIn": ("the {s} lives in the [MASK] .", "a {s} is found in a [MASK] .",
                "you see the {s} near the [MASK] ."),
    "Eats": ("the {s} eats [MASK] .", "{s} likes to eat [MASK] ."),
    "Fears": ("the {s} is afraid of the [MASK] .",),
    "Likes": ("the {s} likes the [MASK] .", "every {s} loves a [MASK] .",
              "a {s} enjoys the [MASK] .", "the [MASK] pleases the {s} ."),
}
SUBJECTS = ("dog", "cat", "cow", "fox", "owl", "bee", "ant", "elk", "pig", "hen", "yak", "emu")
OBJECTS = ("barn", "field", "house", "river", "tree", "cave", "nest", "hive", "grass", "seeds")


def _world(seed: int = 0, facts_per_relation: int = 24) -> tuple[list[Fact], dict[str, str]]:
    """Facts of TEMPLATES' relations, subjects and objects repeated across facts (with case
    variants: "Dog", "Cave"), 1-3 sentences per fact in distinct templates, two facts without a
    subject; and every sentence -> the template index it was built from ("relation/i")."""
    rng = np.random.default_rng(seed)
    facts, built_from, seen = [], {}, set()
    for relation, templates in TEMPLATES.items():
        made = 0
        while made < facts_per_relation:
            subject = SUBJECTS[rng.integers(len(SUBJECTS))]
            obj = OBJECTS[rng.integers(len(OBJECTS))]
            if (subject, relation, obj) in seen:
                continue
            seen.add((subject, relation, obj))
            shown_subject = subject.capitalize() if rng.random() < 0.3 else subject
            shown_obj = obj.capitalize() if rng.random() < 0.2 else obj
            if relation == "LivesIn" and made < 2:
                shown_subject = ""  # no subject: subject_disjoint cannot place these
            k = int(rng.integers(1, min(3, len(templates)) + 1))
            chosen = rng.choice(len(templates), size=k, replace=False)
            sentences = []
            for t in chosen.tolist():
                text = templates[t].format(s=shown_subject or f"thing{made}")
                sentences.append(text)
                # A sentence without its subject is its own template (sentence_template).
                built_from[text] = f"{relation}/{t}" if shown_subject else text
            facts.append(Fact(relation, shown_subject, shown_obj, tuple(sentences),
                              f"{relation}-{made}"))
            made += 1
    return facts, built_from


@pytest.fixture(scope="module")
def world():
    return _world()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, world):
    facts, _ = world
    words = words_of([s for f in facts for s in f.sentences] + [f.obj for f in facts])
    return make_bert_tokenizer(tmp_path_factory.mktemp("bert"), words)


def _split(protocol, facts, tokenizer, seed=0, relations=tuple(TEMPLATES)):
    def encode(fs, rels):
        return encode_facts(fs, tokenizer, rels)[0]

    return held_out_split(protocol, facts, encode(facts, relations), encode, FRACTIONS, seed)


def _per_relation(held, split, key):
    """relation -> set of key(prompt row) over the split's prompts."""
    enc = held.encoded
    out: dict[str, set] = {r: set() for r in held.relations}
    for row in held.indices[split].tolist():
        out[enc.relations[enc.relation[row]]].add(key(row))
    return out


def _check_counts_add_up(held, facts, tokenizer):
    """Splits are disjoint rows of the encoding; per relation the report's prompts equal an
    independent count, and prompts per split + dropped prompts = the relation's prompts before
    the protocol."""
    rows = np.concatenate([held.indices[s] for s in SPLITS])
    assert len(np.unique(rows)) == len(rows) and rows.max() < len(held.encoded)
    before = encode_facts(facts, tokenizer, tuple(TEMPLATES))[0]
    report = held.report
    for r in TEMPLATES:
        total_before = int(np.sum(before.relation == TEMPLATES_INDEX[r]))
        dropped = sum(table.get(r, 0) for table in report.dropped_prompts.values())
        if r in held.relations:
            i = held.relations.index(r)
            counted = {s: int(np.sum(held.encoded.relation[held.indices[s]] == i)) for s in SPLITS}
            assert report.prompts[r] == counted
            assert sum(counted.values()) + dropped == total_before, r
            assert min(counted.values()) >= 1  # kept relations have train, dev and test prompts
        else:
            assert r in report.dropped_relations and dropped == total_before


TEMPLATES_INDEX = {r: i for i, r in enumerate(TEMPLATES)}


def test_object_disjoint_holds_every_training_object_out(world, tokenizer):
    facts, _ = world
    held = _split("object_disjoint", facts, tokenizer)
    enc = held.encoded
    objects = {s: _per_relation(held, s, lambda row: int(enc.obj_id[row])) for s in SPLITS}
    for r in held.relations:
        assert not objects["train"][r] & (objects["dev"][r] | objects["test"][r]), r
        assert not objects["dev"][r] & objects["test"][r], r
        assert held.report.units[r] == {s: len(objects[s][r]) for s in SPLITS}
    # "Cave" and "cave" are one token, hence one object: they never straddle a split.
    split_of_spelling = {(facts[f].relation, facts[f].obj): s for s in SPLITS
                         for f in enc.fact_index[held.indices[s]].tolist()}
    variants = [(r, o) for r, o in split_of_spelling if o != o.lower()
                and (r, o.lower()) in split_of_spelling]
    assert len(variants) >= 3
    assert all(split_of_spelling[(r, o)] == split_of_spelling[(r, o.lower())] for r, o in variants)
    _check_counts_add_up(held, facts, tokenizer)
    assert held.relations == tuple(TEMPLATES)
    assert "split object_disjoint" in held.report.summary()


def test_subject_disjoint_holds_every_training_subject_out(world, tokenizer):
    facts, _ = world
    held = _split("subject_disjoint", facts, tokenizer)
    enc = held.encoded
    subjects = {s: _per_relation(
        held, s, lambda row: " ".join(facts[enc.fact_index[row]].subject.lower().split()))
        for s in SPLITS}
    for r in held.relations:
        assert not subjects["train"][r] & (subjects["dev"][r] | subjects["test"][r]), r
        assert not subjects["dev"][r] & subjects["test"][r], r
        assert "" not in subjects["train"][r] | subjects["dev"][r] | subjects["test"][r]
    assert any(f.subject[:1].isupper() for f in facts)  # case variants were compared as one
    no_subject = [f for f in facts if not f.subject]
    assert held.report.dropped_facts["no subject to compare"] == {"LivesIn": len(no_subject)}
    assert held.report.dropped_prompts["fact without a subject"] == {
        "LivesIn": sum(len(f.sentences) for f in no_subject)}
    _check_counts_add_up(held, facts, tokenizer)


def test_a_group_of_one_fact_is_the_by_fact_split(world, tokenizer):
    rels = [f"R{i % 5}" for i in range(137)]
    for seed in (0, 3, 11):
        by_group = split_groups(rels, list(range(len(rels))), FRACTIONS, seed)
        by_fact = split_fact_ids(rels, FRACTIONS, seed)
        assert all(np.array_equal(by_group[s], by_fact[s]) for s in SPLITS)
    facts, _ = world
    unique = [f for f in facts if f.subject]  # give every fact its own subject
    unique = [Fact(f.relation, f"{f.subject}{i}", f.obj, f.sentences, f.uuid)
              for i, f in enumerate(unique)]
    held = _split("subject_disjoint", unique, tokenizer)
    expected = split_by_fact(encode_facts(unique, tokenizer, tuple(TEMPLATES))[0], FRACTIONS, 0)
    assert all(np.array_equal(held.indices[s], expected[s]) for s in SPLITS)
    by_fact = _split("by_fact", facts, tokenizer)
    expected = split_by_fact(encode_facts(facts, tokenizer, tuple(TEMPLATES))[0], FRACTIONS, 0)
    assert all(np.array_equal(by_fact.indices[s], expected[s]) for s in SPLITS)


@pytest.mark.parametrize("protocol", ["subject_disjoint", "object_disjoint"])
def test_protocols_are_deterministic_by_seed_and_per_relation(world, tokenizer, protocol):
    facts, _ = world
    a, b = (_split(protocol, facts, tokenizer, seed=5) for _ in range(2))
    assert all(np.array_equal(a.indices[s], b.indices[s]) for s in SPLITS)
    other = _split(protocol, facts, tokenizer, seed=6)
    assert not np.array_equal(a.indices["train"], other.indices["train"])
    # Removing a relation leaves the others' facts where they were.
    fewer = [f for f in facts if f.relation != "Eats"]
    c = _split(protocol, fewer, tokenizer, seed=5, relations=("LivesIn", "Fears", "Likes"))

    def fact_uuids(held, split):
        return {held.facts[i].uuid for i in held.encoded.fact_index[held.indices[split]]}

    for s in SPLITS:
        assert fact_uuids(c, s) == {u for u in fact_uuids(a, s) if not u.startswith("Eats")}


def test_sentence_template():
    assert sentence_template("You are likely to find a  Fork in a [MASK].", "fork") == (
        "you are likely to find a [X] in a [MASK].")
    assert sentence_template("the mask is [MASK] .", "mask") == "the [X] is [MASK] ."
    assert sentence_template("the catalog lists a cat [MASK] .", "cat") == (
        "the catalog lists a [X] [MASK] .")
    assert sentence_template("it is [MASK] .", "") == "it is [MASK] ."
    assert normalised_subject("  New   York ") == normalised_subject("new york")


def test_template_disjoint_holds_every_training_template_out(world, tokenizer):
    facts, built_from = world
    held = _split("template_disjoint", facts, tokenizer)
    templates = {s: {r: set() for r in held.relations} for s in SPLITS}
    for s in SPLITS:
        for f in set(held.encoded.fact_index[held.indices[s]].tolist()):
            fact = held.facts[f]
            templates[s][fact.relation] |= {built_from[t] for t in fact.sentences}
    for r in held.relations:
        assert not templates["train"][r] & (templates["dev"][r] | templates["test"][r]), r
    # "Fears" has one template: not run, with that reason.
    assert "Fears" not in held.relations
    assert "one template" in held.report.dropped_relations["Fears"]
    # The held-out facts are by_fact's held-out facts (fewer: some lost every sentence).
    by_fact = _split("by_fact", facts, tokenizer)
    for s in SPLITS:
        uuids = {held.facts[f].uuid for f in held.encoded.fact_index[held.indices[s]]}
        assert uuids <= {facts[f].uuid for f in by_fact.encoded.fact_index[by_fact.indices[s]]}
    assert {f.uuid for f in held.facts} == {f.uuid for f in facts}  # same facts, same order
    _check_counts_add_up(held, facts, tokenizer)


def test_a_relation_a_protocol_cannot_hold_out_is_not_run(world, tokenizer):
    facts, _ = world
    # Eats keeps two objects: one for train, one for test, none for dev (fractions 0.5/0.2/0.3).
    two = sorted({f.obj.lower() for f in facts if f.relation == "Eats"})[:2]
    kept = [f for f in facts if f.relation != "Eats" or f.obj.lower() in two]
    held = _split("object_disjoint", kept, tokenizer)
    assert held.relations == ("LivesIn", "Fears", "Likes")
    assert held.report.dropped_relations == {"Eats": "no dev prompts under object_disjoint"}
    eats = sum(len(f.sentences) for f in kept if f.relation == "Eats")
    assert held.report.dropped_prompts["relation not run"] == {"Eats": eats}
    assert "Eats (no dev prompts under object_disjoint)" in held.report.summary()
    assert held.encoded.relations == held.relations  # re-encoded without it


def test_a_protocol_that_holds_nothing_out_says_why(world, tokenizer):
    facts, _ = world
    with pytest.raises(UsageError, match="Fears: one template"):
        _split("template_disjoint", [f for f in facts if f.relation == "Fears"], tokenizer,
               relations=("Fears",))


def _embedded_config(**data):
    config = get_config()
    config.data.update(data)
    return config


@pytest.fixture(scope="module")
def embedded_tokenizer():
    from transformers import BertTokenizerFast

    model, _ = resolve_sources(get_config())
    return BertTokenizerFast.from_pretrained(model)


# sha256 of the split.json that `python train.py` wrote on the embedded default before the
# held-out protocols existed.
DEFAULT_SPLIT_SHA256 = "fdd393422a44005e40eba6017aad29c9fdef35b21032ad517e3e3d23022ed8c6"


def test_default_split_is_unchanged(embedded_tokenizer):
    config = _embedded_config()
    _, path = resolve_sources(config)
    data = prepare_data(config, embedded_tokenizer, path, log=lambda *_: None)
    text = json.dumps(data.facts_by_split, indent=1)  # as RunDirectory.write_record writes it
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == DEFAULT_SPLIT_SHA256


def test_prepare_data_runs_each_protocol_or_says_why(embedded_tokenizer):
    config = _embedded_config(split="object_disjoint")
    _, path = resolve_sources(config)
    lines = []
    data = prepare_data(config, embedded_tokenizer, path, log=lines.append)
    assert any(line.startswith("split object_disjoint") for line in lines)
    for r in range(len(data.relations)):
        train = set(data.splits["train"].obj_id[data.splits["train"].relation == r].tolist())
        for name in ("dev", "test"):
            split = data.splits[name]
            assert not train & set(split.obj_id[split.relation == r].tolist())
    # split.json's facts say the same: no relation's held-out object is one of its training ones.
    objects = {name: {(f["relation"], f["object"]) for f in facts}
               for name, facts in data.facts_by_split.items()}
    assert objects["test"] and not objects["train"] & (objects["dev"] | objects["test"])
    # The embedded world phrases each relation one way: nothing to hold out by template.
    with pytest.raises(UsageError, match="template_disjoint.*one template"):
        prepare_data(_embedded_config(split="template_disjoint"), embedded_tokenizer, path,
                     log=lambda *_: None)


def test_config_accepts_the_protocols_and_nothing_else():
    for protocol in (*HELD_OUT_PROTOCOLS, "reference"):
        validate_config(_embedded_config(split=protocol))
    with pytest.raises(ValueError, match="config.data.split = 'by_subject'"):
        validate_config(_embedded_config(split="by_subject"))
