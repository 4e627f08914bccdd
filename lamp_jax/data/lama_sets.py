"""LAMA's three sets, ConceptNet, T-REx and Google-RE, one reader each, behind one entry.

LAMA (Petroni et al. 2019) ships one archive (:mod:`lamp_jax.data.lama_archive` fetches it)
whose ``data/`` folder holds ``ConceptNet/test.jsonl``, ``TREx/P*.jsonl`` (one file per Wikidata
relation, 41 of them), ``Google_RE/{place_of_birth,date_of_birth,place_of_death}_test.jsonl``
and ``relations.jsonl`` (T-REx's template, label, description and type per relation).
:func:`read_lama_set` reads any of them into :class:`~lamp_jax.data.lama.Fact` objects, so
encoding, splitting by fact and training are the same for every set.

Prompts. LAMA probes T-REx and Google-RE with one template per relation, ``[X]`` replaced by the
subject and ``[Y]`` by the mask (``"[X] was born in [Y] ."``): one prompt per fact,
``prompts="templates"``. ``prompts="evidences"`` takes LAMA's evidence sentences instead
(T-REx: every evidence's ``masked_sentence``; Google-RE: ``masked_sentences``), several per
fact. ConceptNet has no templates: its prompts are always its own sentences.

Dropped and counted (:class:`~lamp_jax.data.lama.ReadReport`): besides what every set counts,
Google-RE facts whose raters said "no" more often than "yes" (LAMA's ``filter_samples`` skips
them the same way); in templates mode, the records of a relation without a template in
``relations.jsonl``. Malformed lines, of ``relations.jsonl`` too, name ``file:line``
(``strict``) or are counted.

User errors are :class:`~lamp_jax.errors.UsageError`: a source that does not exist
(:class:`~lamp_jax.errors.MissingFileError`), a requested relation the data does not hold
(named, with the relations it holds), a malformed line (``file:line``).

Labels. T-REx relations are Wikidata ids ("P19"), which say little in a table. The reader returns
a relation -> label map ("P19" -> "place of birth", from ``relations.jsonl``); a run records it in
``run.json`` and ``metrics.json`` (:func:`labels_entry`) and tables and plots name relations
"P19 (place of birth)" (:func:`relation_display`). The id stays the relation's name everywhere
else (masks, metrics keys, ``config.data.relations``), so a relabelled ``relations.jsonl`` changes
no split and no checkpoint. ConceptNet has no labels, so its outputs carry none.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lamp_jax.data.lama import (
    LAMA_CONCEPTNET_RELATIONS,
    MASK,
    MAX_EXAMPLES,
    Fact,
    FactTable,
    Parser,
    ReadReport,
    json_object,
    masked_sentences,
    optional_fields,
    parsed_lines,
    required_text,
)
from lamp_jax.data.lama_archive import (
    CONCEPTNET_FILE,
    GOOGLE_RE_DIR,
    LAMA_DATA_URL,
    RELATIONS_FILE,
    SET_ENTRIES,
    TREX_DIR,
)
from lamp_jax.errors import MissingFileError, UsageError

LAMA_SETS = tuple(SET_ENTRIES)
PROMPTS = ("templates", "evidences")
SUBJECT_SLOT, OBJECT_SLOT = "[X]", "[Y]"

#: LAMA's Google-RE templates, from its ``scripts/run_experiments.py``, in its order.
GOOGLE_RE_TEMPLATES: dict[str, str] = {
    "place_of_birth": "[X] was born in [Y] .",
    "date_of_birth": "[X] (born [Y]).",
    "place_of_death": "[X] died in [Y] .",
}
GOOGLE_RE_LABELS: dict[str, str] = {r: r.replace("_", " ") for r in GOOGLE_RE_TEMPLATES}


@dataclasses.dataclass(frozen=True)
class RelationInfo:
    """One line of LAMA's ``relations.jsonl``."""

    relation: str
    template: str
    label: str = ""
    description: str = ""
    type: str = ""


