"""Tokenisation of LAMA facts into fixed-shape numpy arrays for the jitted training/eval steps.

Why fixed shapes and int32: every batch the trainer sees has the same ``L`` so ``jax.jit`` compiles
once, and int32 is what JAX uses for indices by default (no silent x64 promotion).

Why objects are checked against the vocabulary here (and not by string matching after decoding, as
the reference does): P@k is computed on token ids, so each fact's object must be exactly one
vocabulary id. LAMA's convention is to skip facts whose object is not a single token; we do the
same but *count* every skip by reason, with examples.

Tokenizer families are told apart by behaviour, not by model name: a tokenizer is
"space-prefixed" (byte-level BPE as in RoBERTa/GPT-2) when tokenising ``" w"`` differs from
``"w"``. For those, the object is looked up in its word-initial form (``" think"`` -> ``Ġthink``),
which is the form a word after a space takes in the prompt, and the whitespace before the mask
is folded into the mask token (what RoBERTa's ``lstrip`` mask does), so the prediction at the mask
position is for exactly that word-initial token whether or not the tokenizer's mask token strips
left. WordPiece (BERT) and SentencePiece tokenizers ignore a leading space, and lower-casing is
left to the tokenizer's own normaliser.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lamp_jax.data.lama import MASK, Fact

SKIP_REASONS = ("relation_not_requested", "object_not_single_token", "too_long", "mask_count")
_MAX_EXAMPLES = 3
_PAD_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """Tokenised cloze prompts, one row per masked sentence.

    Attributes:
      input_ids: [N, L] int32, padded with the tokenizer's pad id.
      attention_mask: [N, L] int32, 1 on real tokens.
      mask_pos: [N] int32, position of the (single) mask token; with answers of any length
        (:mod:`lamp_jax.data.answers`) ``[N, T]``, the positions whose logits predict the
        object's tokens.
      obj_id: [N] int32, vocabulary id of the object; with answers of any length ``[N, T]``,
        the object's tokens (0-padded).
      relation: [N] int32, index into ``relations``.
      fact_index: [N] int32, index into the facts passed to :func:`encode_facts`, so splits can
        keep all prompts of a fact together.
      relations: relation names; defines the relation axis of batches and of the mask pytree.
      relation_labels: relation -> human-readable label ("P19" -> "place of birth") for those
        of ``relations`` that have one; what tables and plots show beside the name.
      obj_mask: with answers of any length, ``[N, T]`` float32, 1 for each real object token;
        None for single-token objects.
      texts: with answers of any length, each row's sentence as the model reads it before the
        answer is placed (``[MASK]`` where it goes; a causal LM's prefix), for rows that score
        other answers (:func:`lamp_jax.data.answers.scoring_rows`); None otherwise.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    mask_pos: np.ndarray
    obj_id: np.ndarray
    relation: np.ndarray
    fact_index: np.ndarray
    relations: tuple[str, ...]
    relation_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    obj_mask: np.ndarray | None = None
    texts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """The padded length ``L`` (kept by :meth:`subset` so compiled shapes stay valid)."""
        return int(self.input_ids.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> EncodedPrompts:
        """Rows ``indices`` (in that order), same ``L`` and ``relations``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            mask_pos=self.mask_pos[idx],
            obj_id=self.obj_id[idx],
            relation=self.relation[idx],
            fact_index=self.fact_index[idx],
            obj_mask=None if self.obj_mask is None else self.obj_mask[idx],
            texts=None if self.texts is None else tuple(self.texts[i] for i in idx),
        )

    def counts_per_relation(self) -> np.ndarray:
        """[R] number of prompts of each relation (zero for relations with no prompt)."""
        return np.bincount(self.relation, minlength=len(self.relations)).astype(np.int64)


@dataclasses.dataclass
class EncodeReport:
    """Kept/skipped counts of :func:`encode_facts`; every skip has a reason and examples."""

    facts: int = 0
    sentences: int = 0
    kept: int = 0
    seq_len: int = 0
    space_prefixed: bool = False
    skipped: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0)
    )
    examples: dict[str, list[str]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in SKIP_REASONS}
    )
    kept_per_relation: dict[str, int] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        """One human-readable paragraph, for logs and notebooks."""
        skipped = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v)
        text = (
            f"{self.facts} facts / {self.sentences} sentences -> {self.kept} prompts "
            f"(L={self.seq_len}, space-prefixed tokenizer={self.space_prefixed}); "
            f"skipped: {skipped or 'none'}"
        )
        for reason, examples in self.examples.items():
            if examples:
                text += f"; {reason} e.g. " + " | ".join(examples)
        if self.kept_per_relation:
            text += "; kept per relation: " + ", ".join(
                f"{k}={v}" for k, v in self.kept_per_relation.items()
            )
        return text

    def _skip(self, reason: str, example: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(example)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def is_space_prefixed(tokenizer: Any) -> bool:
    """True for tokenizers whose word-initial tokens carry the preceding space (byte-level BPE).

    Decided by behaviour: such tokenizers encode ``" the"`` differently from ``"the"``, while
    WordPiece strips the space and SentencePiece adds its word-boundary marker either way.
    """
    probe = "the"
    return _ids(tokenizer, " " + probe) != _ids(tokenizer, probe)


def object_token_id(tokenizer: Any, obj: str, space_prefixed: bool | None = None) -> int | None:
    """The single vocabulary id of ``obj`` as it would follow a space in a prompt, else None.

    None when the object splits into several tokens or maps to the unknown token.
    """
    if space_prefixed is None:
        space_prefixed = is_space_prefixed(tokenizer)
    ids = _ids(tokenizer, " " + obj if space_prefixed else obj)
    if len(ids) != 1:
        return None
    unk = tokenizer.unk_token_id
    if unk is not None and ids[0] == unk:
        return None
    return int(ids[0])


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def encode_facts(
    facts: Sequence[Fact],
    tokenizer: Any,
    relations: Sequence[str],
    max_length: int = 64,
    labels: Mapping[str, str] | None = None,
) -> tuple[EncodedPrompts, EncodeReport]:
    """Tokenise every masked sentence of ``facts`` whose relation is in ``relations``.

    Args:
      facts: from :func:`lamp_jax.data.lama_sets.read_lama_set` or
        :func:`lamp_jax.data.triples.triples_to_facts`; sentences contain LAMA's ``[MASK]``.
      tokenizer: a Hugging Face (fast) tokenizer with ``mask_token`` and ``pad_token_id``.
      relations: the relation axis; prompts of other relations are skipped and counted.
      max_length: prompts longer than this (special tokens included) are skipped and counted.
      labels: relation -> label (:func:`lamp_jax.data.lama_sets.read_lama_set`); those of
        ``relations`` travel with the prompts as ``relation_labels``.

    Returns:
      ``(EncodedPrompts, EncodeReport)``. ``L`` is the longest kept prompt rounded up to a
      multiple of 8 and capped at ``max_length`` (at least 1, also for zero prompts).
    """
    relations = tuple(relations)
    if len(set(relations)) != len(relations):
        raise ValueError(f"duplicate relation names in {relations}")
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise ValueError("tokenizer has no mask token")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token")
    rel_index = {r: i for i, r in enumerate(relations)}
    space_prefixed = is_space_prefixed(tokenizer)
    report = EncodeReport(facts=len(facts), space_prefixed=space_prefixed)
    mask_pattern = re.compile(r"\s*" + re.escape(MASK)) if space_prefixed else None
    mask_token, mask_id = tokenizer.mask_token, int(tokenizer.mask_token_id)

    obj_cache: dict[str, int | None] = {}
    texts: list[str] = []
    meta: list[tuple[int, int, int, str]] = []  # (fact index, relation index, object id, origin)
    for f_idx, fact in enumerate(facts):
        report.sentences += len(fact.sentences)
        for sentence in fact.sentences:
            origin = f"{fact.relation}/{fact.uuid}: {sentence!r} -> {fact.obj!r}"
            if fact.relation not in rel_index:
                report._skip("relation_not_requested", origin)
                continue
            if fact.obj not in obj_cache:
                obj_cache[fact.obj] = object_token_id(tokenizer, fact.obj, space_prefixed)
            obj_id = obj_cache[fact.obj]
            if obj_id is None:
                report._skip("object_not_single_token", origin)
                continue
            if sentence.count(MASK) != 1:
                report._skip("mask_count", origin)
                continue
            if mask_pattern is not None:
                text = mask_pattern.sub(lambda _: mask_token, sentence)
            else:
                text = sentence.replace(MASK, mask_token)
            texts.append(text)
            meta.append((f_idx, rel_index[fact.relation], obj_id, origin))

    encoded_ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    rows: list[list[int]] = []
    kept_meta: list[tuple[int, int, int, int]] = []
    for ids, (f_idx, r_idx, obj_id, origin) in zip(encoded_ids, meta, strict=True):
        ids = list(ids)
        if ids.count(mask_id) != 1:
            report._skip("mask_count", origin)
            continue
        if len(ids) > max_length:
            report._skip("too_long", f"{origin} ({len(ids)} tokens)")
            continue
        rows.append(ids)
        kept_meta.append((f_idx, r_idx, obj_id, ids.index(mask_id)))

    longest = max((len(r) for r in rows), default=1)
    seq_len = min(_round_up(longest, _PAD_MULTIPLE), max_length)
    n = len(rows)
    input_ids = np.full((n, seq_len), tokenizer.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((n, seq_len), dtype=np.int32)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
    columns = np.asarray(kept_meta, dtype=np.int32).reshape(n, 4)
    encoded = EncodedPrompts(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mask_pos=columns[:, 3].copy(),
        obj_id=columns[:, 2].copy(),
        relation=columns[:, 1].copy(),
        fact_index=columns[:, 0].copy(),
        relations=relations,
        relation_labels={r: labels[r] for r in relations if r in (labels or {})},
    )
    report.kept = n
    report.seq_len = seq_len
    counts = collections.Counter(int(r) for r in encoded.relation)
    report.kept_per_relation = {r: counts.get(i, 0) for i, r in enumerate(relations)}
    return encoded, report
