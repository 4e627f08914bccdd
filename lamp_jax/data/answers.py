"""Answers of any length: prompts whose object is several tokens, for masked and causal LMs.

LAMA's convention keeps only facts whose object is one token of the model's vocabulary
(:mod:`lamp_jax.data.encode`); ``config.data.answers = "any_length"`` keeps every object of at
most ``config.data.max_answer_tokens`` tokens:

* a **masked LM** reads a prompt whose ``[MASK]`` became as many mask tokens as the object has
  tokens, and predicts the object's tokens at them;
* a **causal LM** reads the text before ``[MASK]`` (the prefix) followed by the object's tokens
  and predicts each object token from what precedes it (teacher forcing). Only sentences whose
  ``[MASK]`` is last (nothing but punctuation after it) can be read this way; the others are
  dropped and counted (``answer_not_last``), as is a sentence with nothing before ``[MASK]``
  for a tokenizer that adds no beginning-of-sequence token (``empty_prefix``).

Training rows (:class:`~lamp_jax.data.encode.EncodedPrompts`) then carry ``mask_pos``,
``obj_id`` and ``obj_mask`` as ``[N, T]``: the positions whose logits predict the object's
tokens, the tokens, and 1 for each real one (``T = max_answer_tokens``).

Ranking chooses among a relation's **candidates**, every object the data has for it (LAMA's
common vocabulary plays that role for single tokens), each scored by the sum of its tokens'
log-probabilities (:class:`ScoringRows`): a masked LM scores all candidates of ``m`` tokens from
one pass over the prompt with ``m`` masks; a causal LM scores every one-token candidate from
one pass over the prefix, and each longer candidate from a pass over the prefix and its own
tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lamp_jax.data.encode import EncodedPrompts, EncodeReport, _round_up, is_space_prefixed
from lamp_jax.data.lama import MASK, Fact

# What may follow [MASK] in a sentence a causal LM can read as prefix + answer.
_TRAILING_PUNCTUATION = re.compile(r"""^[\s.!?,;:'")\]]*$""")
ANSWER_SKIP_REASONS = ("relation_not_requested", "object_unknown_tokens", "object_too_long",
                       "too_long", "mask_count", "answer_not_last", "empty_prefix")


def answer_tokens(tokenizer: Any, obj: str, space_prefixed: bool) -> list[int] | None:
    """The object's token ids as they follow a space in a prompt; None when it has none or one
    of them is the unknown token."""
    ids = list(tokenizer(" " + obj if space_prefixed else obj,
                         add_special_tokens=False)["input_ids"])
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        return None
    return [int(i) for i in ids]


@dataclasses.dataclass(frozen=True)
class Candidates:
    """Per relation, the answers ranking chooses among: ``ids`` ``[R, C, T]`` (0-padded),
    ``length`` ``[R, C]`` (0 for padding), and each one's text."""

    ids: np.ndarray
    length: np.ndarray
    texts: tuple[tuple[str, ...], ...]

    def index(self) -> list[dict[tuple[int, ...], int]]:
        """Per relation, token ids -> candidate index."""
        return [{tuple(self.ids[r, c, :n].tolist()): c for c, n in enumerate(self.length[r])
                 if n} for r in range(len(self.texts))]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One kept sentence, before padding: how a model reads it (``text`` holds ``[MASK]``
    where the answer goes; for a causal LM, the prefix only)."""

    fact: int
    relation: int
    answer: tuple[int, ...]
    text: str


def _kept_prompts(facts: Sequence[Fact], tokenizer: Any, relations: Sequence[str], causal: bool,
                  max_answer_tokens: int, report: EncodeReport) -> list[Prompt]:
    """The sentences a model can read and answer."""
    rel_index = {r: i for i, r in enumerate(relations)}
    space = is_space_prefixed(tokenizer)
    cache: dict[str, list[int] | None] = {}
    prompts = []
    begins = causal and adds_bos(tokenizer)

    for f_idx, fact in enumerate(facts):
        report.sentences += len(fact.sentences)
        for sentence in fact.sentences:
            origin = f"{fact.relation}/{fact.uuid}: {sentence!r} -> {fact.obj!r}"
            if fact.relation not in rel_index:
                report._skip("relation_not_requested", origin)
                continue
            if fact.obj not in cache:
                cache[fact.obj] = answer_tokens(tokenizer, fact.obj, space)
            answer = cache[fact.obj]
            if answer is None:
                report._skip("object_unknown_tokens", origin)
                continue
            if len(answer) > max_answer_tokens:
                report._skip("object_too_long", f"{origin} ({len(answer)} tokens)")
                continue
            if sentence.count(MASK) != 1:
                report._skip("mask_count", origin)
                continue
            text = sentence
            if causal:
                before, after = sentence.split(MASK)
                if not _TRAILING_PUNCTUATION.match(after):
                    report._skip("answer_not_last", origin)
                    continue
                text = before.rstrip()
                if not text and not begins:
                    report._skip("empty_prefix", origin)
                    continue
            prompts.append(Prompt(f_idx, rel_index[fact.relation], tuple(answer), text))
    return prompts


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer starts a text with its beginning-of-sequence token (Llama's do,
    GPT-2's does not): a causal prefix starts with it, and then may be empty. Anything a
    tokenizer appends (an end-of-sequence token) never enters a prefix."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]


def _masked_text(text: str, tokenizer: Any, count: int, space_prefixed: bool) -> str:
    """``text`` with its ``[MASK]`` replaced by ``count`` mask tokens (for a space-prefixed
    tokenizer the space before it folds into the first, as :mod:`lamp_jax.data.encode` does)."""
    masks = tokenizer.mask_token * count
    if space_prefixed:
        return re.sub(r"\s*" + re.escape(MASK), lambda _: masks, text)
    return text.replace(MASK, masks)


def _read(tokenizer: Any, text: str, answer: Sequence[int], causal: bool,
          space_prefixed: bool, masks: int | None = None) -> tuple[list[int], list[int]] | None:
    """Token ids of ``text`` as the model reads it with ``answer`` (masked: ``masks`` mask
    tokens, default as many as the answer has; causal: prefix + answer), and the positions
    whose logits predict the answer's tokens; None when the masks do not come out as asked."""
    if causal:
        prefix = ([tokenizer.bos_token_id] if adds_bos(tokenizer) else []) + (
            list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else [])
        ids = prefix + list(answer[:-1])
        return ids, [len(prefix) - 1 + j for j in range(len(answer))]
    count = len(answer) if masks is None else masks
    ids = list(tokenizer(_masked_text(text, tokenizer, count, space_prefixed),
                         add_special_tokens=True)["input_ids"])
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_token_id]
    return (ids, positions) if len(positions) == count else None