@dataclasses.dataclass(frozen=True)
class LamaData:
    """What :func:`read_lama_set` read.

    Attributes:
      facts: every kept fact, in file order (relations in ``relations``' order).
      report: what was kept, skipped and why.
      relations: every relation with at least one fact, in the set's order (ConceptNet: LAMA's
        16 first, others by name; T-REx: ``relations.jsonl``'s; Google-RE: LAMA's).
      labels: relation -> human-readable label, for the relations that have one.
      held: every relation the data holds records of, asked for or not, in the set's order:
        what a request for a relation is checked against.
    """

    facts: list[Fact]
    report: ReadReport
    relations: tuple[str, ...]
    labels: dict[str, str]
    held: tuple[str, ...]


def fill_template(template: str, subject: str) -> str:
    """LAMA's template with ``[X]`` the subject and ``[Y]`` the mask. The mask goes in first,
    so a subject that happens to contain ``[Y]`` stays literal."""
    return template.replace(OBJECT_SLOT, MASK).replace(SUBJECT_SLOT, subject)


def _check_template(template: str, where: str) -> None:
    if template.count(OBJECT_SLOT) != 1 or SUBJECT_SLOT not in template:
        raise UsageError(f"{where}: template {template!r} needs one {OBJECT_SLOT} (the object) "
                         f"and {SUBJECT_SLOT} (the subject)")


def read_relations_jsonl(path: str | os.PathLike[str], report: ReadReport, *,
                         strict: bool = True) -> dict[str, RelationInfo]:
    """LAMA's ``relations.jsonl``: relation -> :class:`RelationInfo`, in file order.

    A line without ``relation`` or ``template``, with a template lacking ``[X]`` or one ``[Y]``,
    or repeating an earlier relation is malformed: ``UsageError("file:line: ...")`` when
    ``strict``, else counted in ``report.malformed`` (that relation then has no template).
    Its lines are not added to ``report.lines``, which counts fact records.
    """
    path = Path(path)
    first_seen: dict[str, str] = {}

    def parse(text: str, where: str) -> tuple[dict[str, Any], list[str]]:
        record = json_object(text, where)
        relation = required_text(record, ("relation",), where)
        template = required_text(record, ("template",), where)
        _check_template(template, where)
        if relation in first_seen:
            raise UsageError(f"{where}: relation {relation} again (first at "
                             f"{first_seen[relation]})")
        first_seen[relation] = where
        text_of = {k: record.get(k) for k in ("label", "description", "type")}
        return {"relation": relation, "template": template,
                **{k: v.strip() if isinstance(v, str) else "" for k, v in text_of.items()}}, []

    lines = ReadReport(path=str(path))
    infos = {fields["relation"]: RelationInfo(**fields)
             for _, fields, _ in parsed_lines(path, parse, lines, strict)}
    report.malformed += lines.malformed
    report.malformed_examples = (report.malformed_examples
                                 + lines.malformed_examples)[:MAX_EXAMPLES]
    return infos


def _evidence_sentences(record: Mapping[str, Any], where: str) -> list[str]:
    evidences = record.get("evidences")
    if evidences is None:
        raise UsageError(f"{where}: missing required key 'evidences'")
    if not isinstance(evidences, list) or not all(
            isinstance(e, dict) and isinstance(e.get("masked_sentence"), str) for e in evidences):
        raise UsageError(f"{where}: 'evidences' must be a list of objects with a "
                         "'masked_sentence' string")
    if not evidences:
        raise UsageError(f"{where}: no evidence sentence")
    return [e["masked_sentence"] for e in evidences]


def _negative(record: Mapping[str, Any], where: str) -> bool:
    """Whether Google-RE's raters said "no" more often than "yes" (LAMA: anything but "yes"
    is a no)."""
    judgments = record.get("judgments")
    if judgments is None:
        return False
    if not isinstance(judgments, list) or not all(
            isinstance(j, dict) and isinstance(j.get("judgment"), str) for j in judgments):
        raise UsageError(f"{where}: 'judgments' must be a list of objects with a 'judgment' "
                         "string")
    yes = sum(j["judgment"] == "yes" for j in judgments)
    return len(judgments) - yes > yes


