"""Tests of lamp_jax.data: reading, encoding, splitting, batching, CKBC triples, TFDS builder."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lamp_jax.data.batching import RelationBatcher
from lamp_jax.data.encode import EncodedPrompts, encode_facts, is_space_prefixed
from lamp_jax.data.lama import LAMA_CONCEPTNET_RELATIONS, Fact, ReadReport
from lamp_jax.data.lama_archive import CACHED_DATA_DIR, CONCEPTNET_FILE, LAMA_DATA_URL, fetch_lama
from lamp_jax.data.lama_sets import read_lama_set
from lamp_jax.data.splits import (
    reference_protocol_split,
    split_by_fact,
    split_fact_ids,
    split_facts,
)
from lamp_jax.data.triples import (
    CKBC_RELATIONS,
    CKBC_TO_LAMA,
    TEMPLATES,
    Triple,
    canonical_relation,
    read_ckbc,
    read_ckbc_relations,
    triples_to_facts,
)
from lamp_jax.errors import UsageError
from tests.needs import CKBC_DIR, require_path
from tests.test_lama_sets import serve_lama_archive
from tests.tokenizer_fixtures import make_bert_tokenizer, make_roberta_tokenizer, words_of

FIXTURE = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"

EXPECTED_PER_RELATION = {
    "AtLocation": 7,
    "CapableOf": 6,
    "HasSubevent": 5,
    "IsA": 6,
    "UsedFor": 5,
    "Desires": 2,
}


def _read(path: Path, **kwargs) -> tuple[list[Fact], ReadReport]:
    """ConceptNet's facts and read report, from its one reader."""
    read = read_lama_set(path, "conceptnet", **kwargs)
    return read.facts, read.report


@pytest.fixture(scope="module")
def facts() -> list[Fact]:
    return _read(FIXTURE)[0]


@pytest.fixture(scope="module")
def vocab_words(facts) -> list[str]:
    return words_of([s for f in facts for s in f.sentences] + [f.obj for f in facts])


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory, vocab_words):
    return make_bert_tokenizer(tmp_path_factory.mktemp("bert"), vocab_words)


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory, vocab_words):
    return make_roberta_tokenizer(tmp_path_factory.mktemp("roberta"), vocab_words)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(**kw) -> str:
    base = {"sub": "dog", "obj": "bark", "pred": "CapableOf", "obj_label": "bark", "uuid": "x"}
    base["masked_sentences"] = ["A dog can [MASK]."]
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None})


# ----------------------------------------------------------------------------- reading


def test_read_fixture_exact_counts(facts):
    facts2, report = _read(FIXTURE)
    assert facts2 == facts
    assert report.lines == 31 and report.facts == 31
    assert report.sentences == 33  # two facts with two sentences, one sentence without [MASK]
    assert report.sentences_bad_mask_count == 1
    assert report.malformed == 0 and report.skipped_relations == {}
    assert report.facts_per_relation == EXPECTED_PER_RELATION
    by_subject = {(f.relation, f.subject): f for f in facts}
    assert by_subject[("Desires", "cat")].obj == "milk"  # "sub_label" variant
    assert by_subject[("AtLocation", "fish")].obj == "water"  # "obj" without "obj_label"
    assert by_subject[("HasSubevent", "read")].sentences == (
        "One of the things you do when you read is [MASK].",
    )
    assert all(f.sentences and all(s.count("[MASK]") == 1 for s in f.sentences) for f in facts)
    assert "31 facts" in report.summary()


def test_unrequested_relations_are_counted():
    facts, report = _read(FIXTURE, relations=("IsA", "UsedFor"))
    assert len(facts) == 11 and {f.relation for f in facts} == {"IsA", "UsedFor"}
    assert report.skipped_relations == {
        "AtLocation": 7,
        "CapableOf": 6,
        "HasSubevent": 5,
        "Desires": 2,
    }
    assert "AtLocation=7" in report.summary()


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"pred": "IsA", "obj_label": ', "malformed JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        (_line(pred=None), "'pred'"),
        (_line(obj_label=None, obj=None), "'obj_label'"),
        (_line(masked_sentences=None), "'masked_sentences'"),
        (_line(masked_sentences=[]), "no masked sentence"),
        (_line(masked_sentences="A dog can [MASK]."), "list of strings"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.jsonl", [_line(), "", bad, _line(uuid="y", sub="cat")])
    with pytest.raises(UsageError, match=f"bad.jsonl:3: .*{message}"):
        _read(path)
    facts, report = _read(path, strict=False)
    assert [f.uuid for f in facts] == ["x", "y"]
    assert report.malformed == 1 and report.blank_lines == 1 and report.lines == 4
    assert "bad.jsonl:3" in report.malformed_examples[0]


def test_a_byte_order_mark_before_the_first_line_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + (_line() + "\n" + _line(uuid="y", sub="cat")).encode())
    facts, report = _read(path)
    assert [f.uuid for f in facts] == ["x", "y"] and report.malformed == 0


