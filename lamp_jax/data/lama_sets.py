"""LAMA's factual probes, T-REx and Google-RE, beside ConceptNet, read from LAMA's data folder.

LAMA (Petroni et al. 2019) ships one archive, https://dl.fbaipublicfiles.com/LAMA/data.zip, whose
``data/`` folder holds ``ConceptNet/test.jsonl``, ``TREx/P*.jsonl`` (one file per Wikidata
relation, 41 of them), ``Google_RE/{place_of_birth,date_of_birth,place_of_death}_test.jsonl``
and ``relations.jsonl`` (T-REx's template, label, description and type per relation).
:func:`read_lama_set` reads one set into the same :class:`~lamp_jax.data.lama.Fact` objects as
ConceptNet, so encoding, splitting by fact and training are the same for every set.

Prompts. LAMA probes T-REx and Google-RE with one template per relation, ``[X]`` replaced by the
subject and ``[Y]`` by the mask (``"[X] was born in [Y] ."``): one prompt per fact,
``prompts="templates"``. ``prompts="evidences"`` takes LAMA's evidence sentences instead
(T-REx: every evidence's ``masked_sentence``; Google-RE: ``masked_sentences``), several per
fact. ConceptNet has no templates: its prompts are always its own sentences.

Dropped and counted (the :class:`~lamp_jax.data.lama.ReadReport` of ConceptNet, plus): Google-RE
facts whose raters said "no" more often than "yes" (LAMA's ``filter_samples`` skips them the same
way); in templates mode, the records of a relation without a template in ``relations.jsonl``.
Malformed lines, of ``relations.jsonl`` too, name ``file:line`` (``strict``) or are counted.

Labels. T-REx relations are Wikidata ids ("P19"), which say little in a table. The reader returns
a relation -> label map ("P19" -> "place of birth", from ``relations.jsonl``); a run records it in
``run.json`` and ``metrics.json`` (:func:`labels_entry`) and tables and plots name relations
"P19 (place of birth)" (:func:`relation_display`). The id stays the relation's name everywhere
else (masks, metrics keys, ``config.data.relations``), so a relabelled ``relations.jsonl`` changes
no split and no checkpoint. ConceptNet has no labels and its outputs stay as they were.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lamp_jax.data import lama
from lamp_jax.data.lama import (
    LAMA_CONCEPTNET_RELATIONS,
    MASK,
    Fact,
    FactTable,
    Parser,
    ReadReport,
    json_object,
    masked_sentences,
    optional_fields,
    parsed_lines,
    read_lama_jsonl,
    required_text,
)

LAMA_SETS = ("conceptnet", "trex", "google_re")
PROMPTS = ("templates", "evidences")
SUBJECT_SLOT, OBJECT_SLOT = "[X]", "[Y]"

#: LAMA's Google-RE templates, from its ``scripts/run_experiments.py``, in its order.
GOOGLE_RE_TEMPLATES: dict[str, str] = {
    "place_of_birth": "[X] was born in [Y] .",
    "date_of_birth": "[X] (born [Y]).",
    "place_of_death": "[X] died in [Y] .",
}
GOOGLE_RE_LABELS: dict[str, str] = {r: r.replace("_", " ") for r in GOOGLE_RE_TEMPLATES}

CONCEPTNET_FILE = Path("ConceptNet", "test.jsonl")
TREX_DIR, GOOGLE_RE_DIR, RELATIONS_FILE = "TREx", "Google_RE", "relations.jsonl"
#: The archive's unzipped ``data/`` folder, inside ``config.data.cache_dir``.
CACHED_DATA_DIR = "lama_data"


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
    """

    facts: list[Fact]
    report: ReadReport
    relations: tuple[str, ...]
    labels: dict[str, str]


def fill_template(template: str, subject: str) -> str:
    """LAMA's template with ``[X]`` the subject and ``[Y]`` the mask. The mask goes in first,
    so a subject that happens to contain ``[Y]`` stays literal."""
    return template.replace(OBJECT_SLOT, MASK).replace(SUBJECT_SLOT, subject)