def _fact_parser(lama_set: str, relation: str, template: str | None, prompts: str) -> Parser:
    """``parse(text, where)`` for one T-REx or Google-RE file, whose facts are ``relation``'s."""
    def parse(text: str, where: str) -> tuple[dict[str, Any], list[str]]:
        record = json_object(text, where)
        # The file names the relation; a record that says otherwise is a corrupt file.
        if lama_set == "trex":
            stated = record.get("predicate_id")
        else:  # Google-RE: "/people/person/place_of_birth"
            stated = record.get("pred")
            stated = stated.rsplit("/", 1)[-1] if isinstance(stated, str) else None
        if stated is not None and stated != relation:
            raise UsageError(f"{where}: a fact of {stated!r} in the file of {relation!r}")
        obj = required_text(record, ("obj_label",), where)
        subject, uuid, notes = optional_fields(record)
        if prompts == "templates":
            if not subject:
                raise UsageError(f"{where}: missing or empty required key 'sub_label' (the "
                                 "template's subject)")
            sentences = [fill_template(template, subject)]
        elif lama_set == "trex":
            sentences = _evidence_sentences(record, where)
        else:
            sentences = masked_sentences(record, where)
        if lama_set == "google_re" and _negative(record, where):
            notes = [*notes, "negative_judgments"]
        return {"relation": relation, "subject": subject, "obj": obj, "sentences": sentences,
                "uuid": uuid}, notes

    return parse


def _count_records(path: Path) -> int:
    """Non-blank lines: the records of a file that is skipped whole, counted without parsing."""
    with path.open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _read_file(path: Path, parse: Parser, table: FactTable, strict: bool) -> None:
    table.report.files += 1
    for lineno, fields, notes in parsed_lines(path, parse, table.report, strict):
        if "negative_judgments" in notes:
            table.report.negative_judgments += 1
            continue
        table.add(fields, notes, f"{path.name}:{lineno}")


def data_root(source: str | os.PathLike[str], entry: str | os.PathLike[str]) -> Path:
    """The LAMA data folder in ``source`` holding ``entry``: ``source`` itself or, as the
    archive unzips, ``source/data``."""
    source = Path(source).expanduser()
    for root in (source, source / "data"):
        if (root / entry).exists():
            return root
    raise MissingFileError(
        f"{source} is not a LAMA data folder: it has no {entry}, nor has {source / 'data'}. "
        f"Unzip {LAMA_DATA_URL} and give its data/ folder, or set "
        "config.data.source='lama' to download it.")


def _present(facts: Sequence[Fact], order: Iterable[str]) -> tuple[str, ...]:
    have = {f.relation for f in facts}
    return tuple(r for r in order if r in have)


def conceptnet_order(relations: Iterable[str]) -> tuple[str, ...]:
    """LAMA's 16 ConceptNet relations in their order, then any others by name."""
    known = {r: i for i, r in enumerate(LAMA_CONCEPTNET_RELATIONS)}
    return tuple(sorted(set(relations), key=lambda r: (known.get(r, len(known)), r)))


def _wikidata_order(relation: str) -> tuple[int, str]:
    digits = relation[1:]
    return (int(digits) if digits.isdigit() else 1 << 30, relation)


def _parse_conceptnet(text: str, where: str) -> tuple[dict[str, Any], list[str]]:
    """One line of LAMA's ConceptNet format; the object is ``obj_label`` or ``obj``."""
    record = json_object(text, where)
    relation = required_text(record, ("pred",), where)
    obj = required_text(record, ("obj_label", "obj"), where)
    sentences = masked_sentences(record, where)
    subject, uuid, notes = optional_fields(record)
    return {"relation": relation, "obj": obj, "sentences": sentences, "subject": subject,
            "uuid": uuid}, notes