def test_records_of_one_triple_are_one_fact_whose_sentences_share_a_split(tmp_path, bert_tok):
    lines = [_line(uuid="a"),
             _line(uuid="b", masked_sentences=["A dog can [MASK].", "Dogs [MASK] at night."]),
             _line(uuid="c", masked_sentences=["Dogs often [MASK]."]),
             _line(uuid="d", sub=None), _line(uuid="e", sub=None),  # no subject: kept apart
             *(_line(uuid=f"o{i}", sub=f"dog{i}") for i in range(9))]
    facts, report = _read(_write(tmp_path / "dup.jsonl", lines))
    assert report.duplicate_facts_merged == 2 and "merged into that fact 2" in report.summary()
    assert len(facts) == 1 + 2 + 9 and report.facts == 12
    dog = next(f for f in facts if f.subject == "dog")
    assert dog.uuid == "a"
    assert dog.sentences == ("A dog can [MASK].", "Dogs [MASK] at night.", "Dogs often [MASK].")
    assert report.sentences == 3 + 2 + 9
    assert report.facts_per_relation == {"CapableOf": 12}
    encoded, _ = encode_facts(facts, bert_tok, ["CapableOf"])
    splits = split_by_fact(encoded, (0.5, 0.25, 0.25), seed=0)
    dog_rows = set(np.flatnonzero(encoded.fact_index == facts.index(dog)).tolist())
    assert len(dog_rows) == 3
    assert sum(dog_rows <= set(idx.tolist()) for idx in splits.values()) == 1


def test_mask_count_and_optional_fields(tmp_path):
    path = _write(
        tmp_path / "m.jsonl",
        [
            _line(masked_sentences=["[MASK] and [MASK].", "No mask here.", "A dog can [MASK]."]),
            _line(masked_sentences=["Nothing to fill."], uuid="dropped"),
            _line(sub=None, uuid=None),
        ],
    )
    facts, report = _read(path)
    assert len(facts) == 2 and facts[0].sentences == ("A dog can [MASK].",)
    assert report.sentences_bad_mask_count == 3 and report.facts_without_usable_sentence == 1
    assert report.missing_subject == 1 and report.missing_uuid == 1
    assert facts[1].subject == "" and facts[1].uuid == "m.jsonl:3"


def test_download_from_local_zip(tmp_path, monkeypatch):
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURE, f"data/{CONCEPTNET_FILE.as_posix()}")
        zf.writestr("data/Google_RE/other.jsonl", "{}\n")
    asked = serve_lama_archive(monkeypatch, archive)
    cache = tmp_path / "cache"
    folder = fetch_lama("conceptnet", cache)
    assert (folder / CONCEPTNET_FILE).read_bytes() == FIXTURE.read_bytes()
    assert _read(folder)[0] == _read(FIXTURE)[0]
    assert sorted(p.name for p in cache.iterdir()) == [CACHED_DATA_DIR]  # zip removed
    # Cached: no second download (the URL now points nowhere).
    missing = (tmp_path / "missing.zip").as_uri()
    assert fetch_lama("conceptnet", cache, url=missing) == folder
    assert asked == [LAMA_DATA_URL]
    with pytest.raises(ConnectionError, match="could not download.*offline"):
        fetch_lama("conceptnet", tmp_path / "other_cache", url=missing)
    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("data/Squad/test.jsonl", "{}\n")
    with pytest.raises(ValueError, match="has no data/ConceptNet: not LAMA's data archive"):
        fetch_lama("conceptnet", tmp_path / "c3", url=wrong.as_uri())


# ----------------------------------------------------------------------------- encoding


def _check_layout(enc: EncodedPrompts, tok) -> None:
    n, seq_len = enc.input_ids.shape
    assert seq_len % 8 == 0 or seq_len == 64
    for arr in (enc.input_ids, enc.attention_mask, enc.mask_pos, enc.obj_id, enc.relation):
        assert arr.dtype == np.int32 and arr.shape[0] == n
    lengths = enc.attention_mask.sum(1)
    assert np.all(enc.input_ids[enc.attention_mask == 0] == tok.pad_token_id)
    assert np.all(enc.attention_mask[np.arange(seq_len)[None] >= lengths[:, None]] == 0)
    assert np.all(enc.input_ids[np.arange(n), enc.mask_pos] == tok.mask_token_id)
    assert np.all((enc.input_ids == tok.mask_token_id).sum(1) == 1)


