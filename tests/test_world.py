"""The embedded toy world and its shipped MLM: determinism, format, and the LAMA situation."""

import json

import numpy as np

from lamp_jax import world
from lamp_jax.data import encode_facts, read_lama_set
from lamp_jax.embedded import (
    EMBEDDED_ASSET_DIR,
    build_tokenizer,
    ensure_embedded_model,
    pretrain_embedded_mlm,
)
from lamp_jax.models import load_mlm


def test_world_is_deterministic_and_well_formed():
    facts = world.make_facts(0)
    assert facts == world.make_facts(0) and facts != world.make_facts(1)
    assert world.pretraining_corpus(facts, 0) == world.pretraining_corpus(facts, 0)
    assert len(world.RELATIONS) >= 8
    per_relation = {r: [f for f in facts if f.relation == r] for r in world.RELATIONS}
    assert all(len(v) >= 40 for v in per_relation.values())
    for r, fs in per_relation.items():
        assert len({f.obj for f in fs}) >= 6, r  # no relation is answered by one word
        counts = np.unique([f.obj for f in fs], return_counts=True)[1]
        assert counts.max() / len(fs) < 0.35, r  # majority-class baseline stays low


def test_facts_are_in_the_corpus_and_probes_are_not():
    facts = world.make_facts(0)
    sentences = {s for s, _ in world.pretraining_corpus(facts, 0)}
    for f in facts:
        spec = world.RELATIONS[f.relation]
        assert all(t.format(s=f.subject, o=f.obj) in sentences for t in spec.knowledge)
        probe = spec.probe.format(s=f.subject)
        assert probe.replace("[MASK]", f.obj) not in sentences  # held-out phrasing
        assert spec.probe not in spec.knowledge


def test_probe_records_are_valid_lama_with_single_token_objects(tmp_path):
    facts = world.make_facts(0)
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in world.probe_records(facts)))
    data = read_lama_set(path)
    read, report = data.facts, data.report
    assert len(read) == len(facts) and report.malformed == 0
    tokenizer = build_tokenizer(tmp_path / "tok")
    encoded, encode_report = encode_facts(read, tokenizer, tuple(world.RELATIONS))
    assert len(encoded) == len(facts) and sum(encode_report.skipped.values()) == 0
    assert tokenizer.unk_token_id not in set(encoded.input_ids.ravel())


def test_pretraining_reduces_the_loss(tmp_path):
    # Measured: 6.09 -> 1.84 (mean of the last 50 of 150 steps).
    stats = pretrain_embedded_mlm(tmp_path, steps=150, batch_size=32, show_progress=False)
    assert stats["last_loss"] < 0.6 * stats["first_loss"]
    assert load_mlm(tmp_path).config.num_layers == 4


def _p_at_1(mlm, texts, objects):
    enc = mlm.tokenizer(texts, padding=True, return_tensors="np")
    pos = (enc["input_ids"] == mlm.tokenizer.mask_token_id).argmax(1)
    logits = mlm.forward(enc["input_ids"], enc["attention_mask"], output_positions=pos)["logits"]
    gold = np.asarray(mlm.tokenizer.convert_tokens_to_ids(objects))
    return float(np.mean(np.asarray(logits).argmax(-1) == gold))


def test_shipped_model_knows_the_facts_but_the_probes_hide_them():
    assert ensure_embedded_model() == EMBEDDED_ASSET_DIR
    mlm = load_mlm(EMBEDDED_ASSET_DIR)
    facts = world.make_facts(0)
    objects = [f.obj for f in facts]
    knowledge = _p_at_1(mlm, [world.RELATIONS[f.relation].knowledge[0].format(
        s=f.subject, o="[MASK]") for f in facts], objects)
    probe = _p_at_1(mlm, [world.RELATIONS[f.relation].probe.format(s=f.subject) for f in facts],
                    objects)
    # Measured on the shipped asset: knowledge phrasing 0.99, probe phrasing 0.18.
    assert knowledge > 0.95
    assert probe < 0.3