def _read_conceptnet(source: Path, wanted: frozenset[str] | None, strict: bool) -> LamaData:
    """ConceptNet: one jsonl file, ``source`` itself or ``ConceptNet/test.jsonl`` of a folder.

    Its prompts are its own ``masked_sentences``. A missing subject or uuid is tolerated (a
    cloze sentence needs neither): the subject becomes ``""``, the uuid ``"<file>:<line>"``,
    both counted.
    """
    path = data_root(source, CONCEPTNET_FILE) / CONCEPTNET_FILE if source.is_dir() else source
    report = ReadReport(path=str(path))
    table = FactTable(report)
    held: set[str] = set()
    for lineno, fields, notes in parsed_lines(path, _parse_conceptnet, report, strict):
        relation = fields["relation"]
        held.add(relation)
        if wanted is not None and relation not in wanted:
            report.skipped_relations[relation] = report.skipped_relations.get(relation, 0) + 1
            continue
        table.add(fields, notes, f"{path.name}:{lineno}")
    facts = table.finish()
    return LamaData(facts, report, conceptnet_order(f.relation for f in facts), {},
                    conceptnet_order(held))


def _read_trex(source: Path, prompts: str, wanted: frozenset[str] | None,
               strict: bool) -> LamaData:
    root = data_root(source, TREX_DIR)
    report = ReadReport(path=str(root), prompts=prompts)
    infos = read_relations_jsonl(data_root(source, RELATIONS_FILE) / RELATIONS_FILE, report,
                                 strict=strict)
    files = {p.stem: p for p in (root / TREX_DIR).glob("P*.jsonl")}
    order = [r for r in infos if r in files] + sorted(set(files) - set(infos),
                                                      key=_wikidata_order)
    report.relations_without_file = [r for r in infos if r not in files]
    table = FactTable(report)
    for relation in order:
        if wanted is not None and relation not in wanted:
            report.skipped_relations[relation] = _count_records(files[relation])
            continue
        template = infos[relation].template if relation in infos else None
        if prompts == "templates" and template is None:
            report.relations_without_template[relation] = _count_records(files[relation])
            continue
        _read_file(files[relation], _fact_parser("trex", relation, template, prompts), table,
                   strict)
    facts = table.finish()
    labels = {r: infos[r].label for r in order if r in infos and infos[r].label}
    return LamaData(facts, report, _present(facts, order), labels, tuple(order))


def _read_google_re(source: Path, prompts: str, wanted: frozenset[str] | None,
                    strict: bool) -> LamaData:
    folder = data_root(source, GOOGLE_RE_DIR) / GOOGLE_RE_DIR
    report = ReadReport(path=str(folder), prompts=prompts)
    table = FactTable(report)
    for relation, template in GOOGLE_RE_TEMPLATES.items():
        path = folder / f"{relation}_test.jsonl"
        if not path.is_file():
            report.relations_without_file.append(relation)
        elif wanted is not None and relation not in wanted:
            report.skipped_relations[relation] = _count_records(path)
        else:
            _read_file(path, _fact_parser("google_re", relation, template, prompts), table,
                       strict)
    facts = table.finish()
    held = tuple(r for r in GOOGLE_RE_TEMPLATES if r not in report.relations_without_file)
    return LamaData(facts, report, _present(facts, GOOGLE_RE_TEMPLATES), dict(GOOGLE_RE_LABELS),
                    held)


