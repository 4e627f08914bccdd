"""LAMA's T-REx and Google-RE beside ConceptNet: reading, templates, evidences, labels, drops,
malformed lines, the one download of every set, the user errors, the config checks, and a run
whose outputs name relations by id and label.

The fixtures are written here in LAMA's own formats (data/relations.jsonl, data/TREx/P*.jsonl,
data/Google_RE/*_test.jsonl, and a zip of the folder), so nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import jax
import ml_collections
import pytest

from lamp_jax import plots
from lamp_jax.config_checks import validate_config
from lamp_jax.configs import default
from lamp_jax.data.encode import encode_facts
from lamp_jax.data.lama_archive import CACHED_DATA_DIR, LAMA_DATA_URL, fetch_lama
from lamp_jax.data.lama_sets import (
    LAMA_SETS,
    labels_entry,
    read_for_config,
    read_lama_set,
    relation_display,
)
from lamp_jax.data.prepare import prepare_data, resolve_sources
from lamp_jax.errors import MissingFileError, UsageError
from lamp_jax.models import ModelConfig, init_params, load_mlm, save_mlm
from tests.tokenizer_fixtures import make_bert_tokenizer, words_of

CONCEPTNET = Path(__file__).parent / "fixtures" / "lama_conceptnet_sample.jsonl"

# Lines of LAMA's relations.jsonl (its templates and labels), in its order (by string); P1001
# has no TREx file here, and TREx/P31.jsonl has no line here.
RELATIONS = [
    ("P1001", "[X] is a legal term in [Y] .", "applies to jurisdiction", "N-M"),
    ("P106", "[X] is a [Y] by profession .", "occupation", "N-M"),
    ("P19", "[X] was born in [Y] .", "place of birth", "N-1"),
    ("P20", "[X] died in [Y] .", "place of death", "N-1"),
    ("P36", "The capital of [X] is [Y] .", "capital", "1-1"),
    ("P37", "The official language of [X] is [Y] .", "official language", "N-1"),
]
LABELS = {"P106": "occupation", "P19": "place of birth", "P20": "place of death",
          "P36": "capital", "P37": "official language"}
FACTS = {
    "P106": [("Dante", "poet"), ("Mozart", "composer"), ("Picasso", "painter"),
             ("Kafka", "novelist"), ("Einstein", "physicist"), ("Sinatra", "singer")],
    "P19": [("Dante", "Florence"), ("Mozart", "Salzburg"), ("Picasso", "Malaga"),
            ("Chopin", "Warsaw"), ("Einstein", "Ulm"), ("Kafka", "Prague"),
            ("Sinatra", "Hoboken")],
    "P20": [("Dante", "Ravenna"), ("Mozart", "Vienna"), ("Chopin", "Paris"),
            ("Kafka", "Kierling"), ("Picasso", "Mougins"), ("Einstein", "Princeton")],
    "P36": [("France", "Paris"), ("Italy", "Rome"), ("Austria", "Vienna"),
            ("Poland", "Warsaw"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("India", "New Delhi")],  # two tokens: dropped at encoding
    "P37": [("France", "French"), ("Italy", "Italian"), ("Austria", "German"),
            ("Poland", "Polish"), ("Spain", "Spanish"), ("Japan", "Japanese")],
    "P31": [("Dante", "human"), ("Rome", "city")],
}
EVIDENCE = {"P106": "{} worked as a [MASK] .", "P19": "{} was a native of [MASK] .",
            "P20": "{} spent his last days in [MASK] .",
            "P36": "[MASK] is the seat of government of {} .", "P37": "People in {} speak [MASK] .",
            "P31": "{} is one [MASK] ."}
GOOGLE_RE = {  # (subject, object, judgments, masked sentence)
    "place_of_birth": [("Dante", "Florence", "yy", "Dante Alighieri was born in [MASK] in 1265 ."),
                       ("Mozart", "Salzburg", "yn", "Mozart was born in [MASK] , Austria ."),
                       ("Kafka", "Prague", "nny", "Kafka grew up in [MASK] ."),
                       ("Chopin", "Warsaw", "y", "Chopin was born near [MASK] .")],
    "date_of_birth": [("Dante", "1265", "yy", "Dante ( born [MASK] ) was a poet ."),
                      ("Mozart", "1756", "y", "Mozart was born in [MASK] ."),
                      ("Kafka", "1883", "yy", "Kafka , born in [MASK] , wrote novels .")],
    "place_of_death": [("Dante", "Ravenna", "y", "Dante died in exile in [MASK] ."),
                       ("Mozart", "Vienna", "yy", "Mozart died in [MASK] in 1791 .")],
}
GOOGLE_RE_PRED = {"place_of_birth": "/people/person/place_of_birth",
                  "date_of_birth": "/people/person/date_of_birth",
                  "place_of_death": "/people/deceased_person/place_of_death"}


def _relation_line(relation, template, label, kind):
    return {"relation": relation, "template": template, "label": label,
            "description": f"Wikidata's description of {label}", "type": kind}


def _trex_line(relation, i, sub, obj, sentences=None, **overrides):
    record = {"uuid": f"{relation}-{i}", "obj_uri": f"Q{100 + i}", "obj_label": obj,
              "sub_uri": f"Q{200 + i}", "sub_label": sub, "predicate_id": relation,
              "evidences": [{"sub_surface": sub, "obj_surface": obj, "masked_sentence": s}
                            for s in sentences or [EVIDENCE[relation].format(sub)]]}
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}


def _trex_lines(relation):
    lines = []
    for i, (sub, obj) in enumerate(FACTS[relation]):
        if (relation, sub) == ("P19", "Mozart"):  # one evidence without a mask
            lines.append(_trex_line(relation, i, sub, obj, [EVIDENCE["P19"].format(sub),
                                                            "Mozart loved Salzburg ."]))
        elif (relation, sub) == ("P20", "Kafka"):  # no evidence with a mask
            lines.append(_trex_line(relation, i, sub, obj, ["Kafka died near Vienna ."]))
        elif (relation, sub) == ("P106", "Sinatra"):
            lines.append(_trex_line(relation, i, sub, obj, uuid=None))
        else:
            lines.append(_trex_line(relation, i, sub, obj))
    if relation == "P19":  # Dante/Florence again under a new uuid, with a second evidence
        lines.append(_trex_line(relation, 99, "Dante", "Florence",
                                [EVIDENCE["P19"].format("Dante"), "Dante grew up in [MASK] ."]))
    return [json.dumps(line) for line in lines]


def _google_re_line(relation, sub, obj, votes, sentence, **overrides):
    record = {"pred": GOOGLE_RE_PRED[relation], "sub": f"/m/{sub.lower()}",
              "obj": f"/m/{obj.lower()}",
              "evidences": [{"url": f"http://en.wikipedia.org/wiki/{sub}",
                             "snippet": sentence.replace("[MASK]", obj),
                             "considered_sentences": [sentence.replace("[MASK]", obj)]}],
              "judgments": [{"rater": str(k), "judgment": "yes" if j == "y" else "no"}
                            for k, j in enumerate(votes)],
              "sub_w": None, "sub_label": sub, "sub_aliases": [], "obj_w": None,
              "obj_label": obj, "obj_aliases": [], "uuid": f"{relation}-{sub}",
              "masked_sentences": [sentence]}
    record.update(overrides)
    return json.dumps(record)


def write_lama_data(folder: Path) -> Path:
    """LAMA's ``data/`` folder with the facts above; returns it."""
    (folder / "TREx").mkdir(parents=True)
    (folder / "Google_RE").mkdir()
    (folder / "ConceptNet").mkdir()
    shutil.copy(CONCEPTNET, folder / "ConceptNet" / "test.jsonl")
    (folder / "relations.jsonl").write_text(
        "".join(json.dumps(_relation_line(*r)) + "\n" for r in RELATIONS), encoding="utf-8")
    for relation in FACTS:
        blank = "\n" if relation == "P37" else ""  # a trailing blank line, counted
        (folder / "TREx" / f"{relation}.jsonl").write_text(
            "\n".join(_trex_lines(relation)) + "\n" + blank, encoding="utf-8")
    for relation, rows in GOOGLE_RE.items():
        (folder / "Google_RE" / f"{relation}_test.jsonl").write_text(
            "".join(_google_re_line(relation, *row) + "\n" for row in rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_lama_data(tmp_path_factory.mktemp("lama") / "data")


def _facts_of(facts, relation):
    return [(f.subject, f.obj, f.sentences, f.uuid) for f in facts if f.relation == relation]


# ----------------------------------------------------------------------------- T-REx


def test_trex_templates_one_prompt_per_fact_with_subject_and_mask(data_dir):
    read = read_lama_set(data_dir, "trex")
    assert read.relations == ("P106", "P19", "P20", "P36", "P37")  # relations.jsonl's order
    assert read.labels == LABELS
    assert _facts_of(read.facts, "P19")[:2] == [
        ("Dante", "Florence", ("Dante was born in [MASK] .",), "P19-0"),
        ("Mozart", "Salzburg", ("Mozart was born in [MASK] .",), "P19-1")]
    assert _facts_of(read.facts, "P36")[0] == (
        "France", "Paris", ("The capital of France is [MASK] .",), "P36-0")
    # The uuid-less record keeps a name that finds it: file and line.
    assert _facts_of(read.facts, "P106")[-1] == (
        "Sinatra", "singer", ("Sinatra is a [MASK] by profession .",), "P106.jsonl:6")
    assert {f.relation for f in read.facts} == set(LABELS)  # P31: no template
    report = read.report
    assert (report.facts, report.sentences, report.lines, report.blank_lines) == (32, 32, 34, 1)
    assert report.facts_per_relation == {"P106": 6, "P19": 7, "P20": 6, "P36": 7, "P37": 6}
    assert report.duplicate_facts_merged == 1 and report.missing_uuid == 1
    assert report.relations_without_template == {"P31": 2}
    assert report.relations_without_file == ["P1001"]
    assert report.files == 5 and report.prompts == "templates"
    assert report.malformed == report.sentences_bad_mask_count == 0
    summary = report.summary()
    for part in ("5 files, prompts from templates", "34 lines -> 32 facts",
                 "records of relations without a template skipped: P31=2",
                 "relations without a file: P1001", "merged into that fact 1"):
        assert part in summary, part


def test_trex_evidences_are_lamas_masked_sentences(data_dir):
    read = read_lama_set(data_dir, "trex", prompts="evidences")
    assert read.relations == ("P106", "P19", "P20", "P36", "P37", "P31")  # P31 last: unlisted
    assert read.labels == LABELS  # P31 has none
    p19 = _facts_of(read.facts, "P19")
    # The repeated fact gained its new evidence; the one without a mask was dropped.
    assert p19[0] == ("Dante", "Florence",
                      ("Dante was a native of [MASK] .", "Dante grew up in [MASK] ."), "P19-0")
    assert p19[1] == ("Mozart", "Salzburg", ("Mozart was a native of [MASK] .",), "P19-1")
    assert "Kafka" not in [f[0] for f in _facts_of(read.facts, "P20")]
    assert _facts_of(read.facts, "P31") == [("Dante", "human", ("Dante is one [MASK] .",),
                                             "P31-0"),
                                            ("Rome", "city", ("Rome is one [MASK] .",), "P31-1")]
    report = read.report
    assert (report.facts, report.sentences, report.lines) == (33, 34, 36)
    assert report.sentences_bad_mask_count == 2 and report.facts_without_usable_sentence == 1
    assert report.duplicate_facts_merged == 1 and report.relations_without_template == {}
    assert "prompts from evidences" in report.summary()


def test_unrequested_relations_are_counted_per_relation(data_dir):
    read = read_lama_set(data_dir, "trex", relations=("P19", "P36"))
    assert read.relations == ("P19", "P36") and len(read.facts) == 14
    assert read.report.skipped_relations == {"P106": 6, "P20": 6, "P37": 6, "P31": 2}
    assert read.report.relations_without_template == {}  # P31 was not asked for
    read = read_lama_set(data_dir, "google_re", relations=("date_of_birth",))
    assert read.report.skipped_relations == {"place_of_birth": 4, "place_of_death": 2}


# ----------------------------------------------------------------------------- Google-RE


def test_google_re_templates_judgments_and_evidences(data_dir):
    read = read_lama_set(data_dir, "google_re")
    assert read.relations == ("place_of_birth", "date_of_birth", "place_of_death")
    assert read.labels == {"place_of_birth": "place of birth", "date_of_birth": "date of birth",
                           "place_of_death": "place of death"}
    # Kafka's place of birth: 2 "no" against 1 "yes", skipped as LAMA skips it; Mozart's tie
    # (1 to 1) is kept, as in LAMA.
    assert _facts_of(read.facts, "place_of_birth") == [
        ("Dante", "Florence", ("Dante was born in [MASK] .",), "place_of_birth-Dante"),
        ("Mozart", "Salzburg", ("Mozart was born in [MASK] .",), "place_of_birth-Mozart"),
        ("Chopin", "Warsaw", ("Chopin was born in [MASK] .",), "place_of_birth-Chopin")]
    assert _facts_of(read.facts, "date_of_birth")[0][:3] == ("Dante", "1265",
                                                             ("Dante (born [MASK]).",))
    assert _facts_of(read.facts, "place_of_death")[1][2] == ("Mozart died in [MASK] .",)
    assert read.report.negative_judgments == 1 and read.report.facts == 8
    assert "more 'no' than 'yes' judgments skipped 1" in read.report.summary()
    evidences = read_lama_set(data_dir, "google_re", prompts="evidences")
    assert [f.sentences for f in evidences.facts][:2] == [
        ("Dante Alighieri was born in [MASK] in 1265 .",),
        ("Mozart was born in [MASK] , Austria .",)]
    assert evidences.report.negative_judgments == 1


def test_a_missing_google_re_file_is_reported(data_dir, tmp_path):
    folder = shutil.copytree(data_dir, tmp_path / "data")
    (folder / "Google_RE" / "place_of_death_test.jsonl").unlink()
    read = read_lama_set(folder, "google_re")
    assert read.relations == ("place_of_birth", "date_of_birth")
    assert read.report.relations_without_file == ["place_of_death"]
    assert "relations without a file: place_of_death" in read.report.summary()


# ----------------------------------------------------------------------------- malformed


def _bad_trex(**overrides):
    return json.dumps(_trex_line("P19", 50, "Verdi", "Busseto", **overrides))


@pytest.mark.parametrize("lama_set, prompts, file, bad, message", [
    ("trex", "templates", "TREx/P19.jsonl", '{"uuid": "x", "obj_label": ', "malformed JSON"),
    ("trex", "templates", "TREx/P19.jsonl", _bad_trex(predicate_id="P20"),
     "a fact of 'P20' in the file of 'P19'"),
    ("trex", "templates", "TREx/P19.jsonl", _bad_trex(obj_label=None), "'obj_label'"),
    ("trex", "templates", "TREx/P19.jsonl", _bad_trex(sub_label=None),
     "'sub_label' \\(the template's subject\\)"),
    ("trex", "evidences", "TREx/P19.jsonl", _bad_trex(evidences="Verdi was born in [MASK]."),
     "'evidences' must be a list of objects"),
    ("trex", "evidences", "TREx/P19.jsonl", _bad_trex(evidences=[]), "no evidence sentence"),
    ("trex", "templates", "relations.jsonl",
     json.dumps({"relation": "P999", "template": "[X] has no object ."}),
     "template '\\[X\\] has no object .' needs one \\[Y\\]"),
    ("trex", "evidences", "relations.jsonl", json.dumps(_relation_line(*RELATIONS[0])),
     "relation P1001 again \\(first at .*relations.jsonl:1\\)"),
    ("google_re", "templates", "Google_RE/place_of_birth_test.jsonl",
     _google_re_line("place_of_birth", "Verdi", "Busseto", "y", "x [MASK]", judgments="yes"),
     "'judgments' must be a list"),
    ("google_re", "evidences", "Google_RE/place_of_birth_test.jsonl",
     _google_re_line("place_of_birth", "Verdi", "Busseto", "y", "x [MASK]",
                     pred="/people/deceased_person/place_of_death"),
     "a fact of 'place_of_death' in the file of 'place_of_birth'"),
    ("google_re", "evidences", "Google_RE/date_of_birth_test.jsonl",
     _google_re_line("date_of_birth", "Verdi", "1813", "y", "x [MASK]", masked_sentences=None),
     "'masked_sentences'"),
], ids=["bad-json", "predicate-id", "no-obj-label", "no-sub-label", "evidences-not-a-list",
        "no-evidence", "template-without-Y", "relation-twice", "judgments-not-a-list",
        "pred-of-another-relation", "no-masked-sentences"])
def test_a_malformed_line_names_file_and_line_or_is_counted(data_dir, tmp_path, lama_set,
                                                            prompts, file, bad, message):
    folder = shutil.copytree(data_dir, tmp_path / "data")
    path = folder / file
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join([lines[0], bad, *lines[1:]]) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=f"{Path(file).name}:2: .*{message}"):
        read_lama_set(folder, lama_set, prompts=prompts)
    # config.data.on_error="skip": counted, and every good line still read.
    read = read_for_config({"lama_set": lama_set, "prompts": prompts, "on_error": "skip"}, folder)
    clean = read_lama_set(data_dir, lama_set, prompts=prompts)
    assert read.facts == clean.facts and read.labels == clean.labels
    assert read.report.malformed == 1
    assert f"{Path(file).name}:2: " in read.report.malformed_examples[0]
    assert "malformed lines skipped 1" in read.report.summary()


def test_sets_that_need_a_folder_refuse_a_file_or_a_wrong_folder(data_dir, tmp_path):
    with pytest.raises(ValueError, match="is read from LAMA's data folder.*is a file"):
        read_lama_set(CONCEPTNET, "trex")
    with pytest.raises(MissingFileError, match="not a LAMA data folder: it has no TREx"):
        read_lama_set(tmp_path, "trex")
    with pytest.raises(ValueError, match="unknown LAMA set 'squad'"):
        read_lama_set(data_dir, "squad")
    with pytest.raises(ValueError, match="unknown prompt kind 'sentences'"):
        read_lama_set(data_dir, "trex", prompts="sentences")


# ----------------------------------------------------------------------------- ConceptNet


def test_conceptnet_reads_the_same_from_a_file_or_a_data_folder(data_dir):
    first = read_lama_set(CONCEPTNET)
    facts, report = first.facts, first.report
    for source in (CONCEPTNET, data_dir, data_dir.parent):  # file, data/, its parent
        read = read_lama_set(source, "conceptnet", prompts="templates")
        assert read.facts == facts and read.labels == {}
        assert read.report.facts_per_relation == report.facts_per_relation
        assert read.relations == ("AtLocation", "CapableOf", "Desires", "HasSubevent", "IsA",
                                  "UsedFor")  # LAMA's order
        assert read.report.prompts is None and "files" not in read.report.summary()
    config = default.get_config()  # lama_set "conceptnet"
    assert read_for_config(config.data, CONCEPTNET).facts == facts


def test_conceptnet_relations_outside_lamas_16_are_ordered_by_name(tmp_path):
    line = {"obj_label": "x", "masked_sentences": ["[MASK] ."], "sub": "s"}
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({**line, "pred": p, "uuid": p}) + "\n"
                            for p in ("Zeta", "IsA", "Alpha", "AtLocation")))
    assert read_lama_set(path).relations == ("AtLocation", "IsA", "Alpha", "Zeta")


