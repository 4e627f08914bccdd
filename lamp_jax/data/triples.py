"""ConceptNet CKBC triples (Li et al. 2016) -> cloze facts for knowledge-base completion.

LAMP evaluates knowledge-base completion by filling a per-relation template with the head and
ranking the tail at the mask. This module reads the CKBC files (``rel\\thead\\ttail`` and, in
dev1/dev2, a fourth 0/1 label column), normalises relation names to LAMA's CamelCase and turns
positive/unlabelled triples into :class:`~lamp_jax.data.lama.Fact` objects that
:func:`~lamp_jax.data.encode.encode_facts` encodes like LAMA prompts. Multi-word tails are not
single tokens and are dropped (with a count) at encoding, exactly as LAMA drops them.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from lamp_jax.data.lama import LAMA_CONCEPTNET_RELATIONS, MASK, Fact
from lamp_jax.errors import UsageError

#: Every relation name that occurs in the CKBC release (its rel.txt lists them in lower case).
CKBC_RELATIONS: tuple[str, ...] = (
    *LAMA_CONCEPTNET_RELATIONS,
    "CreatedBy",
    "DefinedAs",
    "DesireOf",
    "HasFirstSubevent",
    "HasLastSubevent",
    "HasPainCharacter",
    "HasPainIntensity",
    "InheritsFrom",
    "InstanceOf",
    "LocatedNear",
    "LocationOfAction",
    "NotCapableOf",
    "NotHasA",
    "NotHasProperty",
    "NotIsA",
    "NotMadeOf",
    "RelatedTo",
    "SymbolOf",
)

#: Lower-case CKBC relation name -> CamelCase (LAMA spelling for the 16 LAMA relations).
CKBC_TO_LAMA: dict[str, str] = {name.lower(): name for name in CKBC_RELATIONS}

#: One cloze template per LAMA relation: ``{head}`` is the CKBC head, ``[MASK]`` the tail slot.
TEMPLATES: dict[str, str] = {
    "AtLocation": "You are likely to find {head} in [MASK].",
    "CapableOf": "{head} can [MASK].",
    "Causes": "Sometimes {head} causes [MASK].",
    "CausesDesire": "{head} would make you want to [MASK].",
    "Desires": "{head} wants [MASK].",
    "HasA": "{head} has [MASK].",
    "HasPrerequisite": "Something you need to do before you {head} is [MASK].",
    "HasProperty": "{head} is [MASK].",
    "HasSubevent": "One of the things you do when you {head} is [MASK].",
    "IsA": "{head} is a [MASK].",
    "MadeOf": "{head} is made of [MASK].",
    "MotivatedByGoal": "You would {head} because you want [MASK].",
    "NotDesires": "{head} does not want [MASK].",
    "PartOf": "{head} is part of [MASK].",
    "ReceivesAction": "{head} can be [MASK].",
    "UsedFor": "{head} is used for [MASK].",
}


def canonical_relation(name: str) -> str:
    """CamelCase spelling of a CKBC/LAMA relation in any casing; unknown names are kept as-is."""
    return CKBC_TO_LAMA.get(name.strip().lower(), name.strip())


def read_ckbc_relations(path: str | os.PathLike[str]) -> list[str]:
    """Relation names of a CKBC ``rel.txt`` (lower case there), mapped to CamelCase."""
    lines = Path(path).read_text(encoding="utf-8").split()
    return [canonical_relation(name) for name in lines]


@dataclasses.dataclass(frozen=True)
class Triple:
    """A CKBC triple; ``label`` is 1/0 in dev1/dev2 (true/corrupted), None in 3-column files."""

    relation: str
    head: str
    tail: str
    label: int | None = None


def read_ckbc(path: str | os.PathLike[str]) -> list[Triple]:
    """Read a CKBC file of 3 (``rel head tail``) or 4 (``... label``) tab-separated columns.

    Relation names are normalised with :func:`canonical_relation`. Blank lines are ignored; a line
    with another column count, an empty field, or a label other than 0/1 raises
    ``UsageError("file:line: ...")``. The column count must be the same on every line.
    """
    path = Path(path)
    triples: list[Triple] = []
    width = None
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            cols = line.split("\t")
            if len(cols) not in (3, 4):
                raise UsageError(f"{where}: expected 3 or 4 tab-separated columns, got {len(cols)}")
            if width is None:
                width = len(cols)
            elif len(cols) != width:
                raise UsageError(f"{where}: {len(cols)} columns, but earlier lines have {width}")
            rel, head, tail = (c.strip() for c in cols[:3])
            if not rel or not head or not tail:
                raise UsageError(f"{where}: empty relation, head or tail")
            label = None
            if width == 4:
                raw = cols[3].strip()
                try:
                    value = float(raw)
                except ValueError:
                    value = None
                if value not in (0.0, 1.0):
                    raise UsageError(f"{where}: label must be 0 or 1, got {raw!r}")
                label = int(value)
            triples.append(Triple(canonical_relation(rel), head, tail, label))
    return triples


@dataclasses.dataclass
class TriplesReport:
    """Counts of :func:`triples_to_facts`."""

    triples: int = 0
    facts: int = 0
    negative_label: int = 0
    skipped_relations: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable line."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_relations.items()))
        return (
            f"{self.triples} triples -> {self.facts} facts; negative labels skipped "
            f"{self.negative_label}; relations without template/not requested: {skipped or 'none'}"
        )


def fill_template(relation: str, head: str, templates: Mapping[str, str] = TEMPLATES) -> str:
    """The cloze sentence of ``relation`` for ``head`` (first letter capitalised)."""
    text = templates[relation].format(head=head)
    return text[:1].upper() + text[1:] if not text.startswith(MASK) else text


def triples_to_facts(
    triples: Iterable[Triple],
    relations: Sequence[str] = LAMA_CONCEPTNET_RELATIONS,
    templates: Mapping[str, str] = TEMPLATES,
) -> tuple[list[Fact], TriplesReport]:
    """Facts ``(head, relation, tail)`` with the relation's template as the single sentence.

    ``templates`` maps a relation to a cloze with ``{head}`` and ``[MASK]`` (default
    :data:`TEMPLATES`; pass your own to change the wording).

    Triples with label 0 (corrupted negatives of dev1/dev2) are skipped and counted, as are triples
    of relations outside ``relations`` or without a template. The uuid is ``"ckbc-<i>"`` with i the
    triple's position, so facts can be traced back.
    """
    wanted = set(relations)
    report = TriplesReport()
    skipped: collections.Counter[str] = collections.Counter()
    facts: list[Fact] = []
    for i, triple in enumerate(triples):
        report.triples += 1
        if triple.label == 0:
            report.negative_label += 1
            continue
        if triple.relation not in wanted or triple.relation not in templates:
            skipped[triple.relation] += 1
            continue
        sentence = fill_template(triple.relation, triple.head, templates)
        facts.append(Fact(triple.relation, triple.head, triple.tail, (sentence,), f"ckbc-{i}"))
    report.facts = len(facts)
    report.skipped_relations = dict(skipped)
    return facts, report