def read_lama_set(
    source: str | os.PathLike[str],
    lama_set: str = "conceptnet",
    *,
    prompts: str = "templates",
    relations: Iterable[str] | None = None,
    strict: bool = True,
) -> LamaData:
    """Facts of one LAMA set, the report of what was dropped, the relations and their labels.

    Args:
      source: LAMA's unzipped ``data/`` folder (or the folder it was unzipped into); for
        ``conceptnet`` also a jsonl file in LAMA's ConceptNet format.
      lama_set: ``"conceptnet"``, ``"trex"`` or ``"google_re"``.
      prompts: ``"templates"`` (LAMA's relation templates, one prompt per fact) or
        ``"evidences"`` (LAMA's evidence sentences); ConceptNet always uses its sentences.
      relations: keep only these relations (``config.data.relations``; the others are counted
        per relation in ``report.skipped_relations``); ``None`` keeps every relation.
      strict: a malformed line raises ``UsageError("file:line: ...")``; False counts it.

    Facts are triples: a record with the same (subject, relation, object) as an earlier one
    (LAMA repeats some under new uuids) is merged into it, its new sentences added, and counted
    (``duplicate_facts_merged``). Sentences without exactly one ``[MASK]`` are dropped and
    counted, and so is a fact left without a sentence. A UTF-8 byte order mark before the first
    line is accepted.

    Raises:
      MissingFileError: ``source`` does not exist, or is not a LAMA data folder for
        ``lama_set``.
      UsageError: an unknown set or prompt kind, a file where a folder is needed, a requested
        relation the data does not hold (named, with the relations it holds), or (``strict``)
        a malformed line.
    """
    if lama_set not in LAMA_SETS:
        raise UsageError(f"unknown LAMA set {lama_set!r}; choose one of {LAMA_SETS}")
    if prompts not in PROMPTS:
        raise UsageError(f"unknown prompt kind {prompts!r}; choose one of {PROMPTS}")
    source = Path(source).expanduser()
    if not source.exists():
        kinds = "LAMA's data/ folder" + (
            ", a jsonl file in LAMA's ConceptNet format" if lama_set == "conceptnet" else "")
        raise MissingFileError(f"{source}: no such file or folder (config.data.source takes "
                               f"{kinds}, 'lama' to download LAMA's data, or 'embedded')")
    requested = None if relations is None else tuple(dict.fromkeys(relations))
    wanted = None if requested is None else frozenset(requested)
    if lama_set == "conceptnet":
        read = _read_conceptnet(source, wanted, strict)
    elif source.is_file():
        raise UsageError(f"the LAMA set {lama_set!r} is read from LAMA's data folder "
                         f"(relations.jsonl, TREx/, Google_RE/); {source} is a file")
    else:
        read = (_read_trex if lama_set == "trex" else _read_google_re)(source, prompts, wanted,
                                                                      strict)
    unknown = [r for r in requested or () if r not in read.held]
    if unknown:
        raise UsageError(
            f"config.data.relations lists {unknown}, which have no usable prompts in "
            f"{read.report.path}: the data holds no such relation (the {len(read.held)} it "
            f"holds: {', '.join(read.held) or 'none'})")
    return read


def read_for_config(data: Mapping[str, Any], path: str | os.PathLike[str]) -> LamaData:
    """:func:`read_lama_set` as ``config.data`` asks (``lama_set``, ``prompts``, ``relations``,
    ``on_error``). A config without these fields (a ``run.json`` written before they existed)
    means ConceptNet, read strictly with every relation: the defaults here."""
    return read_lama_set(path, data.get("lama_set", "conceptnet"),
                         prompts=data.get("prompts", "templates"),
                         relations=requested_relations(data.get("relations", ())) or None,
                         strict=data.get("on_error", "stop") == "stop")


def requested_relations(relations: Any) -> tuple[str, ...]:
    """``config.data.relations`` as a tuple of names. On the command line,
    ``--config.data.relations=AtLocation,IsA`` reaches the config as the 1-tuple
    ``("AtLocation,IsA",)`` (ml_collections parses no commas), so names are split on commas."""
    if isinstance(relations, str):
        relations = (relations,)
    return tuple(name.strip() for item in relations for name in item.split(",") if name.strip())


def relation_display(relations: Sequence[str], labels: Mapping[str, str]) -> tuple[str, ...]:
    """Names for tables and plots: "P19 (place of birth)"; the bare name where there is no
    label or the label only spells the name out ("place_of_birth")."""
    def shown(relation: str) -> str:
        label = labels.get(relation, "")
        if not label or label == relation.replace("_", " "):
            return relation
        return f"{relation} ({label})"

    return tuple(shown(r) for r in relations)


def labels_entry(relations: Sequence[str], labels: Mapping[str, str]) -> dict[str, Any]:
    """``{"relation_labels": {relation: label}}`` for run.json / metrics.json, or ``{}`` when
    no relation has a label (ConceptNet: its files carry no empty entry)."""
    kept = {r: labels[r] for r in relations if labels.get(r)}
    return {"relation_labels": kept} if kept else {}
