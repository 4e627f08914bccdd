"""Independent references for the tests: masks applied, prompts ranked and answers scored one
prompt at a time with plain numpy and one unpadded forward pass, without lamp_jax's masking,
batching, sharding or scoring code."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lamp_jax.models import mlm_forward

KeyPath = tuple[str, ...]


def get_path(tree: Mapping[str, Any], path: KeyPath) -> Any:
    return functools.reduce(operator.getitem, path, tree)


def with_multipliers(params: Any, multipliers: Mapping[KeyPath, np.ndarray]) -> Any:
    """A host copy of ``params`` with ``kernel * multiplier`` at each path."""
    out = jax.tree.map(np.asarray, params)  # new dict containers, safe to assign into
    for path, multiplier in multipliers.items():
        node = get_path(out, path[:-1])
        node[path[-1]] = node[path[-1]] * np.asarray(multiplier, node[path[-1]].dtype)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def relation_multipliers(mask_logits: Any, paths: Sequence[KeyPath], relation: int,
                         kind: str) -> dict[KeyPath, np.ndarray]:
    """Relation ``relation``'s multipliers: ``threshold`` 1[sigmoid(G) > 0.5] = 1[G > 0],
    ``expectation`` sigmoid(G)."""
    out = {}
    for path in paths:
        g = np.asarray(get_path(mask_logits, path))[relation].astype(np.float64)
        out[path] = (g > 0).astype(np.float32) if kind == "threshold" else sigmoid(g)
    return out


@functools.lru_cache(maxsize=8)
def forward_fn(model_config) -> Callable:
    """A jitted plain forward pass (every position, no output_positions, no prefix cache); one
    per model config, so that its compilations are shared."""
    return jax.jit(functools.partial(mlm_forward, config=model_config))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    top = x.max()
    return x - (top + np.log(np.exp(x - top).sum()))


def prompt_ranks(forward, params, tokenizer, prompts: Sequence[tuple[str, str]]) -> list:
    """Rank of each ``(sentence, object)``'s object at its [MASK] (1 + tokens scored strictly
    higher), None when the object is not one token (LAMA skips those). Prompts of the same
    length share a forward pass; none is padded."""
    rows = []
    for sentence, obj in prompts:
        ids = tokenizer(sentence.replace("[MASK]", tokenizer.mask_token))["input_ids"]
        target = tokenizer(obj, add_special_tokens=False)["input_ids"]
        ok = len(target) == 1 and ids.count(tokenizer.mask_token_id) == 1
        rows.append((ids, ids.index(tokenizer.mask_token_id), target[0]) if ok else None)
    ranks = [None] * len(rows)
    for length in {len(row[0]) for row in rows if row}:
        same = [i for i, row in enumerate(rows) if row and len(row[0]) == length]
        batch = np.asarray([rows[i][0] for i in same], np.int32)
        logits = np.asarray(forward(params, batch, np.ones_like(batch))["logits"])
        for logits_i, i in zip(logits, same, strict=True):
            _, position, target = rows[i]
            ranks[i] = 1 + int(np.sum(logits_i[position] > logits_i[position, target]))
    return ranks


def metrics_from_ranks(ranks: Mapping[str, Sequence[int]], ks=(1, 2, 3, 5, 10)) -> dict:
    """P@k and MRR per relation, pooled (micro) and mean over relations (macro)."""
    per = {r: np.asarray(v, float) for r, v in ranks.items() if len(v)}
    pooled = np.concatenate(list(per.values()))
    out = {"count": len(pooled), "per_relation": {
        r: {**{f"P@{k}": float(np.mean(v <= k)) for k in ks}, "MRR": float(np.mean(1 / v)),
            "count": len(v)} for r, v in per.items()}}
    for k in ks:
        out[f"micro_P@{k}"] = float(np.mean(pooled <= k))
        out[f"macro_P@{k}"] = float(np.mean([np.mean(v <= k) for v in per.values()]))
    out["micro_MRR"] = float(np.mean(1 / pooled))
    out["macro_MRR"] = float(np.mean([np.mean(1 / v) for v in per.values()]))
    return out


def pseudo_log_likelihood(forward, params, tokenizer, before: str, choice: str,
                          after: str) -> float:
    """Mean over the choice's tokens of log P(token | the text with that token masked), the
    text being [CLS] before choice after [SEP] (each piece tokenized on its own)."""
    def pieces(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []

    head, answer, tail = pieces(before), pieces(choice), pieces(after)
    ids = [tokenizer.cls_token_id, *head, *answer, *tail, tokenizer.sep_token_id]
    logps = []
    for j, target in enumerate(answer):
        position = 1 + len(head) + j
        masked = np.asarray([ids], np.int32)
        masked[0, position] = tokenizer.mask_token_id
        logits = forward(params, masked, np.ones_like(masked))["logits"][0, position]
        logps.append(log_softmax(logits)[target])
    return float(np.mean(logps)) if logps else float("nan")


def typed_top(forward, params, tokenizer, prompts: Sequence[tuple[str, str]],
              candidates: Sequence[int]) -> list:
    """For each ``(sentence, object)``: whether the object is the argmax at [MASK] over the
    token ids ``candidates`` only (False when the object is not one of them), None when the
    object is not one token. One unpadded forward pass per prompt."""
    allowed = np.asarray(sorted(set(candidates)))
    out = []
    for sentence, obj in prompts:
        ids = tokenizer(sentence.replace("[MASK]", tokenizer.mask_token))["input_ids"]
        target = tokenizer(obj, add_special_tokens=False)["input_ids"]
        if len(target) != 1 or ids.count(tokenizer.mask_token_id) != 1:
            out.append(None)
            continue
        batch = np.asarray([ids], np.int32)
        logits = np.asarray(forward(params, batch, np.ones_like(batch))["logits"])[0]
        scores = logits[ids.index(tokenizer.mask_token_id), allowed]
        out.append(bool(allowed[int(np.argmax(scores))] == target[0]))
    return out