def test_bert_encoding_round_trip(facts, bert_tok):
    enc, report = encode_facts(facts, bert_tok, LAMA_CONCEPTNET_RELATIONS)
    assert len(enc) == report.kept == 32  # 33 sentences, "ice cream" is two tokens
    assert report.skipped["object_not_single_token"] == 1 and "ice cream" in str(report.examples)
    assert not report.space_prefixed and not is_space_prefixed(bert_tok)
    _check_layout(enc, bert_tok)
    assert enc.relations == LAMA_CONCEPTNET_RELATIONS
    for i in range(len(enc)):
        fact = facts[enc.fact_index[i]]
        assert bert_tok.decode([int(enc.obj_id[i])]) == fact.obj
        assert enc.relations[enc.relation[i]] == fact.relation
        assert bert_tok.convert_ids_to_tokens(int(enc.input_ids[i, enc.mask_pos[i]])) == "[MASK]"
    assert report.kept_per_relation["IsA"] == 7 and report.kept_per_relation["PartOf"] == 0
    sub = enc.subset([3, 1])
    assert len(sub) == 2 and sub.seq_len == enc.seq_len and sub.fact_index[0] == enc.fact_index[3]


def test_bert_object_lowercasing_unknown_and_too_long(bert_tok):
    facts = [
        Fact("IsA", "dog", "Animal", ("A dog is a kind of [MASK].",), "u0"),
        Fact("IsA", "dog", "zebra", ("A dog is a [MASK].",), "u1"),  # not in vocabulary
        Fact("IsA", "dog", "animal", ("A dog is a kind of a kind of a kind of [MASK].",), "u2"),
        Fact("PartOf", "dog", "animal", ("A dog is a [MASK].",), "u3"),
    ]
    enc, report = encode_facts(facts, bert_tok, ("IsA",), max_length=10)
    assert len(enc) == 1 and bert_tok.decode([int(enc.obj_id[0])]) == "animal"
    assert report.skipped == {
        "relation_not_requested": 1,
        "object_not_single_token": 1,
        "too_long": 1,
        "mask_count": 0,
    }
    assert enc.seq_len <= 10


def test_roberta_leading_space_objects(facts, roberta_tok, tmp_path, vocab_words):
    tok = roberta_tok
    assert is_space_prefixed(tok)
    # Without a space "think" is several byte tokens; after a space it is one token.
    assert len(tok("think", add_special_tokens=False)["input_ids"]) > 1
    enc, report = encode_facts(facts, tok, LAMA_CONCEPTNET_RELATIONS)
    assert report.space_prefixed and len(enc) == 32
    assert report.skipped["object_not_single_token"] == 1
    _check_layout(enc, tok)
    for i in range(len(enc)):
        obj = facts[enc.fact_index[i]].obj
        assert tok.convert_ids_to_tokens(int(enc.obj_id[i])) == "Ġ" + obj
        assert tok.decode([int(enc.obj_id[i])]) == " " + obj
        # The space before the mask is folded into the mask, never a lone "Ġ" token.
        assert tok.convert_ids_to_tokens(int(enc.input_ids[i, enc.mask_pos[i] - 1])) != "Ġ"
    # Same encoding whether or not the tokenizer's <mask> strips the space to its left.
    plain = make_roberta_tokenizer(tmp_path / "plain", vocab_words, mask_lstrip=False)
    enc2, _ = encode_facts(facts, plain, LAMA_CONCEPTNET_RELATIONS)
    np.testing.assert_array_equal(enc.input_ids, enc2.input_ids)


# ----------------------------------------------------------------------------- splits


