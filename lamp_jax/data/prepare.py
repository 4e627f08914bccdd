"""A run's data as its configuration names it: read, encoded, split, and what was held out.

    model_source, path = resolve_sources(config)
    data = prepare_data(config, tokenizer, path, log)

Used by the run's setup (:mod:`lamp_jax.setup`) and by the notebook API when it rebuilds a
split from ``run.json``: both get exactly the prompts training saw. Everything dropped is
counted and printed, nothing silently.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from lamp_jax.data.answers import Candidates, candidates_of, encode_answers
from lamp_jax.data.encode import EncodedPrompts, encode_facts
from lamp_jax.data.lama_archive import fetch_lama
from lamp_jax.data.lama_sets import read_for_config, requested_relations
from lamp_jax.data.splits import held_out_split, reference_protocol_split, split_by_fact
from lamp_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """The relations a run trains, its encoded prompts per split ("train", "dev", "test"),
    and per split its facts as read (uuid, relation, subject, object, sentences): what
    ``split.json`` records, so that anyone can recompute the metrics without our code."""

    relations: tuple[str, ...]
    splits: dict[str, EncodedPrompts]
    facts_by_split: dict[str, list[dict[str, Any]]]
    # With answers of any length (config.data.answers): each relation's candidate answers.
    candidates: Candidates | None = None

    @property
    def labels(self) -> dict[str, str]:
        """Relation -> human-readable label where the data has one (T-REx: "P19" -> "place
        of birth"); empty for ConceptNet."""
        return dict(self.splits["train"].relation_labels or {})


def resolve_sources(config: ml_collections.ConfigDict) -> tuple[str, Path]:
    """Where the model and the LAMA data come from ("embedded" = the shipped toy world; "lama"
    = LAMA's data folder, unzipped from LAMA's official archive on first use, for every set)."""
    model = config.model
    source = config.data.source
    if model == "embedded" or source == "embedded":
        from lamp_jax.embedded import ensure_embedded_model

        embedded = ensure_embedded_model()
        model = str(embedded) if model == "embedded" else model
        if source == "embedded":
            return model, embedded / "lama_probe.jsonl"
    if source == "lama":
        return model, fetch_lama(config.data.get("lama_set", "conceptnet"), config.data.cache_dir)
    return model, Path(source).expanduser()


def prepare_data(config: ml_collections.ConfigDict, tokenizer: Any, path: Path,
                 log=print, causal: bool = False) -> PreparedData:
    """Reads, encodes and splits ``path`` as ``config.data`` says; prints what was kept and
    skipped, per reason. ``causal``: the prompts are for a causal LM (answers after a prefix;
    :mod:`lamp_jax.data.answers`), which reads answers of any length only.

    Raises :class:`~lamp_jax.errors.UsageError` (:class:`~lamp_jax.errors.MissingFileError` for
    a missing ``path``) when the data cannot give what the config asks: a relation it does not
    hold, a malformed line, or no usable prompt at all.
    """
    wanted = requested_relations(config.data.relations) or None
    read = read_for_config(config.data, path)  # the LAMA set config.data.lama_set names
    facts, present = read.facts, read.relations
    log(read.report.summary())
    relations = wanted or tuple(present)
    any_length = config.data.get("answers", "single_token") == "any_length"
    if causal and not any_length:
        raise UsageError("a causal LM reads answers after a prefix, of any length: set "
                         "config.data.answers='any_length' (as configs/gpt2_trex.py does)")

    def encode(facts, relations):
        if any_length:
            return encode_answers(facts, tokenizer, relations, causal=causal,
                                  max_length=config.data.max_length,
                                  max_answer_tokens=config.data.max_answer_tokens,
                                  labels=read.labels)
        return encode_facts(facts, tokenizer, relations, max_length=config.data.max_length,
                            labels=read.labels)

    encoded, encode_report = encode(facts, relations)
    log(encode_report.summary())
    if len(encoded) == 0:
        raise UsageError(f"no usable prompts in {path} (see the report above)")
    empty = [r for r, n in zip(relations, encoded.counts_per_relation(), strict=True) if n == 0]
    if empty and wanted:
        raise UsageError(f"config.data.relations lists {empty}, which have no usable prompts in "
                         f"{path}; relations with prompts: {sorted(set(present) - set(empty))}")
    if empty:  # nothing was asked for by name: train the others, and say which were left out
        log(f"relations skipped: {len(empty)} ({', '.join(empty)}): every prompt was dropped "
            "at encoding (see the report above)")
        relations = tuple(r for r in relations if r not in empty)
        encoded, _ = encode(facts, relations)
    if config.data.split == "reference":
        log("split: reference protocol (train = dev = test = all prompts; NOT held-out numbers)")
        splits = reference_protocol_split(len(encoded))
    elif config.data.split == "by_fact":
        splits = split_by_fact(encoded, tuple(config.data.fractions), config.data.seed)
    else:
        held = held_out_split(config.data.split, facts, encoded,
                              lambda fs, rels: encode(fs, rels)[0],
                              tuple(config.data.fractions), config.data.seed)
        log(held.report.summary())
        named = [r for r in (wanted or ()) if r in held.report.dropped_relations]
        if named:
            raise UsageError(
                f"config.data.relations lists {named}, which config.data.split = "
                f"{config.data.split!r} cannot hold out: "
                + "; ".join(f"{r}: {held.report.dropped_relations[r]}" for r in named))
        relations, encoded, facts, splits = held.relations, held.encoded, held.facts, held.indices
    data = {name: encoded.subset(idx) for name, idx in splits.items()}
    log("prompts per split: " + ", ".join(f"{k}={len(v)}" for k, v in data.items()))
    return PreparedData(tuple(relations), data, _facts_by_split(facts, data),
                        candidates_of(data, facts) if any_length else None)


def _facts_by_split(facts, data) -> dict[str, list[dict[str, Any]]]:
    """Per split, the facts whose prompts it holds, in file order."""
    out = {}
    for name, encoded in data.items():
        out[name] = [{"uuid": facts[i].uuid, "relation": facts[i].relation,
                      "subject": facts[i].subject, "object": facts[i].obj,
                      "sentences": list(facts[i].sentences)}
                     for i in np.unique(encoded.fact_index)]
    return out
