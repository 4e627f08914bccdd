"""Ranking metrics of the object token at [MASK]: P@k, MRR, per relation, pooled and macro.

Definitions (once, here; the reference swapped macro and micro and double-counted the pooled
denominator):

* rank of a prompt = 1 + number of vocabulary entries scored strictly higher than the object;
* P@k of a relation = fraction of its prompts with rank <= k; MRR = mean of 1 / rank;
* **micro** (pooled) = over all prompts of all relations; **macro** = mean over relations of the
  per-relation value (relations without prompts are left out of the mean).

Token ids are compared, never decoded strings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.hosts import to_host
from lamp_jax.masks import MaskMode, apply_masks
from lamp_jax.models import ModelConfig, mlm_forward
from lamp_jax.prefix import check_start_layer
from lamp_jax.relation_map import map_relations

DEFAULT_KS = (1, 2, 3, 5, 10)


def _logits_at_mask(params, batch, model_config, dtype, start_layer):
    return mlm_forward(params, batch["input_ids"], batch["attention_mask"], config=model_config,
                       output_positions=batch["mask_pos"], dtype=dtype,
                       hidden=batch["hidden"] if start_layer else None,
                       start_layer=start_layer)["logits"]


def object_rank(logits: jax.Array, obj_id: jax.Array) -> jax.Array:
    """``[B]`` rank of each row's object: 1 + the number of tokens scored strictly higher (a
    tie with the object does not push it down)."""
    target = jnp.take_along_axis(logits, obj_id[:, None], axis=-1)
    return 1 + jnp.sum(logits > target, axis=-1)


def restricted_rank(logits: jax.Array, obj_id: jax.Array, candidates: jax.Array,
                    outside: str = "ranked") -> jax.Array:
    """``[B]`` 1 + the number of candidates scored strictly higher than the object (the tie
    convention of :func:`object_rank`), over ``candidates`` ``[V]`` or ``[B, V]`` (bool).

    ``outside`` says what an object that is not a candidate gets: ``"ranked"`` ranks it among
    the candidates all the same (it gets rank 1 when it outscores every candidate, although a
    prediction restricted to the set could not name it); ``"last"`` places it after every
    candidate (rank = number of candidates + 1), so it is never within P@k for k up to the
    set's size, as for a model that can only answer with a candidate.
    """
    if outside not in ("ranked", "last"):
        raise ValueError(f"outside must be 'ranked' or 'last', not {outside!r}")
    candidates = jnp.broadcast_to(jnp.asarray(candidates, bool), logits.shape)
    target = jnp.take_along_axis(logits, obj_id[:, None], axis=-1)
    rank = 1 + jnp.sum((logits > target) & candidates, axis=-1)
    if outside == "last":
        is_candidate = jnp.take_along_axis(candidates, obj_id[:, None], axis=-1)[:, 0]
        rank = jnp.where(is_candidate, rank, 1 + jnp.sum(candidates, axis=-1))
    return rank


def batch_rank_stats(
    mask_logits: Any | None,
    frozen_params: Any,
    batch: dict[str, jax.Array],
    *,
    model_config: ModelConfig,
    mode: MaskMode,
    ks: Sequence[int] = DEFAULT_KS,
    relation_chunk: int | None = None,
    dtype: Any = jnp.float32,
    start_layer: int = 0,
    relation_shards: int = 1,
) -> dict[str, jax.Array]:
    """Per-relation sums over one ``[R, B, ...]`` batch: ``hits`` [R, K], ``rr`` [R], ``count`` [R].

    ``mask_logits=None`` evaluates the full (unpruned) model on every relation's prompts.
    Also returns ``rank`` [R, B] (0 where the row is padding) for per-prompt analyses. A batch
    that carries ``candidates`` [R, V] (bool: the answers each relation can have) also gets
    the *typed* ranking among them (:func:`restricted_rank`, an object outside the set placed
    last): ``typed_hits``, ``typed_rr`` and ``typed_rank``, from the same forward pass.
    ``start_layer`` > 0: the batch carries ``hidden`` [R, B, L, H], the frozen output of layer
    ``start_layer - 1`` (:mod:`lamp_jax.prefix`), and the forward pass starts there.
    ``relation_chunk`` relations per device at a time, over ``relation_shards`` devices
    (:func:`lamp_jax.relation_map.map_relations`).
    """
    if mask_logits is not None:
        check_start_layer(mask_logits, start_layer)

    def with_params(params, b):
        logits = _logits_at_mask(params, b, model_config, dtype, start_layer)
        rank = object_rank(logits, b["obj_id"])
        w = b["weight"].astype(jnp.float32)
        hits = jnp.stack([jnp.sum((rank <= k) * w) for k in ks])
        out = {"hits": hits, "rr": jnp.sum(w / rank), "count": jnp.sum(w),
               "rank": jnp.where(w > 0, rank, 0)}
        if "candidates" in b:
            typed = restricted_rank(logits, b["obj_id"], b["candidates"], outside="last")
            out.update(typed_hits=jnp.stack([jnp.sum((typed <= k) * w) for k in ks]),
                       typed_rr=jnp.sum(w / typed), typed_rank=jnp.where(w > 0, typed, 0))
        return out

    if mask_logits is None:
        return jax.vmap(partial(with_params, frozen_params))(batch)
    return map_relations(lambda g, b: with_params(apply_masks(frozen_params, g, mode), b),
                         relation_chunk, relation_shards)(mask_logits, batch)


@dataclasses.dataclass
class RankingResult:
    """Metrics of one evaluation. Arrays are per relation, in ``relations`` order."""

    relations: tuple[str, ...]
    ks: tuple[int, ...]
    hits: np.ndarray  # [R, K] number of prompts with rank <= k
    reciprocal_rank_sum: np.ndarray  # [R]
    count: np.ndarray  # [R]
    # Per prompt (row of the split's encoded prompts): "rank" and, with candidates,
    # "typed_rank"; 0 for rows no batch held.
    prompt_ranks: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    typed: RankingResult | None = None  # the ranking among each relation's candidates

    @classmethod
    def from_sums(cls, relations: Sequence[str], ks: Sequence[int],
                  sums: dict[str, np.ndarray],
                  prompt_ranks: dict[str, np.ndarray] | None = None) -> RankingResult:
        """From :func:`sum_rank_stats` (no batches: all zero), the first ``len(relations)``
        entries of the relation axis; with ``typed_*`` sums, also the typed result."""
        num = len(relations)
        if not sums:
            return cls(tuple(relations), tuple(ks), np.zeros((num, len(ks))), np.zeros(num),
                       np.zeros(num))
        typed = None
        if "typed_hits" in sums:
            typed = cls(tuple(relations), tuple(ks), sums["typed_hits"][:num],
                        sums["typed_rr"][:num], sums["count"][:num],
                        {"rank": prompt_ranks["typed_rank"]} if prompt_ranks else {})
        return cls(tuple(relations), tuple(ks), sums["hits"][:num], sums["rr"][:num],
                   sums["count"][:num], dict(prompt_ranks or {}), typed)

    @classmethod
    def from_ranks(cls, relations: Sequence[str], ks: Sequence[int], rank: np.ndarray,
                   relation: np.ndarray) -> RankingResult:
        """From per-prompt ranks ``[N]`` and each prompt's relation index (a ranking computed
        without the model, e.g. the relation prior)."""
        num = len(relations)
        rank, relation = np.asarray(rank, np.float64), np.asarray(relation)
        hits = np.stack([np.bincount(relation, rank <= k, num) for k in ks], axis=1)
        return cls(tuple(relations), tuple(ks), hits, np.bincount(relation, 1 / rank, num),
                   np.bincount(relation, minlength=num).astype(np.float64), {"rank": rank})

    def precision_at(self, k: int) -> np.ndarray:
        """[R] P@k per relation (NaN for relations without prompts)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.hits[:, self.ks.index(k)] / self.count

    def mrr(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.reciprocal_rank_sum / self.count

    def micro(self, k: int = 1) -> float:
        """Pooled P@k: correct over all prompts of all relations."""
        return float(self.hits[:, self.ks.index(k)].sum() / max(self.count.sum(), 1))

    def macro(self, k: int = 1) -> float:
        """Mean over relations (with prompts) of per-relation P@k."""
        return float(np.nanmean(self.precision_at(k)))

    def summary(self) -> dict[str, Any]:
        per_relation = {
            r: {**{f"P@{k}": float(self.precision_at(k)[i]) for k in self.ks},
                "MRR": float(self.mrr()[i]), "count": int(self.count[i])}
            for i, r in enumerate(self.relations) if self.count[i] > 0
        }
        return {
            **{f"micro_P@{k}": self.micro(k) for k in self.ks},
            **{f"macro_P@{k}": self.macro(k) for k in self.ks},
            "micro_MRR": float(self.reciprocal_rank_sum.sum() / max(self.count.sum(), 1)),
            "macro_MRR": float(np.nanmean(self.mrr())),
            "count": int(self.count.sum()),
            "per_relation": per_relation,
        }


def make_rank_fn(model_config: ModelConfig, mode: MaskMode, ks: Sequence[int] = DEFAULT_KS,
                 relation_chunk: int | None = None, dtype: Any = jnp.float32,
                 start_layer: int = 0, relation_shards: int = 1):
    """Jitted :func:`batch_rank_stats` with its configuration bound; the same configuration
    gets the same jitted function, so training's dev evaluation and the final report share
    one compilation."""
    return _rank_fn(model_config, mode, tuple(ks), relation_chunk, jnp.dtype(dtype), start_layer,
                    relation_shards)


@lru_cache(maxsize=32)
def _rank_fn(model_config, mode, ks, relation_chunk, dtype, start_layer, relation_shards):
    return jax.jit(partial(batch_rank_stats, model_config=model_config, mode=mode, ks=ks,
                           relation_chunk=relation_chunk, dtype=dtype, start_layer=start_layer,
                           relation_shards=relation_shards))


def evaluate(
    rank_fn,
    mask_logits: Any | None,
    frozen_params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    relations: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
    put_batch=None,
) -> RankingResult:
    """Accumulates :func:`batch_rank_stats` over batches (e.g. ``batcher.eval_batches()``),
    with each prompt's rank by the batches' ``index`` (the prompt's row; -1 for padding).

    ``ks`` must be the ones ``rank_fn`` was made with. ``put_batch`` may pad the relation axis
    with inert slots (:func:`lamp_jax.placement.shard_batch`); only the first
    ``len(relations)`` are counted.
    """
    num, totals, ranks = len(relations), [], []
    for batch in batches:
        stats = rank_fn(mask_logits, frozen_params,
                        put_batch(_arrays(batch)) if put_batch else _arrays(batch))
        totals.append(stats)
        if "index" in batch:
            ranks.append((batch["index"][:num], to_host(
                {k: stats[k][:num] for k in ("rank", "typed_rank") if k in stats})))
    return RankingResult.from_sums(relations, ks, sum_rank_stats(totals),
                                   _by_row(ranks) if ranks else None)


def _by_row(ranks: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Per-prompt values scattered to their rows (``index`` -1: padding, dropped)."""
    rows = max(int(index.max()) for index, _ in ranks) + 1
    out = {key: np.zeros(rows, np.int64) for key in ranks[0][1]}
    for index, values in ranks:
        real = index >= 0
        for key, value in values.items():
            out[key][index[real]] = value[real]
    return out


def sum_rank_stats(stats: Iterable[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``hits``, ``rr`` and ``count`` (and ``typed_hits``, ``typed_rr``) summed over the
    batches' :func:`batch_rank_stats`, on the host (their relation axis may still hold inert
    slots)."""
    total: dict[str, np.ndarray] = {}
    for batch_stats in stats:
        keys = [k for k in ("hits", "rr", "count", "typed_hits", "typed_rr") if k in batch_stats]
        for key, value in to_host({k: batch_stats[k] for k in keys}).items():
            total[key] = total[key] + value if key in total else value.astype(np.float64)
    return total


def _arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k != "index"}


def specialization_matrix(
    score,
    mask_logits: Any,
    batches: Sequence[dict[str, np.ndarray]],
    relations: Sequence[str],
    on_pass: Callable[[], Any] | None = None,
) -> np.ndarray:
    """``M[a, b]`` = P@1 on relation b's prompts of the subnetwork learned for relation a.
    ``score(mask_logits, batches) -> RankingResult`` evaluates the masks on batches whose
    relation axis is the masks'. The diagonal is each relation's own subnetwork; a specialised
    subnetwork scores lower off the diagonal (the paper's Figure: another relation's mask
    hurts).

    The masks stay where they are; the prompts move. Pass ``k`` rolls the batches' relation
    axis by ``k`` on the host, so that mask a meets relation a + k's prompts, and one
    ordinary evaluation fills the k-th diagonal. R passes fill the matrix, each as light as a
    dev evaluation. (Moving relation a's masks to every relation's slot instead gathered all
    relations' logits onto every device: bert-base x 16 relations on 2 CPU devices, +5 GiB
    per row.) ``on_pass`` is called after each of the R passes (a progress bar).
    """
    num = len(relations)
    matrix = np.zeros((num, num))
    rows = np.arange(num)
    for shift in range(num):
        moved = [{k: np.roll(v[:num], -shift, axis=0) for k, v in batch.items()}
                 for batch in batches]
        matrix[rows, (rows + shift) % num] = score(mask_logits, moved).precision_at(1)
        if on_pass is not None:
            on_pass()
    return matrix