def _synthetic(counts_facts: list[int], prompts_per_fact: int = 2, seed: int = 0) -> EncodedPrompts:
    """Prompts of len(counts_facts) relations; relation r has counts_facts[r] facts."""
    rng = np.random.default_rng(seed)
    rel, fact = [], []
    f = 0
    for r, n_facts in enumerate(counts_facts):
        for _ in range(n_facts):
            k = int(rng.integers(1, prompts_per_fact + 1))
            rel += [r] * k
            fact += [f] * k
            f += 1
    order = rng.permutation(len(rel))  # interleave relations like a real file
    rel, fact = np.array(rel, np.int32)[order], np.array(fact, np.int32)[order]
    n, seq_len = len(rel), 8
    ids = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len) % 97 + 5
    return EncodedPrompts(
        input_ids=ids,
        attention_mask=np.ones((n, seq_len), np.int32),
        mask_pos=np.full(n, 3, np.int32),
        obj_id=np.arange(n, dtype=np.int32),
        relation=rel,
        fact_index=fact,
        relations=tuple(f"R{i}" for i in range(len(counts_facts))),
    )


def test_split_by_fact_properties():
    n_facts = [40, 3, 2, 1, 0, 17]
    enc = _synthetic(n_facts)
    split = split_by_fact(enc, seed=7)
    names = ("train", "dev", "test")
    all_idx = np.concatenate([split[s] for s in names])
    assert np.array_equal(np.sort(all_idx), np.arange(len(enc)))  # disjoint and covering
    relation_of = dict(zip(enc.fact_index.tolist(), enc.relation.tolist(), strict=True))
    fact_sets = {s: set(enc.fact_index[split[s]].tolist()) for s in names}
    assert sum(len(v) for v in fact_sets.values()) == len(relation_of)  # no fact in two splits
    for r, n in enumerate(n_facts):
        per_split = [sum(relation_of[f] == r for f in fact_sets[s]) for s in names]
        assert sum(per_split) == n
        if n >= 3:
            assert min(per_split) >= 1, (r, per_split)
    assert [sum(relation_of[f] == 0 for f in fact_sets[s]) for s in names] == [28, 6, 6]
    again = split_by_fact(enc, seed=7)
    assert all(np.array_equal(split[s], again[s]) for s in names)
    other = split_by_fact(enc, seed=8)
    assert not np.array_equal(split["train"], other["train"])


def test_split_is_stable_per_relation_and_reference_protocol():
    rels = ["A"] * 20 + ["B"] * 10
    a = split_fact_ids(rels, seed=3)
    b = split_fact_ids(["A"] * 20, seed=3)  # relation B removed
    for s in a:
        assert np.array_equal(a[s][a[s] < 20], b[s])
    facts = [Fact(r, "s", "o", ("[MASK].",), str(i)) for i, r in enumerate(rels)]
    c = split_facts(facts, seed=3)
    assert all(np.array_equal(a[s], c[s]) for s in a)
    ref = reference_protocol_split(5)
    assert all(np.array_equal(ref[s], np.arange(5)) for s in ("train", "dev", "test"))


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("epochs", [1, 2])
def test_per_relation_batcher(epochs):
    enc = _synthetic([5, 0, 12, 3], prompts_per_fact=1)
    counts = enc.counts_per_relation()
    b = 4
    batcher = RelationBatcher(enc, b, seed=1, mode="per_relation", epochs=epochs)
    steps = epochs * np.ceil(counts / b).astype(int)
    assert np.array_equal(batcher.steps_per_relation, steps)
    assert batcher.num_steps == steps.max() == len(batcher)
    batches = [batcher.batch_at(s) for s in range(batcher.num_steps)]
    for batch in batches:
        assert batch["input_ids"].shape == (4, b, enc.seq_len)
        assert batch["attention_mask"].shape == (4, b, enc.seq_len)
        assert batch["mask_pos"].shape == batch["obj_id"].shape == (4, b)
        assert batch["weight"].dtype == np.float32
        assert np.all(batch["attention_mask"].sum(-1) > 0)  # weight-0 rows are real prompts
        valid = batch["weight"] > 0
        assert np.all(enc.relation[batch["index"][valid]] == np.nonzero(valid)[0])
        np.testing.assert_array_equal(batch["obj_id"][valid], enc.obj_id[batch["index"][valid]])
    weights = np.stack([bt["weight"] for bt in batches])  # [S, R, B]
    assert np.array_equal(weights.sum((0, 2)), epochs * counts)
    assert np.array_equal((weights.sum(2) > 0).sum(0), steps)  # steps with nonzero weight
    for r in range(4):
        per_epoch = steps[r] // epochs if steps[r] else 0
        for e in range(epochs):
            chunk = [bt["index"][r] for bt in batches[e * per_epoch : (e + 1) * per_epoch]]
            seen = np.concatenate(chunk) if chunk else np.zeros(0, int)
            assert sorted(seen[seen >= 0]) == sorted(np.flatnonzero(enc.relation == r))
    # Pure in (seed, step): any order, fresh object, same result; other seed differs.
    fresh = RelationBatcher(enc, b, seed=1, mode="per_relation", epochs=epochs)
    for s in reversed(range(batcher.num_steps)):
        for k in batches[s]:
            np.testing.assert_array_equal(fresh.batch_at(s)[k], batches[s][k])
    other = RelationBatcher(enc, b, seed=2, mode="per_relation", epochs=epochs)
    assert any(
        not np.array_equal(other.batch_at(s)["index"], batches[s]["index"])
        for s in range(batcher.num_steps)
    )
    with pytest.raises(IndexError):
        batcher.batch_at(batcher.num_steps)


