"""Train/dev/test splits of LAMA prompts, by fact and stratified per relation, and the stricter
held-out protocols a reviewer asks for.

Why split by *fact*: a fact often has several cloze sentences; if paraphrases of one fact landed in
both train and test, test P@1 would measure memorisation of that fact's object, not knowledge the
mask extracts. Why stratify per relation: every relation trains its own mask, so each needs its own
dev set (model selection) and test set (reporting).

Why a separate RNG stream per relation, seeded from ``(seed, crc32(relation name))``: adding or
removing a relation does not reshuffle the splits of the others.

The reference implementation trains, selects the best epoch and reports on one and the same file;
:func:`reference_protocol_split` reproduces that for comparison only.

Held-out protocols (``config.data.split``; :func:`held_out_split`), each stratified by relation
and deterministic in ``data.seed``:

* ``by_fact``: held-out facts (:func:`split_by_fact`); a held-out subject or object may occur in
  training in another fact.
* ``subject_disjoint``: the facts of one (relation, subject) go to one split, so no dev or test
  subject of a relation is one of its training subjects. Subjects compare case-folded with
  whitespace collapsed; facts without a subject cannot be placed and are dropped (counted).
* ``object_disjoint``: the same with the object, compared by token id (what P@1 compares), so no
  dev or test object of a relation is one of its training objects.
* ``template_disjoint``: facts are split as ``by_fact`` does, and each relation's templates
  (:func:`sentence_template`) are split into training templates and held-out templates; a
  training fact keeps its sentences in training templates, a dev/test fact those in held-out
  templates, and the other sentences are dropped (counted). Held-out prompts are then new facts
  in new phrasings. A relation with one template cannot hold a template out: it is dropped from
  the run, with that reason.

Subjects, objects and templates are allocated to the splits as :func:`split_fact_ids` allocates
facts (a group is one unit: ``fractions`` apply to the number of groups, not of facts), so with
one fact per group a protocol gives exactly the ``by_fact`` split. Under these three protocols a
relation left without train, dev or test prompts is dropped from the run with its
reason: a protocol whose claim is a disjoint held-out set is not run on a
relation it cannot hold out.
"""

from __future__ import annotations

import dataclasses
import re
import zlib
from collections.abc import Callable, Hashable, Sequence

import numpy as np

from lamp_jax.data.encode import EncodedPrompts
from lamp_jax.data.lama import MASK, Fact
from lamp_jax.errors import UsageError

SPLITS = ("train", "dev", "test")
#: ``config.data.split`` values that hold facts out (``reference`` is the other choice).
HELD_OUT_PROTOCOLS = ("by_fact", "subject_disjoint", "object_disjoint", "template_disjoint")


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts close to ``fractions`` (largest remainder).

    With ``n >= number of positive fractions`` every split with a positive fraction gets at least
    one item; smaller ``n`` fill splits in order of decreasing fraction (train first).
    """
    k = len(fractions)
    positive = [i for i in range(k) if fractions[i] > 0]
    order = sorted(positive, key=lambda i: (-fractions[i], i))
    if n < len(positive):
        counts = [0] * k
        for i in order[:n]:
            counts[i] = 1
        return counts
    counts = [1 if i in positive else 0 for i in range(k)]
    rest = n - len(positive)
    total = sum(fractions)
    # Ideal share of the whole n, minus the one already given.
    ideal = [max(0.0, n * fractions[i] / total - counts[i]) for i in range(k)]
    scale = rest / sum(ideal) if sum(ideal) > 0 else 0.0
    ideal = [x * scale for x in ideal]
    floors = [int(np.floor(x)) for x in ideal]
    left = rest - sum(floors)
    by_remainder = sorted(positive, key=lambda i: (-(ideal[i] - floors[i]), i))
    for i in by_remainder[:left]:
        floors[i] += 1
    return [c + f for c, f in zip(counts, floors, strict=True)]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, dev, test), got {fractions}")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative and not all zero, got {fractions}")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _relation_rng(seed: int, relation: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(relation.encode("utf-8"))])


def split_fact_ids(
    fact_relations: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Assign fact ids ``0..len(fact_relations)-1`` to train/dev/test, stratified by relation.

    Deterministic for ``seed``; every relation with at least 3 facts (and all fractions positive)
    gets at least one fact in each split. Returns sorted int64 fact ids per split.
    """
    fractions = _check_fractions(fractions)
    rel = np.asarray(list(fact_relations), dtype=object)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for relation in sorted(set(rel.tolist())):
        ids = np.flatnonzero(rel == relation)
        ids = ids[_relation_rng(seed, relation).permutation(len(ids))]
        start = 0
        for name, count in zip(SPLITS, _allocate(len(ids), fractions), strict=True):
            out[name].append(ids[start : start + count])
            start += count
    return {s: np.sort(np.concatenate(out[s])) if out[s] else np.zeros(0, np.int64) for s in SPLITS}