# ----------------------------------------------------------------------------- download


def _zip_of(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, Path("data") / path.relative_to(folder))
    return archive


def serve_lama_archive(monkeypatch, archive: Path) -> list[str]:
    """urllib's opener, answering LAMA's real URL with ``archive`` (a local zip), ``file://``
    URLs from disk, and any other URL as an offline machine would; returns the URLs asked for,
    in order."""
    asked: list[str] = []
    local = urllib.request.urlopen

    def urlopen(url, timeout=None):
        asked.append(url)
        if url == LAMA_DATA_URL:
            return archive.open("rb")
        if url.startswith("file:"):
            return local(url, timeout=timeout)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return asked


def test_lama_downloads_the_archive_once_and_reads_it_like_the_folder(data_dir, tmp_path,
                                                                      monkeypatch):
    asked = serve_lama_archive(monkeypatch, _zip_of(data_dir, tmp_path / "data.zip"))
    cache = tmp_path / "cache"
    folder = fetch_lama("trex", cache)
    assert folder == cache / CACHED_DATA_DIR
    assert sorted(p.name for p in cache.iterdir()) == [CACHED_DATA_DIR]  # zip and staging gone
    for lama_set in LAMA_SETS:
        assert read_lama_set(folder, lama_set).facts == read_lama_set(data_dir, lama_set).facts
    # Cached: every set, ConceptNet too, is read from that folder without a second download.
    assert [fetch_lama(lama_set, cache) for lama_set in LAMA_SETS] == [folder] * 3
    assert asked == [LAMA_DATA_URL]
    with pytest.raises(ConnectionError, match="could not download.*copy its data/ folder to"):
        fetch_lama("trex", tmp_path / "other", url="https://example.invalid/data.zip")
    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        zf.writestr("data/Squad/test.jsonl", "{}\n")
    with pytest.raises(ValueError, match="has no data/TREx nor data/relations.jsonl: not LAMA's"):
        fetch_lama("trex", tmp_path / "c3", url=wrong.as_uri())
    assert not (tmp_path / "c3" / CACHED_DATA_DIR).exists()