def _check_template(template: str, where: str) -> None:
    if template.count(OBJECT_SLOT) != 1 or SUBJECT_SLOT not in template:
        raise ValueError(f"{where}: template {template!r} needs one {OBJECT_SLOT} (the object) "
                         f"and {SUBJECT_SLOT} (the subject)")


def read_relations_jsonl(path: str | os.PathLike[str], report: ReadReport, *,
                         strict: bool = True) -> dict[str, RelationInfo]:
    """LAMA's ``relations.jsonl``: relation -> :class:`RelationInfo`, in file order.

    A line without ``relation`` or ``template``, with a template lacking ``[X]`` or one ``[Y]``,
    or repeating an earlier relation is malformed: ``ValueError("file:line: ...")`` when
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
            raise ValueError(f"{where}: relation {relation} again (first at "
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
                                 + lines.malformed_examples)[: lama.MAX_EXAMPLES]
    return infos


def _evidence_sentences(record: Mapping[str, Any], where: str) -> list[str]:
    evidences = record.get("evidences")
    if evidences is None:
        raise ValueError(f"{where}: missing required key 'evidences'")
    if not isinstance(evidences, list) or not all(
            isinstance(e, dict) and isinstance(e.get("masked_sentence"), str) for e in evidences):
        raise ValueError(f"{where}: 'evidences' must be a list of objects with a "
                         "'masked_sentence' string")
    if not evidences:
        raise ValueError(f"{where}: no evidence sentence")
    return [e["masked_sentence"] for e in evidences]


def _negative(record: Mapping[str, Any], where: str) -> bool:
    """Whether Google-RE's raters said "no" more often than "yes" (LAMA: anything but "yes"
    is a no)."""
    judgments = record.get("judgments")
    if judgments is None:
        return False
    if not isinstance(judgments, list) or not all(
            isinstance(j, dict) and isinstance(j.get("judgment"), str) for j in judgments):
        raise ValueError(f"{where}: 'judgments' must be a list of objects with a 'judgment' "
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
            raise ValueError(f"{where}: a fact of {stated!r} in the file of {relation!r}")
        obj = required_text(record, ("obj_label",), where)
        subject, uuid, notes = optional_fields(record)
        if prompts == "templates":
            if not subject:
                raise ValueError(f"{where}: missing or empty required key 'sub_label' (the "
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
    raise FileNotFoundError(
        f"{source} is not a LAMA data folder: it has no {entry}, nor has {source / 'data'}. "
        f"Unzip {lama.LAMA_DATA_URL} and give its data/ folder, or set "
        "config.data.source='lama' to download it.")


def _present(facts: Sequence[Fact], order: Iterable[str]) -> tuple[str, ...]:
    have = {f.relation for f in facts}
    return tuple(r for r in order if r in have)


def conceptnet_order(facts: Sequence[Fact]) -> tuple[str, ...]:
    """LAMA's 16 ConceptNet relations in their order, then any others by name."""
    known = {r: i for i, r in enumerate(LAMA_CONCEPTNET_RELATIONS)}
    return tuple(sorted({f.relation for f in facts},
                        key=lambda r: (known.get(r, len(known)), r)))