def encode_answers(
    facts: Sequence[Fact],
    tokenizer: Any,
    relations: Sequence[str],
    *,
    causal: bool,
    max_length: int = 64,
    max_answer_tokens: int = 5,
    labels: Mapping[str, str] | None = None,
) -> tuple[EncodedPrompts, EncodeReport]:
    """Training rows of every answerable sentence (module docstring), with each row's text as
    the model reads it (``texts``, which :func:`scoring_rows` reads again), and the report of
    what was skipped and why."""
    relations = tuple(relations)
    if not causal and tokenizer.mask_token_id is None:
        raise ValueError("tokenizer has no mask token")
    space = is_space_prefixed(tokenizer)
    report = EncodeReport(facts=len(facts), space_prefixed=space,
                          skipped=dict.fromkeys(ANSWER_SKIP_REASONS, 0),
                          examples={k: [] for k in ANSWER_SKIP_REASONS})
    prompts = _kept_prompts(facts, tokenizer, relations, causal, max_answer_tokens, report)
    rows, kept, texts = [], [], []
    for prompt in prompts:
        read = _read(tokenizer, prompt.text, prompt.answer, causal, space)
        origin = f"{relations[prompt.relation]}: {prompt.text!r}"
        if read is None:
            report._skip("mask_count", origin)
            continue
        if len(read[0]) > max_length:
            report._skip("too_long", f"{origin} ({len(read[0])} tokens)")
            continue
        rows.append(read)
        kept.append(prompt)
        texts.append(prompt.text)
    encoded = _pad_rows(rows, kept, tokenizer, relations, max_length, max_answer_tokens, labels)
    encoded = dataclasses.replace(encoded, texts=tuple(texts))
    report.kept, report.seq_len = len(kept), encoded.seq_len
    counts = collections.Counter(p.relation for p in kept)
    report.kept_per_relation = {r: counts.get(i, 0) for i, r in enumerate(relations)}
    return encoded, report