def split_facts(
    facts: Sequence[Fact],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fact indices per split for a list of facts (before encoding); see :func:`split_fact_ids`."""
    return split_fact_ids([f.relation for f in facts], fractions, seed)


def split_by_fact(
    encoded: EncodedPrompts,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Prompt indices of ``encoded`` per split; all prompts of one fact land in the same split.

    Only facts that kept at least one prompt after encoding take part, so the ">= 1 fact per split
    for relations with >= 3 facts" guarantee holds for the encoded data. Use
    ``encoded.subset(idx)`` to get the split's prompts.
    """
    facts, first = np.unique(encoded.fact_index, return_index=True)
    rel_of_fact = encoded.relation[first]
    # A fact has one relation; guard against hand-built inputs that break this.
    clash = encoded.relation != rel_of_fact[np.searchsorted(facts, encoded.fact_index)]
    if np.any(clash):
        raise ValueError("a fact_index occurs with more than one relation")
    names = [encoded.relations[r] for r in rel_of_fact]
    fact_split = split_fact_ids(names, fractions, seed)
    out = {}
    for name in SPLITS:
        chosen = facts[fact_split[name]]
        out[name] = np.flatnonzero(np.isin(encoded.fact_index, chosen)).astype(np.int64)
    return out


def reference_protocol_split(n: int) -> dict[str, np.ndarray]:
    """train = dev = test = all ``n`` prompts: the reference paper's protocol, for comparison only.

    The reference trains, selects its best epoch and reports on the same LAMA file, which
    overstates what a mask extracts; numbers obtained with this split must not be reported as
    held-out results.
    """
    everything = np.arange(int(n), dtype=np.int64)
    return {name: everything.copy() for name in SPLITS}


# --- held-out protocols ------------------------------------------------------------------------


def split_groups(
    fact_relations: Sequence[str],
    fact_groups: Sequence[Hashable],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Like :func:`split_fact_ids`, but the facts of one (relation, group) land in one split.

    ``fact_groups[i]`` is fact i's group (its subject, object, ...). Within each relation the
    groups, in order of first occurrence, are permuted by the relation's own RNG and allocated
    to train/dev/test by count with ``fractions``; with one fact per group this is exactly
    :func:`split_fact_ids`. Returns sorted int64 fact ids per split.
    """
    fractions = _check_fractions(fractions)
    rel = np.asarray(list(fact_relations), dtype=object)
    groups = list(fact_groups)
    if len(groups) != len(rel):
        raise ValueError(f"{len(groups)} groups for {len(rel)} facts")
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for relation in sorted(set(rel.tolist())):
        members: dict[Hashable, list[int]] = {}
        for i in np.flatnonzero(rel == relation).tolist():
            members.setdefault(groups[i], []).append(i)
        listed = list(members.values())
        order = _relation_rng(seed, relation).permutation(len(listed))
        start = 0
        for name, count in zip(SPLITS, _allocate(len(listed), fractions), strict=True):
            chosen = [i for g in order[start : start + count] for i in listed[g]]
            out[name].append(np.asarray(chosen, np.int64))
            start += count
    return {s: np.sort(np.concatenate(out[s])) if out[s] else np.zeros(0, np.int64) for s in SPLITS}


def normalised_subject(subject: str) -> str:
    """The form in which subjects are compared: case-folded, whitespace collapsed."""
    return " ".join(subject.split()).casefold()


def sentence_template(sentence: str, subject: str) -> str:
    """A sentence's template: lower-cased, whitespace collapsed, every whole-word occurrence of
    the subject outside ``[MASK]`` replaced by ``[X]`` ("You are likely to find a Fork in a
    [MASK]." with subject "fork" -> "you are likely to find a [X] in a [MASK]."). A sentence
    that does not contain its subject is its own template."""
    parts = " ".join(sentence.split()).split(MASK)
    subject = " ".join(subject.split()).lower()
    pattern = re.compile(r"(?<!\w)" + re.escape(subject) + r"(?!\w)") if subject else None
    lowered = [part.lower() for part in parts]
    if pattern is not None:
        lowered = [pattern.sub("[X]", part) for part in lowered]
    return MASK.join(lowered)


@dataclasses.dataclass
class SplitReport:
    """What a held-out protocol did, per relation: its units (facts, subjects, objects or
    templates) per split, facts and prompts per split, and everything it dropped with the reason.

    ``prompts`` are counted on the prompts the split indexes (after any re-encoding), so per
    relation ``sum(prompts) + dropped prompts`` is the relation's number of encoded prompts.
    """

    protocol: str
    unit: str
    units: dict[str, dict[str, int]]  # relation -> split (or side) -> units
    facts: dict[str, dict[str, int]]  # relation -> split -> facts with at least one prompt
    prompts: dict[str, dict[str, int]]  # relation -> split -> prompts
    dropped_facts: dict[str, dict[str, int]]  # reason -> relation -> facts
    dropped_prompts: dict[str, dict[str, int]]  # reason -> relation -> prompts (or sentences)
    dropped_relations: dict[str, str]  # relation -> why it is not run

    def summary(self) -> str:
        """One paragraph for the run's log."""
        def per_split(table, relation):
            return "/".join(str(n) for n in table[relation].values())

        sides = "/".join(next(iter(self.units.values()), {}).keys()) or "train/dev/test"
        rows = [f"{r} {per_split(self.units, r)}, {per_split(self.facts, r)}, "
                f"{per_split(self.prompts, r)}" for r in self.prompts]
        text = (f"split {self.protocol} ({self.unit}s per {sides}, then facts and prompts per "
                f"train/dev/test, per relation): " + "; ".join(rows))
        for kind, table in (("facts", self.dropped_facts), ("prompts", self.dropped_prompts)):
            for reason, counts in table.items():
                if any(counts.values()):
                    listed = ", ".join(f"{r}={n}" for r, n in counts.items() if n)
                    text += f"; {kind} dropped ({reason}): {listed}"
        if self.dropped_relations:
            text += "; relations not run: " + ", ".join(
                f"{r} ({why})" for r, why in self.dropped_relations.items())
        for name in ("dev", "test"):
            missing = [r for r, counts in self.prompts.items() if counts[name] == 0]
            if missing:
                text += f"; relations without {name} prompts: {', '.join(missing)}"
        return text


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    """A protocol's split: ``indices[split]`` are rows of ``encoded``, the prompts after the
    protocol's drops (re-encoded from ``facts`` when it dropped sentences or relations);
    ``facts`` are the facts as encoded, in the input's order (``template_disjoint``: with only
    the sentences kept); ``relations`` the relations the run keeps."""

    encoded: EncodedPrompts
    facts: list[Fact]
    indices: dict[str, np.ndarray]
    relations: tuple[str, ...]
    report: SplitReport


#: Encodes facts for the given relations the way the run does (tokenizer, max_length, labels).
Encoder = Callable[[Sequence[Fact], tuple[str, ...]], EncodedPrompts]
_UNITS = {"by_fact": "fact", "subject_disjoint": "subject", "object_disjoint": "object",
          "template_disjoint": "template"}


def held_out_split(
    protocol: str,
    facts: Sequence[Fact],
    encoded: EncodedPrompts,
    encode: Encoder,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> HeldOutSplit:
    """Splits ``encoded`` (``encode(facts, relations)``) by one of :data:`HELD_OUT_PROTOCOLS`
    (module docstring); only facts with at least one encoded prompt take part, as in
    :func:`split_by_fact`. ``by_fact`` gives :func:`split_by_fact`'s indices. Raises
    :class:`~lamp_jax.errors.UsageError` when no relation can be held out."""
    if protocol not in _UNITS:
        raise UsageError(f"config.data.split = {protocol!r}; choose one of {HELD_OUT_PROTOCOLS} "
                         "or 'reference'")
    fractions = _check_fractions(fractions)
    facts = list(facts)
    input_relations, counts_before = encoded.relations, encoded.counts_per_relation()
    kept, first = np.unique(encoded.fact_index, return_index=True)
    names = [encoded.relations[r] for r in encoded.relation[first]]
    dropped_facts: dict[str, dict[str, int]] = {}
    dropped_prompts: dict[str, dict[str, int]] = {}
    dropped_relations: dict[str, str] = {}
    units: dict[str, dict[str, int]] = {}
    if protocol == "template_disjoint":
        facts, fact_split, units, dropped_relations = _template_disjoint(
            facts, kept, names, fractions, seed, dropped_facts)
    else:
        if protocol == "subject_disjoint":
            keys = [normalised_subject(facts[f].subject) for f in kept.tolist()]
            placed = np.asarray([bool(k) for k in keys], bool)
            dropped_facts["no subject to compare"] = _count(np.asarray(names)[~placed])
            dropped_prompts["fact without a subject"] = _count(
                encoded.relations[r] for r in encoded.relation[
                    np.isin(encoded.fact_index, kept[~placed])])
        elif protocol == "object_disjoint":
            # An object of any length is its (padded) token sequence.
            keys = [tuple(k) if isinstance(k, list) else k
                    for k in encoded.obj_id[first].tolist()]
            placed = np.ones(len(kept), bool)
        else:
            keys = kept.tolist()
            placed = np.ones(len(kept), bool)
        chosen = [i for i in range(len(kept)) if placed[i]]
        by_split = split_groups([names[i] for i in chosen], [(names[i], keys[i]) for i in chosen],
                                fractions, seed)
        fact_split = {s: kept[np.asarray(chosen, np.int64)[by_split[s]]] for s in SPLITS}
        for relation in dict.fromkeys(names):
            units[relation] = {s: len({keys[chosen[j]] for j in by_split[s]
                                       if names[chosen[j]] == relation}) for s in SPLITS}
    relations = encoded.relations
    empty: dict[str, str] = dict(dropped_relations)
    while True:  # drop relations left without train, dev or test prompts, then re-encode
        if empty:
            dropped_relations.update(empty)
            relations = tuple(r for r in relations if r not in empty)
            if not relations:
                raise UsageError(
                    f"config.data.split = {protocol!r} leaves no relation with train, dev and "
                    f"test prompts: {'; '.join(f'{r}: {w}' for r, w in dropped_relations.items())}"
                    "; use split 'by_fact' for this data")
            encoded = encode(facts, relations)
        indices = {s: np.flatnonzero(np.isin(encoded.fact_index, fact_split[s])).astype(np.int64)
                   for s in SPLITS}
        counts = {s: np.bincount(encoded.relation[indices[s]], minlength=len(relations))
                  for s in SPLITS}
        empty = {r: "no " + " or ".join(s for s in SPLITS if counts[s][i] == 0)
                 + f" prompts under {protocol}"
                 for i, r in enumerate(relations) if min(counts[s][i] for s in SPLITS) == 0}
        if not empty:
            break
    encoded_before = dict(zip(input_relations, counts_before.tolist(), strict=True))
    if protocol == "template_disjoint":  # every prompt a kept relation lost, lost to its side
        dropped_prompts["in the other side's templates"] = {
            r: encoded_before[r] - sum(int(counts[s][i]) for s in SPLITS)
            for i, r in enumerate(relations)}
    for table in (*dropped_facts.values(), *dropped_prompts.values()):
        for relation in dropped_relations:  # counted once, below, with the relation
            table.pop(relation, None)
    dropped_prompts["relation not run"] = {r: encoded_before[r] for r in dropped_relations}
    report = SplitReport(
        protocol, _UNITS[protocol],
        units={r: units[r] for r in relations},
        facts={r: {s: len(np.unique(encoded.fact_index[indices[s]][
            encoded.relation[indices[s]] == i])) for s in SPLITS} for i, r in enumerate(relations)},
        prompts={r: {s: int(counts[s][i]) for s in SPLITS} for i, r in enumerate(relations)},
        dropped_facts=dropped_facts, dropped_prompts=dropped_prompts,
        dropped_relations=dropped_relations)
    return HeldOutSplit(encoded, facts, indices, relations, report)


def _count(relation_names) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in relation_names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _template_disjoint(facts, kept, names, fractions, seed, dropped_facts):
    """The fact split of ``by_fact``, each relation's templates split into training and
    held-out ones, and the facts with only the sentences of their side's templates."""
    by_split = split_fact_ids(names, fractions, seed)
    split_of = {int(kept[j]): s for s in SPLITS for j in by_split[s]}
    templates: dict[str, set[str]] = {}
    for f, relation in zip(kept.tolist(), names, strict=True):
        templates.setdefault(relation, set()).update(
            sentence_template(s, facts[f].subject) for s in facts[f].sentences)
    train_templates, units, dropped_relations = {}, {}, {}
    sides = (fractions[0], fractions[1] + fractions[2])
    for relation, found in templates.items():
        listed = sorted(found)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF,
                                     zlib.crc32(relation.encode("utf-8")), 1])
        order = rng.permutation(len(listed))
        n_train, n_held = _allocate(len(listed), sides)
        train_templates[relation] = {listed[i] for i in order[:n_train]}
        units[relation] = {"train": n_train, "dev+test": n_held}
        if n_held == 0:
            dropped_relations[relation] = "one template: no template to hold out"
    no_sentence_left: dict[str, int] = {}
    filtered = list(facts)
    for f, relation in zip(kept.tolist(), names, strict=True):
        if relation in dropped_relations:
            continue
        in_train = split_of[f] == "train"
        sentences = tuple(s for s in facts[f].sentences
                          if (sentence_template(s, facts[f].subject) in train_templates[relation])
                          == in_train)
        if not sentences:
            no_sentence_left[relation] = no_sentence_left.get(relation, 0) + 1
        filtered[f] = dataclasses.replace(facts[f], sentences=sentences)
    dropped_facts["every sentence in the other side's templates"] = no_sentence_left
    fact_split = {s: kept[by_split[s]] for s in SPLITS}
    return filtered, fact_split, units, dropped_relations
