"""Zero-shot multiple-choice QA (CommonsenseQA, COPA) scored by a masked LM.

Scoring rule: each choice is placed in its context (CommonsenseQA: "<question> <choice>";
COPA: "<premise> because <choice> ." when the question asks for the cause, "<premise> so
<choice> ." for the effect). Its score is the mean over the choice's tokens of
``log P(token | the text with that one token masked)``, i.e. the pseudo-log-likelihood of
Salazar et al. (2020) restricted to the answer and normalised by its length so that long answers
are not penalised. The highest-scoring choice is the prediction.
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.errors import UsageError
from lamp_jax.models import mlm_forward


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    context: str
    choices: tuple[str, ...]
    answer: int
    connective: str = ""  # COPA: "because" / "so"
    suffix: str = ""  # text after the choice (e.g. " ."), part of the context, not scored

    def texts(self) -> list[tuple[str, str, str]]:
        """(text before the choice, choice, text after it) for every choice."""
        prefix = f"{self.context} {self.connective}".strip()
        return [(prefix, c, self.suffix) for c in self.choices]


def read_commonsenseqa(path: str | Path) -> list[Question]:
    """CommonsenseQA jsonl: {"id", "question": {"stem", "choices": [{"label", "text"}]},
    "answerKey"}. A malformed line raises UsageError naming file:line."""
    questions = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = record["question"]["choices"]
            labels = [c["label"] for c in choices]
            questions.append(Question(str(record["id"]), record["question"]["stem"],
                                      tuple(c["text"] for c in choices),
                                      labels.index(record["answerKey"])))
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise UsageError(f"{path}:{lineno}: not a CommonsenseQA record ({err})") from None
    return questions


def read_copa(path: str | Path) -> list[Question]:
    """COPA XML: <item id asks-for="cause|effect" most-plausible-alternative="1|2">
    <p>premise</p><a1>..</a1><a2>..</a2></item>."""
    questions = []
    for item in ET.parse(path).getroot().iter("item"):
        asks = item.get("asks-for")
        if asks not in ("cause", "effect"):
            raise UsageError(f"{path}: item {item.get('id')} asks-for={asks!r}")
        premise = item.findtext("p").strip().rstrip(".")
        choices = tuple(item.findtext(t).strip().rstrip(".") for t in ("a1", "a2"))
        questions.append(Question(item.get("id"), premise, tuple(c[:1].lower() + c[1:]
                                                                 for c in choices),
                                  int(item.get("most-plausible-alternative")) - 1,
                                  "because" if asks == "cause" else "so", " ."))
    return questions


def _masked_copies(tokenizer: Any, prefix: str, choice: str, suffix: str):
    """One copy of "prefix choice suffix" per choice token, that token masked:
    (ids, position, target)."""
    ids = tokenizer(f"{prefix} {choice}{suffix}", add_special_tokens=True)["input_ids"]
    start = len(tokenizer(prefix, add_special_tokens=True)["input_ids"]) - 1  # before [SEP]
    end = len(tokenizer(f"{prefix} {choice}", add_special_tokens=True)["input_ids"]) - 1
    rows = []
    for pos in range(start, end):
        masked = list(ids)
        masked[pos] = tokenizer.mask_token_id
        rows.append((masked, pos, ids[pos]))
    return rows


def score_choices(params: Any, mlm: Any, questions: Sequence[Question],
                  batch_size: int = 64) -> np.ndarray:
    """``[Q, C]`` pseudo-log-likelihood scores (NaN for choices that are absent or empty)."""
    rows, owners = [], []
    for q, question in enumerate(questions):
        for c, (prefix, choice, suffix) in enumerate(question.texts()):
            for row in _masked_copies(mlm.tokenizer, prefix, choice, suffix):
                rows.append(row)
                owners.append((q, c))
    length = -(-max(len(r[0]) for r in rows) // 8) * 8  # one shape for all batches
    if max(len(r[0]) for r in rows) > mlm.config.max_position_embeddings:
        raise ValueError(f"a question is longer than the model's "
                         f"{mlm.config.max_position_embeddings} positions")
    length = min(length, mlm.config.max_position_embeddings)
    pad_id = mlm.tokenizer.pad_token_id
    rows = [(ids + [pad_id] * (length - len(ids)), pos, target) for ids, pos, target in rows]
    forward = jax.jit(lambda p, ids, pos: jax.nn.log_softmax(mlm_forward(
        p, ids, (ids != mlm.config.pad_token_id).astype(jnp.int32), config=mlm.config,
        output_positions=pos, dtype=mlm.dtype)["logits"]))
    logps = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        pad = batch_size - len(chunk)
        chunk = chunk + [chunk[-1]] * pad  # fixed shapes: one compilation
        ids = np.asarray([r[0] for r in chunk], np.int32)
        pos = np.asarray([r[1] for r in chunk], np.int32)
        out = np.asarray(forward(params, ids, pos))
        logps += [out[i, r[2]] for i, r in enumerate(chunk[:batch_size - pad])]
    width = max(len(q.choices) for q in questions)
    sums, counts = np.zeros((len(questions), width)), np.zeros((len(questions), width))
    for (q, c), lp in zip(owners, logps, strict=True):
        sums[q, c] += lp
        counts[q, c] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def accuracy(params: Any, mlm: Any, questions: Sequence[Question], **kwargs) -> float:
    scores = score_choices(params, mlm, questions, **kwargs)
    predicted = np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=1)
    return float(np.mean(predicted == np.asarray([q.answer for q in questions])))