def _pad_rows(rows, kept, tokenizer, relations, max_length, width, labels) -> EncodedPrompts:
    n = len(rows)
    seq_len = min(_round_up(max((len(ids) for ids, _ in rows), default=1), 8), max_length)
    input_ids = np.full((n, seq_len), tokenizer.pad_token_id or 0, np.int32)
    attention = np.zeros((n, seq_len), np.int32)
    positions = np.zeros((n, width), np.int32)
    obj = np.zeros((n, width), np.int32)
    obj_mask = np.zeros((n, width), np.float32)
    for i, ((ids, pos), prompt) in enumerate(zip(rows, kept, strict=True)):
        input_ids[i, :len(ids)], attention[i, :len(ids)] = ids, 1
        m = len(prompt.answer)
        positions[i, :m], positions[i, m:] = pos, pos[0]  # padding reads a real position
        obj[i, :m], obj_mask[i, :m] = prompt.answer, 1.0
    return EncodedPrompts(
        input_ids=input_ids, attention_mask=attention, mask_pos=positions, obj_id=obj,
        relation=np.asarray([p.relation for p in kept], np.int32).reshape(n),
        fact_index=np.asarray([p.fact for p in kept], np.int32).reshape(n),
        relations=tuple(relations),
        relation_labels={r: labels[r] for r in relations if r in (labels or {})},
        obj_mask=obj_mask)


def candidates_of(splits: Mapping[str, EncodedPrompts], facts: Sequence[Fact]) -> Candidates:
    """Per relation, every object its prompts have in any split (sorted by text), as token
    sequences: what a ranking of answers of any length chooses among."""
    first = next(iter(splits.values()))
    objects: list[dict[tuple[int, ...], str]] = [{} for _ in first.relations]
    for encoded in splits.values():
        for r, f, ids, mask in zip(encoded.relation, encoded.fact_index, encoded.obj_id,
                                   encoded.obj_mask, strict=True):
            objects[int(r)].setdefault(tuple(ids[mask > 0].tolist()), facts[int(f)].obj)
    width = first.obj_id.shape[1]
    ordered = [sorted(o.items(), key=lambda item: (item[1], item[0])) for o in objects]
    most = max((len(o) for o in ordered), default=1) or 1
    ids = np.zeros((len(ordered), most, width), np.int32)
    length = np.zeros((len(ordered), most), np.int32)
    for r, items in enumerate(ordered):
        for c, (tokens, _) in enumerate(items):
            ids[r, c, :len(tokens)], length[r, c] = tokens, len(tokens)
    return Candidates(ids, length, tuple(tuple(text for _, text in o) for o in ordered))


def gold_candidates(encoded: EncodedPrompts, candidates: Candidates) -> np.ndarray:
    """``[N]`` each row's object as an index into its relation's candidates."""
    index = candidates.index()
    return np.asarray([index[int(r)][tuple(ids[mask > 0].tolist())] for r, ids, mask in zip(
        encoded.relation, encoded.obj_id, encoded.obj_mask, strict=True)], np.int64)