def _wikidata_order(relation: str) -> tuple[int, str]:
    digits = relation[1:]
    return (int(digits) if digits.isdigit() else 1 << 30, relation)


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
    return LamaData(facts, report, _present(facts, order), labels)


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
    return LamaData(facts, report, _present(facts, GOOGLE_RE_TEMPLATES), dict(GOOGLE_RE_LABELS))


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
        ``conceptnet`` also a jsonl file in LAMA's ConceptNet format (read as it always was).
      lama_set: ``"conceptnet"``, ``"trex"`` or ``"google_re"``.
      prompts: ``"templates"`` (LAMA's relation templates, one prompt per fact) or
        ``"evidences"`` (LAMA's evidence sentences); ConceptNet always uses its sentences.
      relations: keep only these relations (the others are counted per relation in
        ``report.skipped_relations``); ``None`` keeps every relation.
      strict: a malformed line raises ``ValueError("file:line: ...")``; False counts it.

    Raises:
      FileNotFoundError: ``source`` is not a LAMA data folder for ``lama_set``.
      ValueError: an unknown set or prompt kind, a file where a folder is needed, or
        (``strict``) a malformed line.
    """
    if lama_set not in LAMA_SETS:
        raise ValueError(f"unknown LAMA set {lama_set!r}; choose one of {LAMA_SETS}")
    if prompts not in PROMPTS:
        raise ValueError(f"unknown prompt kind {prompts!r}; choose one of {PROMPTS}")
    source = Path(source).expanduser()
    wanted = None if relations is None else frozenset(relations)
    if lama_set == "conceptnet":
        # A folder is LAMA's; anything else is a ConceptNet-format jsonl, read as it always was.
        path = data_root(source, CONCEPTNET_FILE) / CONCEPTNET_FILE if source.is_dir() else source
        facts, report = read_lama_jsonl(path, wanted, strict=strict)
        return LamaData(facts, report, conceptnet_order(facts), {})
    if source.is_file():
        raise ValueError(f"the LAMA set {lama_set!r} is read from LAMA's data folder "
                         f"(relations.jsonl, TREx/, Google_RE/); {source} is a file")
    read = _read_trex if lama_set == "trex" else _read_google_re
    return read(source, prompts, wanted, strict)


def read_for_config(data: Mapping[str, Any], path: str | os.PathLike[str]) -> LamaData:
    """:func:`read_lama_set` as ``config.data`` asks (``lama_set``, ``prompts``, ``relations``,
    ``on_error``); configs older than these fields read ConceptNet, as they did."""
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


def download_lama_data(
    cache_dir: str | os.PathLike[str],
    *,
    url: str | None = None,
    keep_zip: bool = False,
    timeout_s: float = 60.0,
) -> Path:
    """LAMA's ``data/`` folder, downloaded and unzipped once into ``cache_dir/lama_data``.

    The archive (``lama.LAMA_DATA_URL`` unless ``url``; read at call time so tests can point it
    at a ``file://`` zip) is unzipped into a staging folder that is renamed when complete, so
    an interrupted run never leaves a half folder that a later run would take for the data.

    Raises:
      ConnectionError: the download failed; the message says where to put a manual copy.
      ValueError: the archive is not a zip or has neither ``data/TREx/`` nor
        ``data/Google_RE/``.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / CACHED_DATA_DIR
    if target.is_dir():
        return target
    url = lama.LAMA_DATA_URL if url is None else url
    zip_path = lama.fetch_archive(cache_dir, url, timeout_s, f"its data/ folder to {target}")
    staging = cache_dir / f"{CACHED_DATA_DIR}.part"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.namelist() if m.startswith("data/")]
            if not any(m.startswith((f"data/{TREX_DIR}/", f"data/{GOOGLE_RE_DIR}/"))
                       for m in members):
                raise ValueError(f"{zip_path} (from {url}) has neither data/{TREX_DIR}/ nor "
                                 f"data/{GOOGLE_RE_DIR}/: not LAMA's data archive")
            archive.extractall(staging, members)  # zipfile drops "..", absolute parts
        (staging / "data").replace(target)
    except zipfile.BadZipFile as err:
        zip_path.unlink(missing_ok=True)
        raise ValueError(f"{zip_path} (from {url}) is not a valid zip archive: {err}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not keep_zip:
        zip_path.unlink(missing_ok=True)
    return target


def fetch_lama(lama_set: str, cache_dir: str | os.PathLike[str]) -> Path:
    """What ``config.data.source="lama"`` reads: ConceptNet's ``test.jsonl`` as before
    (:func:`~lamp_jax.data.lama.download_lama_conceptnet`), else LAMA's data folder."""
    if lama_set == "conceptnet":
        return lama.download_lama_conceptnet(Path(cache_dir).expanduser())
    return download_lama_data(cache_dir)


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
    no relation has a label (ConceptNet: its files stay as they were)."""
    kept = {r: labels[r] for r in relations if labels.get(r)}
    return {"relation_labels": kept} if kept else {}
