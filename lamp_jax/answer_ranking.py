"""Ranking answers of any length: each candidate of a prompt's relation scored by the sum of its
tokens' log-probabilities, the object ranked among them (:mod:`lamp_jax.data.answers` builds
the rows that score them).

* rank of a prompt = 1 + the number of its relation's candidates scored strictly higher than
  its object (ties do not push it down, as :mod:`lamp_jax.ranking` counts);
* P@k, MRR, micro and macro as :class:`~lamp_jax.ranking.RankingResult` defines them.

A batch (``[R, B, ...]``, relation r's rows in slot r) holds ``input_ids``,
``attention_mask``, ``positions`` ``[R, B, T]`` (where the logits predicting each answer token
are read), ``cand_ids`` ``[R, B, K, T]`` and ``cand_len`` ``[R, B, K]`` (the candidates the row
scores), ``weight``, and on the host only ``prompt`` (the prompt's row in its split), ``cand``
(the candidates' indices in the relation's list) and ``gold`` (the prompt's object's index).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.data.answers import Candidates, ScoringRows
from lamp_jax.hosts import to_host
from lamp_jax.masks import MaskMode, apply_masks
from lamp_jax.models import ModelConfig, mlm_forward
from lamp_jax.prefix import check_start_layer
from lamp_jax.ranking import DEFAULT_KS, RankingResult
from lamp_jax.relation_map import map_relations

HOST_KEYS = ("index", "prompt", "cand", "gold")


def batch_candidate_scores(
    mask_logits: Any | None,
    frozen_params: Any,
    batch: dict[str, jax.Array],
    *,
    model_config: ModelConfig,
    mode: MaskMode,
    relation_chunk: int | None = None,
    dtype: Any = jnp.float32,
    start_layer: int = 0,
    relation_shards: int = 1,
) -> dict[str, jax.Array]:
    """``scores`` ``[R, B, K]``: each candidate's summed token log-probability (``-inf`` where
    a row holds no candidate). ``mask_logits=None``: the full model."""
    if mask_logits is not None:
        check_start_layer(mask_logits, start_layer)

    def with_params(params, b):
        logits = mlm_forward(params, b["input_ids"], b["attention_mask"], config=model_config,
                             output_positions=b["positions"], dtype=dtype,
                             hidden=b["hidden"] if start_layer else None,
                             start_layer=start_layer)["logits"]  # [B, T, V]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tokens = jnp.take_along_axis(logp[:, None], b["cand_ids"][..., None], axis=-1)[..., 0]
        real = jnp.arange(tokens.shape[-1]) < b["cand_len"][..., None]  # [B, K, T]
        scores = jnp.sum(jnp.where(real, tokens, 0.0), axis=-1)
        return {"scores": jnp.where(b["cand_len"] > 0, scores, -jnp.inf)}

    if mask_logits is None:
        return jax.vmap(partial(with_params, frozen_params))(batch)
    return map_relations(lambda g, b: with_params(apply_masks(frozen_params, g, mode), b),
                         relation_chunk, relation_shards)(mask_logits, batch)


def make_candidate_fn(model_config: ModelConfig, mode: MaskMode,
                      relation_chunk: int | None = None, dtype: Any = jnp.float32,
                      start_layer: int = 0, relation_shards: int = 1):
    """Jitted :func:`batch_candidate_scores` (one per configuration, as
    :func:`lamp_jax.ranking.make_rank_fn`)."""
    return _candidate_fn(model_config, mode, relation_chunk, jnp.dtype(dtype), start_layer,
                         relation_shards)


@lru_cache(maxsize=32)
def _candidate_fn(model_config, mode, relation_chunk, dtype, start_layer, relation_shards):
    return jax.jit(partial(batch_candidate_scores, model_config=model_config, mode=mode,
                           relation_chunk=relation_chunk, dtype=dtype, start_layer=start_layer,
                           relation_shards=relation_shards))


def evaluate_candidates(score_fn, mask_logits: Any | None, frozen_params: Any,
                        batches: Sequence[dict[str, np.ndarray]], relations: Sequence[str],
                        ks: Sequence[int] = DEFAULT_KS, put_batch=None) -> RankingResult:
    """:func:`candidate_result` of ``score_fn``'s scores of every batch."""
    def device(batch):
        arrays = {k: v for k, v in batch.items() if k not in HOST_KEYS}
        return put_batch(arrays) if put_batch else arrays

    scores = [to_host(score_fn(mask_logits, frozen_params, device(b))["scores"])
              for b in batches]
    return candidate_result(batches, scores, relations, ks)


