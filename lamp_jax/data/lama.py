"""LAMA's records, common to its three sets: facts, the read report, and the line reading.

Why a hand-written reader instead of ``pandas.read_json``: the LAMA files come in slightly different
variants (``obj_label`` vs ``obj``, ``sub_label`` vs ``sub``, extra keys such as
``masked_negations``), and the reference implementation silently drops whatever it cannot use.
Here every line either becomes a :class:`Fact` or is *counted* in a :class:`ReadReport`, and a
malformed line names ``file:line`` (a :class:`~lamp_jax.errors.UsageError`) so a corrupt
download is found at once instead of shrinking the data set without notice. The line reading
(:func:`parsed_lines`) and the fact table that filters and merges records (:class:`FactTable`)
serve the reader of every set (ConceptNet, T-REx, Google-RE: :mod:`lamp_jax.data.lama_sets`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from lamp_jax.errors import UsageError

MASK = "[MASK]"

#: The 16 relations of LAMA's ConceptNet probe, in the order used throughout lamp-jax.
LAMA_CONCEPTNET_RELATIONS: tuple[str, ...] = (
    "AtLocation",
    "CapableOf",
    "Causes",
    "CausesDesire",
    "Desires",
    "HasA",
    "HasPrerequisite",
    "HasProperty",
    "HasSubevent",
    "IsA",
    "MadeOf",
    "MotivatedByGoal",
    "NotDesires",
    "PartOf",
    "ReceivesAction",
    "UsedFor",
)

#: How many malformed lines a report quotes (it counts them all).
MAX_EXAMPLES = 5


@dataclasses.dataclass(frozen=True)
class Fact:
    """One LAMA fact: a (subject, relation, object) triple with its cloze sentences.

    ``sentences`` keep LAMA's literal ``[MASK]`` placeholder; the tokenizer-specific mask token is
    substituted only at encoding time so the same facts serve BERT and RoBERTa alike.
    """

    relation: str
    subject: str
    obj: str
    sentences: tuple[str, ...]
    uuid: str


@dataclasses.dataclass
class ReadReport:
    """What a LAMA reader kept, skipped and why (nothing is dropped silently)."""

    path: str
    lines: int = 0
    blank_lines: int = 0
    facts: int = 0
    sentences: int = 0
    malformed: int = 0
    malformed_examples: list[str] = dataclasses.field(default_factory=list)
    sentences_bad_mask_count: int = 0
    facts_without_usable_sentence: int = 0
    skipped_relations: dict[str, int] = dataclasses.field(default_factory=dict)
    missing_subject: int = 0
    missing_uuid: int = 0
    # Records repeating an earlier record's (subject, relation, object): one fact, whose
    # sentences all land in one split (new sentences are added to the first record's fact).
    duplicate_facts_merged: int = 0
    facts_per_relation: dict[str, int] = dataclasses.field(default_factory=dict)
    # Only T-REx and Google-RE fill these: ConceptNet is one file whose prompts are its own
    # sentences, so its summary leaves them out.
    prompts: str | None = None  # "templates" or "evidences"
    files: int = 0
    # Google-RE facts whose raters said "no" more often than "yes" (LAMA skips them too).
    negative_judgments: int = 0
    # Records of relations without a template in relations.jsonl (templates need one).
    relations_without_template: dict[str, int] = dataclasses.field(default_factory=dict)
    # Relations a set lists (relations.jsonl, Google-RE's three) with no file in the folder.
    relations_without_file: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """One human-readable paragraph, for logs and notebooks."""
        parts = [
            f"{self.path}: {self.lines} lines -> {self.facts} facts, {self.sentences} sentences",
            f"blank lines {self.blank_lines}",
            f"malformed lines skipped {self.malformed}",
            f"sentences without exactly one {MASK} dropped {self.sentences_bad_mask_count}",
            f"facts left without a usable sentence {self.facts_without_usable_sentence}",
            f"missing subject {self.missing_subject}",
            f"missing uuid {self.missing_uuid}",
            f"records of an already-read (subject, relation, object) merged into that fact "
            f"{self.duplicate_facts_merged}",
        ]
        if self.prompts is not None:
            parts.insert(0, f"{self.files} files, prompts from {self.prompts}")
            parts.append(f"facts with more 'no' than 'yes' judgments skipped "
                         f"{self.negative_judgments}")
        text = "; ".join(parts)
        if self.relations_without_template:
            dropped = ", ".join(f"{k}={v}"
                                for k, v in sorted(self.relations_without_template.items()))
            text += f"; records of relations without a template skipped: {dropped}"
        if self.relations_without_file:
            text += "; relations without a file: " + ", ".join(self.relations_without_file)
        if self.skipped_relations:
            skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped_relations.items()))
            text += f"; facts of unrequested relations skipped: {skipped}"
        if self.facts_per_relation:
            kept = ", ".join(f"{k}={v}" for k, v in sorted(self.facts_per_relation.items()))
            text += f"; facts per relation: {kept}"
        if self.malformed_examples:
            text += "; e.g. " + " | ".join(self.malformed_examples)
        return text


def _first_present(record: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if key in record and record[key] is not None:
            return record[key]
    return None


def json_object(text: str, where: str) -> dict[str, Any]:
    """One jsonl line as a dict, or UsageError naming ``where`` (``file:line``)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def required_text(record: Mapping[str, Any], keys: tuple[str, ...], where: str) -> str:
    """The first of ``keys`` present, stripped; UsageError naming ``where`` when it is missing,
    empty or not a string."""
    value = _first_present(record, keys)
    if not isinstance(value, str) or not value.strip():
        alternatives = f" (or {', '.join(repr(k) for k in keys[1:])})" if keys[1:] else ""
        raise UsageError(f"{where}: missing or empty required key {keys[0]!r}{alternatives}")
    return value.strip()