def test_eval_batches_cover_each_prompt_once():
    enc = _synthetic([5, 0, 12, 3, 9])
    for b in (1, 4, 32):
        batcher = RelationBatcher(enc, b, seed=0, mode="balanced", epochs=3)
        batches = list(batcher.eval_batches())
        assert len(batches) == batcher.num_eval_batches()
        index = np.concatenate([bt["index"][bt["weight"] > 0] for bt in batches])
        assert np.array_equal(np.sort(index), np.arange(len(enc)))
        assert all(bt["input_ids"].shape == (5, b, enc.seq_len) for bt in batches)
        assert all(np.array_equal(bt["weight"] > 0, bt["index"] >= 0) for bt in batches)


def test_row_features_travel_with_their_prompts():
    enc = _synthetic([5, 0, 12, 3])
    # A feature that names its own row: every batch must carry exactly the rows of its prompts,
    # including the filler prompts of weight-0 rows.
    feature = np.arange(len(enc), dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    batcher = RelationBatcher(enc, 4, seed=0, epochs=2, row_features={"hidden": feature})
    plain = RelationBatcher(enc, 4, seed=0, epochs=2)
    for batch in [*(batcher.batch_at(s) for s in range(len(batcher))), *batcher.eval_batches()]:
        assert batch["hidden"].shape == (4, 4, 3)
        rows = batch["hidden"][..., 0].astype(int)
        valid = batch["index"] >= 0
        np.testing.assert_array_equal(rows[valid], batch["index"][valid])
        np.testing.assert_array_equal(enc.input_ids[rows], batch["input_ids"])
    for key, values in plain.batch_at(1).items():
        np.testing.assert_array_equal(batcher.batch_at(1)[key], values)
    with pytest.raises(ValueError, match=f"'hidden' has 3 rows for {len(enc)} prompts"):
        RelationBatcher(enc, 4, row_features={"hidden": feature[:3]})


def test_balanced_batcher():
    enc = _synthetic([5, 0, 12, 3], prompts_per_fact=1)
    counts = enc.counts_per_relation()
    batcher = RelationBatcher(enc, 4, seed=3, mode="balanced", epochs=2)
    assert batcher.num_steps == 2 * 3
    assert np.array_equal(batcher.steps_per_relation, [6, 0, 6, 6])
    stream = {r: [] for r in range(4)}
    for s in range(batcher.num_steps):
        batch = batcher.batch_at(s)
        assert batch["input_ids"].shape == (4, 4, enc.seq_len)
        np.testing.assert_array_equal(batch["weight"], np.array([[1], [0], [1], [1]]) * np.ones(4))
        for r in range(4):
            stream[r] += batch["index"][r].tolist()
    for r in (0, 2, 3):  # each pass over a relation is a permutation of its prompts
        rows = sorted(np.flatnonzero(enc.relation == r))
        n = counts[r]
        for p in range(len(stream[r]) // n):
            assert sorted(stream[r][p * n : (p + 1) * n]) == rows
    assert list(batcher.iter_from(5))[0]["index"].tolist() == batcher.batch_at(5)["index"].tolist()


# ----------------------------------------------------------------------------- CKBC triples


def test_ckbc_names_templates_and_errors(tmp_path):
    assert CKBC_TO_LAMA["atlocation"] == "AtLocation" and CKBC_TO_LAMA["notisa"] == "NotIsA"
    assert all(CKBC_TO_LAMA[r.lower()] == r for r in LAMA_CONCEPTNET_RELATIONS)
    assert canonical_relation("HASSUBEVENT") == "HasSubevent" and canonical_relation("Foo") == "Foo"
    assert set(TEMPLATES) == set(LAMA_CONCEPTNET_RELATIONS)
    for template in TEMPLATES.values():
        assert template.count("[MASK]") == 1 and template.count("{head}") == 1
    good = _write(tmp_path / "t.txt", ["isa\tdog\tanimal\t1", "UsedFor\tpen\twrite\t0", ""])
    assert read_ckbc(good) == [
        Triple("IsA", "dog", "animal", 1),
        Triple("UsedFor", "pen", "write", 0),
    ]
    for lines, message in [
        (["IsA\tdog\tanimal", "IsA\tdog"], "t.txt:2: expected 3 or 4"),
        (["IsA\tdog\tanimal\t1", "IsA\tcat\tanimal\t0.5"], "t.txt:2: label must be 0 or 1"),
        (["IsA\tdog\tanimal\t1", "IsA\tcat\tanimal"], "t.txt:2: 3 columns"),
        (["IsA\t\tanimal"], "t.txt:1: empty"),
    ]:
        with pytest.raises(ValueError, match=message):
            read_ckbc(_write(tmp_path / "t.txt", lines))


def test_triples_to_facts_and_encoding(bert_tok):
    triples = [
        Triple("IsA", "dog", "animal", 1),
        Triple("IsA", "dog", "tool", 0),
        Triple("AtLocation", "book", "library"),
        Triple("AtLocation", "cow", "pet store"),
        Triple("DefinedAs", "dog", "animal"),
        Triple("UsedFor", "pen", "write"),
    ]
    facts, report = triples_to_facts(triples, relations=("IsA", "AtLocation", "DefinedAs"))
    assert report.negative_label == 1 and report.facts == 3
    assert report.skipped_relations == {"DefinedAs": 1, "UsedFor": 1}  # no template / not wanted
    assert facts[0] == Fact("IsA", "dog", "animal", ("Dog is a [MASK].",), "ckbc-0")
    assert facts[1].sentences == ("You are likely to find book in [MASK].",)
    enc, enc_report = encode_facts(facts, bert_tok, ("IsA", "AtLocation"))
    assert len(enc) == 2 and enc_report.skipped["object_not_single_token"] == 1  # "pet store"


def test_read_real_ckbc():
    require_path(CKBC_DIR, "ConceptNet CKBC data (LAMP_JAX_CKBC_DIR)")
    train = read_ckbc(CKBC_DIR / "train.txt")
    assert len(train) == 100_000 and all(t.label is None for t in train[:100])
    assert set(LAMA_CONCEPTNET_RELATIONS) <= {t.relation for t in train}
    dev1 = read_ckbc(CKBC_DIR / "dev1.txt")
    assert len(dev1) == 1200 and sum(t.label for t in dev1) == 600
    assert len(read_ckbc(CKBC_DIR / "test.txt")) == 1200
    names = read_ckbc_relations(CKBC_DIR / "rel.txt")
    assert len(names) == 34 and set(names) <= set(CKBC_RELATIONS)
    facts, report = triples_to_facts(dev1)
    assert (
        report.negative_label == 600 and len(facts) + sum(report.skipped_relations.values()) == 600
    )


# ----------------------------------------------------------------------------- TFDS


def test_tfds_round_trip_without_tensorflow(tmp_path, monkeypatch, facts):
    from lamp_jax.data.tfds_lama import load_tfds_lama

    loaded = load_tfds_lama(tmp_path / "tfds", FIXTURE)
    assert loaded == facts
    assert list((tmp_path / "tfds").rglob("*.array_record-*"))
    assert load_tfds_lama(tmp_path / "tfds", FIXTURE) == facts  # from the cache
    assert "tensorflow" not in sys.modules
    # Official config: the file comes through the one download of LAMA's archive.
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(FIXTURE, f"data/{CONCEPTNET_FILE.as_posix()}")
    asked = serve_lama_archive(monkeypatch, archive)
    assert load_tfds_lama(tmp_path / "tfds_official") == facts
    assert asked == [LAMA_DATA_URL]


def test_relations_given_on_the_command_line_are_split_on_commas():
    """``--config.data.relations=AtLocation,IsA`` reaches the config as the 1-tuple
    ``("AtLocation,IsA",)`` (ml_collections parses no commas inside a tuple field): it names
    two relations, as the tuple does. tests/test_topology.py trains 6 relations given so."""
    from lamp_jax.data.lama_sets import requested_relations

    assert requested_relations(("AtLocation, IsA",)) == ("AtLocation", "IsA")
    assert requested_relations("AtLocation,IsA") == ("AtLocation", "IsA")
    assert requested_relations(("AtLocation", "IsA")) == ("AtLocation", "IsA")
    assert requested_relations(()) == ()