def test_every_set_a_run_resolves_goes_through_one_download(data_dir, tmp_path,
                                                              monkeypatch):
    """``config.data.source="lama"`` for each set, as a run resolves it: one request, to LAMA's
    real URL, and one folder that every set reads like LAMA's own."""
    asked = serve_lama_archive(monkeypatch, _zip_of(data_dir, tmp_path / "data.zip"))
    config = default.get_config()
    config.model, config.data.source = "bert-base-uncased", "lama"
    config.data.cache_dir = str(tmp_path / "cache")
    sources = {}
    for lama_set in ("conceptnet", "google_re", "trex"):
        config.data.lama_set = lama_set
        _, sources[lama_set] = resolve_sources(config)
    assert asked == [LAMA_DATA_URL]
    assert set(sources.values()) == {tmp_path / "cache" / CACHED_DATA_DIR}
    for lama_set, source in sources.items():
        assert read_lama_set(source, lama_set).facts == read_lama_set(data_dir, lama_set).facts


class _CutOff(io.BytesIO):
    """A response that ends in ``error`` after its first bytes: a dropped connection, or the
    process interrupted (Ctrl-C, a kill) where no handler tidies up."""

    def __init__(self, data: bytes, error: BaseException) -> None:
        super().__init__(data)
        self.error = error

    def read(self, size=-1):
        data = super().read(size)
        if not data:
            raise self.error
        return data