def masked_sentences(record: Mapping[str, Any], where: str) -> list[str]:
    """The record's ``masked_sentences``: a non-empty list of strings, else UsageError."""
    sentences = record.get("masked_sentences")
    if sentences is None:
        raise UsageError(f"{where}: missing required key 'masked_sentences'")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise UsageError(f"{where}: 'masked_sentences' must be a list of strings")
    if not sentences:
        raise UsageError(f"{where}: no masked sentence")
    return sentences


def optional_fields(record: Mapping[str, Any]) -> tuple[str, str, list[str]]:
    """The subject (``sub_label`` or ``sub``) and uuid, ``""`` when absent, and notes of what
    is missing (``missing_subject``, ``missing_uuid``): neither is needed for a cloze
    sentence."""
    subject = _first_present(record, ("sub_label", "sub"))
    notes = []
    if not isinstance(subject, str) or not subject.strip():
        subject, notes = "", ["missing_subject"]
    uuid = record.get("uuid")
    uuid = "" if uuid is None else str(uuid)
    if not uuid:
        notes.append("missing_uuid")
    return subject.strip(), uuid, notes


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


Parser = Callable[[str, str], tuple[dict[str, Any], list[str]]]


def parsed_lines(path: Path, parse: Parser, report: ReadReport, strict: bool
                 ) -> Iterator[tuple[int, dict[str, Any], list[str]]]:
    """``(line number, fields, notes)`` of every well-formed line of ``path``.

    ``parse(text, "file:line")`` turns a line into fields or raises UsageError naming its
    place. Blank lines are counted; a malformed line raises (``strict``) or is counted with
    an example. The file is read as bytes and decoded line by line: a bad byte is then one
    malformed line named by number, not a UnicodeDecodeError for the whole file. A UTF-8 byte
    order mark before the first line (Windows editors) is accepted.
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            report.lines += 1
            where = f"{path}:{lineno}"
            try:
                line = _decode(raw, where)
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    report.blank_lines += 1
                    continue
                fields, notes = parse(line, where)
            except UsageError as err:
                if strict:
                    raise
                report.malformed += 1
                if len(report.malformed_examples) < MAX_EXAMPLES:
                    report.malformed_examples.append(str(err))
                continue
            yield lineno, fields, notes


class FactTable:
    """Facts as records are added: sentences filtered, records of one triple merged, counted.

    A record with the same (subject, relation, object) as an earlier one (LAMA repeats some
    under new uuids) is merged into it, its new sentences added; records without a subject
    are never merged.
    """

    def __init__(self, report: ReadReport) -> None:
        self.report = report
        self.facts: list[Fact] = []
        self._index: dict[tuple[str, str, str], int] = {}  # (subject, relation, object) -> index
        self._per_relation: collections.Counter[str] = collections.Counter()

    def add(self, fields: dict[str, Any], notes: list[str], fallback_uuid: str) -> None:
        """Adds one record (``relation``, ``subject``, ``obj``, ``sentences``, ``uuid``)."""
        report = self.report
        if "missing_subject" in notes:
            report.missing_subject += 1
        if "missing_uuid" in notes:
            report.missing_uuid += 1
            fields = {**fields, "uuid": fallback_uuid}
        good = tuple(s for s in fields["sentences"] if s.count(MASK) == 1)
        report.sentences_bad_mask_count += len(fields["sentences"]) - len(good)
        if not good:
            report.facts_without_usable_sentence += 1
            return
        key = (fields["subject"], fields["relation"], fields["obj"])
        if fields["subject"] and key in self._index:
            first = self.facts[self._index[key]]
            new = tuple(s for s in dict.fromkeys(good) if s not in first.sentences)
            self.facts[self._index[key]] = dataclasses.replace(
                first, sentences=first.sentences + new)
            report.duplicate_facts_merged += 1
            report.sentences += len(new)
            return
        self._index[key] = len(self.facts)
        self.facts.append(Fact(fields["relation"], fields["subject"], fields["obj"], good,
                               fields["uuid"]))
        self._per_relation[fields["relation"]] += 1
        report.sentences += len(good)

    def finish(self) -> list[Fact]:
        """The facts, with the report's fact counts filled in."""
        self.report.facts = len(self.facts)
        self.report.facts_per_relation = dict(self._per_relation)
        return self.facts