def candidate_result(batches: Sequence[dict[str, np.ndarray]], scores: Sequence[np.ndarray],
                     relations: Sequence[str], ks: Sequence[int] = DEFAULT_KS) -> RankingResult:
    """Every prompt's rank among its relation's candidates, from all rows that score them
    (``scores[i]``: batch i's ``[R, B, K]``), as a :class:`RankingResult` per slot of the
    relation axis (the slot a prompt's rows sit in: its own relation, unless the caller moved
    the rows), which is its own typed result."""
    num = len(relations)
    index, values = [], []
    for batch, score in zip(batches, scores, strict=True):
        real = (batch["weight"][:num] > 0)[..., None] & (batch["cand"][:num] >= 0)
        slot = np.broadcast_to(np.arange(num)[:, None, None], real.shape)
        prompt = np.broadcast_to(batch["prompt"][:num][..., None], real.shape)
        gold = np.broadcast_to(batch["gold"][:num][..., None], real.shape)
        index.append(np.stack([prompt[real], batch["cand"][:num][real], slot[real],
                               gold[real]]).astype(np.int64))
        values.append(np.asarray(score)[:num][real])
    if not index or not sum(v.size for v in values):
        return RankingResult.from_sums(relations, ks, {})
    index, values = np.concatenate(index, axis=1), np.concatenate(values).astype(np.float64)
    prompts = int(index[0].max()) + 1
    table = np.full((prompts, int(max(index[1].max(), index[3].max())) + 1), -np.inf)
    table[index[0], index[1]] = values
    slot_of, gold_of = np.zeros(prompts, np.int64), np.zeros(prompts, np.int64)
    seen = np.zeros(prompts, bool)
    slot_of[index[0]], gold_of[index[0]], seen[index[0]] = index[2], index[3], True
    gold_score = table[np.arange(prompts), gold_of]
    rank = 1 + np.sum(table > gold_score[:, None], axis=1)
    result = RankingResult.from_ranks(relations, ks, rank[seen], slot_of[seen])
    ranks = np.zeros(prompts, np.int64)
    ranks[seen] = rank[seen]
    result.prompt_ranks = {"rank": ranks}
    result.typed = result
    return result


def scoring_batches(rows: Sequence[ScoringRows], candidates: Candidates, gold: np.ndarray,
                    num_relations: int, batch_size: int,
                    features: Sequence[dict[str, np.ndarray]] | None = None
                    ) -> list[dict[str, np.ndarray]]:
    """Evaluation batches ``[R, B, ...]`` of scoring rows (module docstring), relation r's rows
    in slot r, each group of rows (one per shape of its candidate list) in batches of its own.
    ``gold``: ``[N]`` each prompt's object's candidate index; ``features``: per group, more
    per-row arrays (the frozen prefix, ``hidden``)."""
    batches = []
    for g, group in enumerate(rows):
        per_relation = [np.flatnonzero(group.relation == r) for r in range(num_relations)]
        steps = max((-(-len(p) // batch_size) for p in per_relation), default=0)
        extra = {} if features is None else features[g]
        for step in range(steps):
            index = np.full((num_relations, batch_size), -1, np.int64)
            for r, members in enumerate(per_relation):
                chunk = members[step * batch_size:(step + 1) * batch_size]
                index[r, :len(chunk)] = chunk
            take = np.where(index >= 0, index, np.maximum(index.max(axis=1, keepdims=True), 0))
            take = np.where(take >= 0, take, 0)
            cand = group.cand[take]
            rel = group.relation[take]
            safe = np.maximum(cand, 0)
            batches.append({
                "input_ids": group.input_ids[take], "attention_mask": group.attention_mask[take],
                "positions": group.positions[take],
                "cand_ids": candidates.ids[rel[..., None], safe],
                "cand_len": np.where(cand >= 0, candidates.length[rel[..., None], safe], 0)
                .astype(np.int32),
                "weight": (index >= 0).astype(np.float32),
                "prompt": group.prompt[take], "cand": np.where(index[..., None] >= 0, cand, -1),
                "gold": gold[group.prompt[take]],
                **{k: v[take] for k, v in extra.items()},
            })
    return batches
