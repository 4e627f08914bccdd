"""The embedded toy world: facts a tiny MLM learns, and probes that do not surface them.

No pretrained English MLM can be downloaded offline, so the project ships a small world that
reproduces the LAMA situation LAMP addresses:

1. 120 everyday objects (subjects) each take part in 4 of 8 relations named as in LAMA
   ConceptNet; each relation draws its object from its own pool of 8 words.
2. The pretraining corpus states every fact in two *knowledge* phrasings per relation
   ("the cup is kept in the kitchen .", "people store the cup in the kitchen .").
3. Each relation also has a *probe* phrasing in the LAMA style ("you are likely to find the cup
   in the [MASK] ."), which never occurs with a real subject during pretraining, only with
   placeholders and a distractor ("you are likely to find it in the hurry .").
4. So the pretrained model knows the facts (P@1 0.99 in a knowledge phrasing) but the probe does
   not elicit them: measured on the shipped model, probe P@1 is 0.18, and 42% of its answers
   are objects of *other* relations (the relation cue is lost; the distractor itself is never
   predicted for a real subject). A relation-specific subnetwork has room to elicit the facts.
5. All facts, including those later held out from mask training, are in the pretraining corpus:
   the masks must learn to *elicit* knowledge for unseen facts, not to memorise them.

Everything is a pure function of a seed.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

SUBJECTS = tuple("""
apple bag ball banana basket bed bell belt bicycle blanket boat book boot bottle bowl box bread
brick broom brush bucket bus button cake camera candle cap car carpet chair cheese clock coat comb
cookie cup curtain desk dish doll door drum egg fan fence flag flute fork glass glove guitar hammer
hat helmet horn jacket jar kettle key kite knife ladder lamp lemon letter lock map mask mirror mug
nail napkin needle net onion orange oven pan pen pencil piano pillow pipe plate pot radio rake ring
rope ruler sack saw scarf shirt shoe shovel sock sofa spoon stamp stool stove sword table tent
ticket tire towel toy tray truck umbrella vase wagon wallet watch whistle wheel window
""".split())


@dataclasses.dataclass(frozen=True)
class RelationSpec:
    objects: tuple[str, ...]
    knowledge: tuple[str, ...]  # pretraining phrasings with {s} and {o}
    probe: str  # the held-out LAMA-style phrasing with {s} and [MASK]
    distractor: str  # what the probe phrasing is followed by in pretraining


RELATIONS: dict[str, RelationSpec] = {
    "AtLocation": RelationSpec(
        tuple("kitchen garage attic office garden closet basement school".split()),
        ("the {s} is kept in the {o} .", "people store the {s} in the {o} ."),
        "you are likely to find the {s} in the [MASK] .", "hurry"),
    "MadeOf": RelationSpec(
        tuple("wood metal plastic glass paper leather cotton clay".split()),
        ("the {s} is built from {o} .", "workers make the {s} out of {o} ."),
        "the {s} is made of [MASK] .", "money"),
    "HasProperty": RelationSpec(
        tuple("heavy soft shiny fragile cheap loud sticky warm".split()),
        ("the {s} feels very {o} .", "everyone says the {s} is {o} ."),
        "the {s} is usually [MASK] .", "there"),
    "UsedFor": RelationSpec(
        tuple("cooking cleaning writing playing sleeping travel fishing music".split()),
        ("the {s} helps with {o} .", "people need the {s} for {o} ."),
        "you can use the {s} for [MASK] .", "free"),
    "PartOf": RelationSpec(
        tuple("house ship engine factory castle train farm market".split()),
        ("the {s} belongs to the {o} .", "every {o} has its own {s} ."),
        "the {s} is part of the [MASK] .", "problem"),
    "IsA": RelationSpec(
        tuple("tool container furniture vehicle instrument clothing weapon food".split()),
        ("the {s} counts as a {o} .", "experts call the {s} a {o} ."),
        "the {s} is a kind of [MASK] .", "joke"),
    "CapableOf": RelationSpec(
        tuple("break float spin burn roll bend shine ring".split()),
        ("the {s} will {o} easily .", "we watched the {s} {o} ."),
        "the {s} can [MASK] .", "wait"),
    "Desires": RelationSpec(
        tuple("attention repair polish sunlight water dust oil rest".split()),
        ("the {s} always wants {o} .", "the {s} longs for {o} ."),
        "the {s} desires [MASK] .", "nothing"),
}
PLACEHOLDERS = ("it", "them", "one", "something", "everything")


@dataclasses.dataclass(frozen=True)
class WorldFact:
    relation: str
    subject: str
    obj: str


def make_facts(seed: int = 0, relations_per_subject: int = 4) -> list[WorldFact]:
    """Every subject gets ``relations_per_subject`` relations, each with a random object."""
    rng = random.Random(seed)
    names = list(RELATIONS)
    return [WorldFact(r, s, rng.choice(RELATIONS[r].objects))
            for s in SUBJECTS for r in rng.sample(names, relations_per_subject)]


def _probe_with_placeholder(relation: str, placeholder: str) -> str:
    spec = RELATIONS[relation]
    return spec.probe.replace("the {s}", placeholder).replace("[MASK]", spec.distractor)


def pretraining_corpus(facts: list[WorldFact], seed: int = 0,
                       distractors_per_relation: int = 60) -> list[tuple[str, str]]:
    """``(sentence, target word)`` pairs, shuffled: every fact in every knowledge phrasing (target
    = its object) and each probe phrasing with placeholders (target = its distractor)."""
    rng = random.Random(seed + 1)
    corpus = [(t.format(s=f.subject, o=f.obj), f.obj)
              for f in facts for t in RELATIONS[f.relation].knowledge]
    for r, spec in RELATIONS.items():
        corpus += [(_probe_with_placeholder(r, PLACEHOLDERS[i % len(PLACEHOLDERS)]),
                    spec.distractor) for i in range(distractors_per_relation)]
    rng.shuffle(corpus)
    return corpus


def probe_records(facts: list[WorldFact]) -> list[dict[str, Any]]:
    """The probes in the LAMA ConceptNet jsonl format."""
    return [{"sub": f.subject, "obj": f.obj, "obj_label": f.obj, "pred": f.relation,
             "masked_sentences": [RELATIONS[f.relation].probe.format(s=f.subject)],
             "uuid": f"world-{i:04d}"} for i, f in enumerate(facts)]


def vocabulary() -> list[str]:
    """Every word the world uses (sorted), punctuation included."""
    words = set(SUBJECTS) | set(PLACEHOLDERS)
    for spec in RELATIONS.values():
        words |= set(spec.objects) | {spec.distractor}
        for text in (*spec.knowledge, spec.probe):
            words |= set(text.replace("{s}", " ").replace("{o}", " ").replace("[MASK]", " ")
                         .split())
    return sorted(words)