@dataclasses.dataclass(frozen=True)
class ScoringRows:
    """Inputs that score candidates: row ``i`` (of relation ``relation[i]``, for prompt
    ``prompt[i]``) is read by the model, and each candidate ``cand[i, k] >= 0`` gets the sum of
    the log-probabilities of its tokens at ``positions[i, :length]``."""

    input_ids: np.ndarray  # [M, L]
    attention_mask: np.ndarray  # [M, L]
    positions: np.ndarray  # [M, T]
    cand: np.ndarray  # [M, K] candidate indices into the relation's list, -1 = none
    relation: np.ndarray  # [M]
    prompt: np.ndarray  # [M] the row of the split's EncodedPrompts it scores

    def __len__(self) -> int:
        return len(self.relation)


def scoring_rows(encoded: EncodedPrompts, tokenizer: Any, candidates: Candidates,
                 causal: bool) -> list[ScoringRows]:
    """The rows that score every candidate of each prompt's relation (module docstring),
    grouped by how many candidates a row scores (a masked LM: the relation's candidates of one
    length; a causal LM: its one-token ones, then one longer candidate per row)."""
    space = is_space_prefixed(tokenizer)
    width = candidates.ids.shape[2]
    groups: dict[str, list[tuple[list[int], list[int], list[int], int, int]]] = {
        "shared": [], "own": []}
    for p, (relation, text) in enumerate(zip(encoded.relation, encoded.texts, strict=True)):
        r = int(relation)
        lengths = candidates.length[r]
        for m in sorted(set(lengths[lengths > 0].tolist())):
            members = np.flatnonzero(lengths == m).tolist()
            if causal and m > 1:
                for c in members:
                    ids, pos = _read(tokenizer, text, candidates.ids[r, c, :m].tolist(), True,
                                     space)
                    groups["own"].append((ids, pos, [c], r, p))
                continue
            read = _read(tokenizer, text, [0] * m, causal, space, masks=None if causal else m)
            if read is not None:
                groups["shared"].append((read[0], read[1], members, r, p))
    out = []
    for rows in groups.values():
        if not rows:
            continue
        seq = max(encoded.seq_len, _round_up(max(len(ids) for ids, *_ in rows), 8))
        most = max(len(c) for _, _, c, _, _ in rows)
        n = len(rows)
        input_ids = np.full((n, seq), tokenizer.pad_token_id or 0, np.int32)
        attention = np.zeros((n, seq), np.int32)
        positions = np.zeros((n, width), np.int32)
        cand = np.full((n, most), -1, np.int32)
        for i, (ids, pos, members, _, _) in enumerate(rows):
            input_ids[i, :len(ids)], attention[i, :len(ids)] = ids, 1
            positions[i, :len(pos)], positions[i, len(pos):] = pos, pos[0]
            cand[i, :len(members)] = members
        out.append(ScoringRows(input_ids, attention, positions, cand,
                               np.asarray([r for *_, r, _ in rows], np.int32),
                               np.asarray([p for *_, p in rows], np.int32)))
    return out


def prompt_rows(prompt: str, relation: int, num_relations: int, tokenizer: Any,
                candidates: Candidates, causal: bool) -> list[ScoringRows]:
    """:func:`scoring_rows` of one prompt (``[MASK]`` where the answer goes) against relation
    ``relation``'s candidates: what ``load_run(...).predict`` ranks. A causal LM reads the text
    before ``[MASK]``, which must end it (punctuation aside)."""
    from lamp_jax.errors import UsageError

    text = prompt
    if causal:
        before, after = prompt.split(MASK)
        if not _TRAILING_PUNCTUATION.match(after):
            raise UsageError(f"a causal LM reads the answer after the prompt: [MASK] must end "
                             f"it (punctuation aside): {prompt!r}")
        text = before.rstrip()
    one = EncodedPrompts(
        input_ids=np.zeros((1, 8), np.int32), attention_mask=np.zeros((1, 8), np.int32),
        mask_pos=np.zeros((1, candidates.ids.shape[2]), np.int32),
        obj_id=np.zeros((1, candidates.ids.shape[2]), np.int32),
        relation=np.asarray([relation], np.int32), fact_index=np.zeros(1, np.int32),
        relations=tuple(str(i) for i in range(num_relations)), texts=(text,))
    return scoring_rows(one, tokenizer, candidates, causal)