def test_an_interrupted_download_or_unzip_leaves_nothing_taken_for_the_data(
        data_dir, tmp_path, monkeypatch):
    archive = _zip_of(data_dir, tmp_path / "data.zip")
    cache = tmp_path / "cache"
    head = archive.read_bytes()[:1000]
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _CutOff(
        head, ConnectionResetError("connection reset (test)")))
    with pytest.raises(ConnectionError, match="could not download"):
        fetch_lama("trex", cache)
    assert list(cache.iterdir()) == []  # no half zip for the next call to unzip
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: _CutOff(head, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fetch_lama("trex", cache)
    assert not (cache / "lama_data.zip").exists()  # the half lies under a .part name
    serve_lama_archive(monkeypatch, archive)
    unzip = zipfile.ZipFile.extractall

    def disk_full(self, path, members):
        unzip(self, path, members[: len(members) // 2])
        raise OSError(28, "No space left on device (test)")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fetch_lama("trex", cache, keep_zip=True)
    assert sorted(p.name for p in cache.iterdir()) == ["lama_data.zip"]  # no half folder
    monkeypatch.setattr(zipfile.ZipFile, "extractall", unzip)
    folder = fetch_lama("trex", cache)  # the kept zip, unzipped whole
    assert read_lama_set(folder, "trex").facts == read_lama_set(data_dir, "trex").facts


# ----------------------------------------------------------------------------- user errors


def _config_for(source, lama_set: str = "conceptnet", relations=()) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data.source, config.data.lama_set = str(source), lama_set
    config.data.relations = relations
    return config


def _prepare(config):
    """The data step of a run, as the command line reaches it; every error here is raised
    before the tokenizer is used."""
    _, path = resolve_sources(config)
    return prepare_data(config, None, path, log=lambda *_: None)


@pytest.mark.parametrize("lama_set", LAMA_SETS)
def test_a_missing_data_source_is_a_missing_file_error_naming_it(tmp_path, lama_set):
    # A jsonl file is ConceptNet's; the factual sets are read from a folder (config checks).
    missing = tmp_path / ("nonexistent.jsonl" if lama_set == "conceptnet" else "nonexistent")
    with pytest.raises(MissingFileError, match=f"{missing}: no such file or folder"):
        _prepare(_config_for(missing, lama_set))


@pytest.mark.parametrize("lama_set, relations, unknown, held", [
    ("conceptnet", ("NotARelation",), ["NotARelation"],
     "AtLocation, CapableOf, Desires, HasSubevent, IsA, UsedFor"),
    ("conceptnet", ("IsA,NotARelation, AlsoNot",), ["NotARelation", "AlsoNot"],
     "AtLocation, CapableOf, Desires, HasSubevent, IsA, UsedFor"),
    ("trex", ("P19", "P1001"), ["P1001"], "P106, P19, P20, P36, P37, P31"),
    ("google_re", ("place_of_death", "date_of_death"), ["date_of_death"],
     "place_of_birth, date_of_birth, place_of_death"),
], ids=["conceptnet-unknown", "conceptnet-some-unknown", "trex-listed-without-file",
        "google-re-unknown"])
def test_a_relation_the_data_does_not_hold_is_named_with_those_it_holds(
        data_dir, lama_set, relations, unknown, held):
    source = CONCEPTNET if lama_set == "conceptnet" else data_dir
    with pytest.raises(UsageError) as err:
        _prepare(_config_for(source, lama_set, relations))
    message = str(err.value)
    assert f"config.data.relations lists {unknown}, which have no usable prompts in" in message
    assert f"the data holds no such relation (the {len(held.split(', '))} it holds: {held})" in (
        message)


# ----------------------------------------------------------------------------- labels, config


def test_labels_travel_with_the_prompts_and_name_relations_in_outputs(data_dir, tmp_path):
    read = read_lama_set(data_dir, "trex")
    tokenizer = make_bert_tokenizer(tmp_path, words_of(
        [s for f in read.facts for s in f.sentences] + [f.obj for f in read.facts]))
    encoded, report = encode_facts(read.facts, tokenizer, ("P19", "P36"), labels=read.labels)
    assert encoded.relation_labels == {"P19": "place of birth", "P36": "capital"}
    assert encoded.subset([0, 1]).relation_labels == encoded.relation_labels
    assert report.skipped["object_not_single_token"] == 1  # New Delhi
    assert relation_display(("P19", "P36", "P31", "place_of_birth", "IsA"),
                            {**read.labels, "place_of_birth": "place of birth"}) == (
        "P19 (place of birth)", "P36 (capital)", "P31", "place_of_birth", "IsA")
    assert labels_entry(("P19", "P31"), read.labels) == {
        "relation_labels": {"P19": "place of birth"}}
    assert labels_entry(("IsA",), {}) == {}  # ConceptNet: run.json keeps its keys


def test_config_checks_name_the_lama_fields():
    config = default.get_config()
    config.data.lama_set, config.data.prompts = "squad", "sentences"
    with pytest.raises(ValueError) as err:
        validate_config(config)
    assert "config.data.lama_set = 'squad'; choose one of ('conceptnet', 'trex', " in str(err.value)
    assert "config.data.prompts = 'sentences'; choose one of ('templates', 'evidences')" in str(
        err.value)
    for source, what in (("embedded", "the toy world"), ("/x/test.jsonl", "a jsonl file")):
        config = default.get_config()
        config.data.lama_set, config.data.source = "trex", source
        with pytest.raises(ValueError, match=f"config.data.lama_set = 'trex' is read from "
                           f"LAMA's data folder, but config.data.source = '{source}' is {what}"):
            validate_config(config)
    config.data.source = "lama"
    validate_config(config)


# ----------------------------------------------------------------------------- a run


def _tiny_model(directory: Path, data_dir: Path) -> Path:
    """A random 2-layer BERT whose word-level vocabulary covers the T-REx fixture's prompts."""
    texts = [s for prompts in ("templates", "evidences")
             for f in read_lama_set(data_dir, "trex", prompts=prompts).facts
             for s in (*f.sentences, f.obj)]
    tokenizer = make_bert_tokenizer(directory, words_of(texts))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    return save_mlm(directory, init_params(config, jax.random.key(0)), config, tokenizer)


def test_a_trex_run_names_relations_by_id_and_label(data_dir, tmp_path, monkeypatch):
    from lamp_jax.data.prepare import prepare_data
    from lamp_jax.loop import train_and_evaluate

    config = default.get_config()
    config.model = str(_tiny_model(tmp_path / "model", data_dir))
    config.data.source, config.data.lama_set = str(data_dir), "trex"
    config.batch_size, config.epochs, config.optim.learning_rate = 2, 2, 0.05
    config.specialization = False
    plotted = []  # the names the trainer hands the plots (drawing them is plots' own test)
    monkeypatch.setattr(plots, "write_run_plots",
                        lambda directory, relations, *_: plotted.append(tuple(relations)) or [])
    log: list[str] = []
    workdir = tmp_path / "run"
    summary = train_and_evaluate(config, workdir, log=log.append)

    ids = ("P106", "P19", "P20", "P36", "P37")
    shown = tuple(f"{r} ({LABELS[r]})" for r in ids)
    run = json.loads((workdir / "run.json").read_text())
    assert run["relations"] == list(ids) and run["relation_labels"] == LABELS
    assert run["config"]["data"]["lama_set"] == "trex"
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["relation_labels"] == LABELS == summary["relation_labels"]
    assert set(metrics["test"]["pruned"]["per_relation"]) == set(ids)  # keyed by id
    table = next(text for text in log if text.startswith("relation "))
    rows = table.splitlines()[1:]
    assert [row[: len(s)] for row, s in zip(rows, shown, strict=True)] == list(shown)
    assert plotted == [shown]
    assert any("records of relations without a template skipped: P31=2" in t for t in log)
    split = json.loads((workdir / "split.json").read_text())
    assert {row["relation"] for row in split["test"]} == set(ids)
    prompts = {(row["relation"], row["subject"], s) for rows in split.values() for row in rows
               for s in row["sentences"]}
    assert ("P36", "France", "The capital of France is [MASK] .") in prompts
    # The notebook API names them too.
    from lamp_jax import load_run

    opened = load_run(workdir)
    assert opened.relation_labels == LABELS and opened.shown_relations == shown
    # lamp_jax.evaluate and the notebook API rebuild the data from run.json alone.
    tokenizer = load_mlm(run["model"]).tokenizer
    data = prepare_data(ml_collections.ConfigDict(run["config"]), tokenizer, Path(run["data"]),
                        log=lambda *_: None)
    assert data.relations == ids and data.splits["test"].relation_labels == LABELS
    assert len(data.splits["test"]) == metrics["test"]["full"]["count"]


def test_forty_one_relations_train_in_one_step_on_eight_devices(tmp_path):
    """T-REx has 41 relations: on 8 devices they take 48 slots (6 per device, 7 inert), and
    every relation is trained, evaluated and exported; the inert slots are left out."""
    from lamp_jax.checkpoint import load_binary_masks
    from lamp_jax.loop import train_and_evaluate

    data = tmp_path / "data"
    ids = [f"P{1000 + i}" for i in range(41)]
    (data / "TREx").mkdir(parents=True)
    subjects, objects = ["alpha", "beta", "gamma", "delta"], ["red", "green", "blue", "black"]
    (data / "relations.jsonl").write_text("".join(
        json.dumps(_relation_line(r, f"[X] is r{i} of [Y] .", f"relation {i}", "N-1")) + "\n"
        for i, r in enumerate(ids)))
    for i, r in enumerate(ids):
        (data / "TREx" / f"{r}.jsonl").write_text("".join(
            json.dumps({"uuid": f"{r}-{j}", "sub_label": s, "obj_label": objects[(i + j) % 4],
                        "predicate_id": r}) + "\n" for j, s in enumerate(subjects)))
    texts = [s for f in read_lama_set(data, "trex").facts for s in (*f.sentences, f.obj)]
    tokenizer = make_bert_tokenizer(tmp_path / "model", words_of(texts))
    model = ModelConfig(vocab_size=len(tokenizer), hidden_size=16, num_layers=2, num_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    config = default.get_config()
    config.model = str(save_mlm(tmp_path / "model", init_params(model, jax.random.key(0)), model,
                                tokenizer))
    config.data.source, config.data.lama_set = str(data), "trex"
    config.data.fractions = (0.5, 0.25, 0.25)  # 2 / 1 / 1 facts of each relation
    config.batch_size, config.epochs, config.mask.init_value = 2, 1, 0.3
    config.specialization, config.plots = False, False
    said: list[str] = []
    summary = train_and_evaluate(config, tmp_path / "run", log=said.append)
    assert any("41 relations x 6 masked matrices" in line and "relation slots 48 (7 inert)"
               in line and "'relation': 8" in line for line in said), said
    assert summary["relations"] == ids and len(summary["sparsity"]["total"]) == 41
    assert set(summary["test"]["pruned"]["per_relation"]) == set(ids)
    assert min(summary["sparsity"]["total"]) > 0  # every relation's mask trained and pruned
    _, _, relations = load_binary_masks(tmp_path / "run" / "masks.npz")
    assert list(relations) == ids
