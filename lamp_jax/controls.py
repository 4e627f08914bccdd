"""What a run's masks found, against the controls that could explain it, on a held-out split.

A subnetwork that answers relation r's prompts better than the full model could owe it to
* knowing which answers r takes, not the facts: the **relation prior** (r's most frequent
  training object for every prompt) and the **typed** rankings, the full model's and the
  subnetwork's, restricted to the answers r can have (its training objects; under the
  ``object_disjoint`` protocol every object r has, as LAMA's common vocabulary);
* pruning as such: **random masks** pruning exactly as many weights of each (relation, layer,
  matrix) as the learned mask (``controls.random_draws`` draws), and **magnitude masks** pruning
  that many of the smallest ``|W|``;
* chance: every difference the report states comes with a 95% interval from a paired bootstrap
  over held-out facts (a fact's sentences resample together; :mod:`lamp_jax.analysis.evidence`).
A model that knows nothing (``config.model_weights="random"``, a run of its own) is the last
control: ``python -m lamp_jax.report --workdir A --control B`` sets it beside the run.

The controls reuse the run's ranking: the typed ranks come from the same forward passes as the
plain ones (:func:`lamp_jax.ranking.batch_rank_stats`), and a control mask is evaluated as mask
logits (+1 kept, -1 pruned around the threshold) by the run's jitted binary ranking, so no new
program is compiled. Also here: how much the relations' pruned sets overlap, against the overlap
of independent random sets of the same sizes (:mod:`lamp_jax.analysis.stability`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lamp_jax.analysis.baselines import object_fact_counts, prior_ranks
from lamp_jax.analysis.control_masks import magnitude_masks, pruned_counts, random_subset_mask
from lamp_jax.analysis.evidence import paired_bootstrap
from lamp_jax.analysis.stability import overlap_between_relations
from lamp_jax.data.answers import gold_candidates
from lamp_jax.hosts import put_global, to_host
from lamp_jax.masks import logit
from lamp_jax.placement import relation_sharding
from lamp_jax.ranking import DEFAULT_KS, RankingResult


def as_mask_logits(multipliers: Any, threshold: float) -> Any:
    """0/1 multipliers as mask logits a threshold ranking reads back exactly: kept entries
    1 above ``logit(threshold)``, pruned ones 1 below (numpy in, numpy out)."""
    xp = np if isinstance(jax.tree.leaves(multipliers)[0], np.ndarray) else jnp
    return jax.tree.map(lambda m: (xp.where(m > 0, 1.0, -1.0) + logit(threshold)).astype(
        np.float32), multipliers)


def random_mask_logits(rng: np.random.Generator, best: Any, threshold: float,
                       mesh: jax.sharding.Mesh) -> Any:
    """One draw of random masks at the learned pruned count per (relation, matrix)
    (:func:`~lamp_jax.analysis.control_masks.random_subset_mask`), as mask logits on the mesh.
    Drawn and placed one leaf at a time: the host holds one leaf, not a copy of the masks
    (Qwen2.5-0.5B's 179 M weights per relation: 0.7 GB per relation as float32)."""
    counts = to_host(pruned_counts(best, threshold))

    def leaf(g, k):
        n = int(np.prod(g.shape[1:]))
        host = np.stack([random_subset_mask(rng, n, int(k_r)).reshape(g.shape[1:])
                         for k_r in k])
        return put_global(as_mask_logits(host, threshold), relation_sharding(mesh))

    return jax.tree.map(leaf, best, counts)


@partial(jax.jit, static_argnames="threshold")
def magnitude_mask_logits(frozen_params: Any, best: Any, threshold: float) -> Any:
    """Magnitude masks at the learned pruned count, as mask logits, in one program (no copy of
    the 0/1 masks beside them)."""
    return as_mask_logits(magnitude_masks(frozen_params, best, threshold), threshold)


def control_rankings(setup: Any, best: Any, split: str, draws: int, seed: int
                     ) -> dict[str, RankingResult | list[RankingResult]]:
    """The rankings of the control masks on ``split``: ``random`` (``draws`` of them, drawn on
    the host from ``seed``) and ``magnitude``, each at the learned binary masks' pruned count
    per (relation, matrix); and the ``prior``'s, which needs no model."""
    threshold = setup.mode.threshold
    rng = np.random.default_rng((seed, 7))
    random = [setup.scores(random_mask_logits(rng, best, threshold, setup.mesh), split,
                           "threshold") for _ in range(draws)]
    magnitude = setup.scores(magnitude_mask_logits(setup.frozen, best, threshold), split,
                             "threshold")
    train, held = setup.data.splits["train"], setup.data.splits[split]
    # The prior ranks what the run ranks: the vocabulary, or each relation's candidates.
    candidates = setup.data.candidates
    answer = ((lambda e: e.obj_id) if candidates is None
              else (lambda e: gold_candidates(e, candidates)))
    size = setup.mlm.config.vocab_size if candidates is None else candidates.ids.shape[1]
    counts = object_fact_counts(train.relation, answer(train), train.fact_index,
                                len(setup.relations), size)
    prior = RankingResult.from_ranks(setup.relations, random[0].ks if random else DEFAULT_KS,
                                     prior_ranks(counts, held.relation, answer(held)),
                                     held.relation)
    return {"random": random, "magnitude": magnitude, "prior": prior}


def control_report(setup: Any, best: Any, split: str, full: RankingResult,
                   pruned: RankingResult) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``controls`` of ``metrics.json`` for the run's best masks on ``split`` (``full`` and
    ``pruned``: the run's rankings there, typed ones included), and the per-prompt ranks of
    every system (what ``prompt_ranks_<split>.npz`` keeps, to recompute any interval)."""
    config = setup.config.controls
    relations, held = setup.relations, setup.data.splits[split]
    controls = control_rankings(setup, best, split, config.random_draws, setup.config.seed)
    random = controls["random"]
    ranks = {"relation": held.relation, "fact": held.fact_index,
             "full": full.prompt_ranks["rank"], "pruned": pruned.prompt_ranks["rank"],
             "full_typed": full.typed.prompt_ranks["rank"],
             "pruned_typed": pruned.typed.prompt_ranks["rank"],
             "prior": controls["prior"].prompt_ranks["rank"],
             "magnitude": controls["magnitude"].prompt_ranks["rank"]}
    if random:
        ranks["random"] = np.stack([r.prompt_ranks["rank"] for r in random])

    def interval(other: np.ndarray) -> dict[str, Any]:
        """P@1 of the subnetwork minus ``other``'s (per-prompt 0/1, or a mean over draws)."""
        return paired_bootstrap(ranks["pruned"] == 1, other, held.relation, held.fact_index,
                                len(relations), config.resamples, setup.config.seed,
                                config.confidence).summary(relations)

    intervals = {"pruned - full": interval(ranks["full"] == 1),
                 "pruned - full_typed": interval(ranks["full_typed"] == 1),
                 "pruned - prior": interval(ranks["prior"] == 1),
                 "pruned - magnitude": interval(ranks["magnitude"] == 1)}
    if random:
        intervals["pruned - random"] = interval(np.mean(ranks["random"] == 1, axis=0))
    overlap = overlap_between_relations(best, setup.spec, setup.mode.threshold,
                                        len(relations))["total"]  # inert slots left out
    off = ~np.eye(len(relations), dtype=bool)
    summary = {
        "split": split, "protocol": setup.config.data.split,
        "subnetwork": setup.eval_mode.kind,
        # What every ranking chooses among: the vocabulary (single tokens), whose typed variant
        # is each relation's answers, or those answers themselves (answers of any length).
        "ranking": "candidates" if setup.any_length else "vocabulary",
        "prior": controls["prior"].summary(),
        "full_typed": full.typed.summary(), "pruned_typed": pruned.typed.summary(),
        "magnitude_masks": controls["magnitude"].summary(),
        "random_masks": _draws_summary(random),
        "intervals": intervals,
        "overlap_between_relations": {
            "jaccard": overlap.jaccard.tolist(), "chance": overlap.expected.tolist(),
            "mean_jaccard": float(np.mean(overlap.jaccard[off])),
            "mean_chance": float(np.mean(overlap.expected[off])),
            "mean_ratio": float(np.mean(overlap.ratio[off]))},
    }
    return summary, ranks


def _draws_summary(results: list[RankingResult]) -> dict[str, Any]:
    """Mean +- sample std over the random draws of macro/micro P@1 and macro MRR, each draw's
    values, and the per-relation mean P@1."""
    if not results:
        return {"draws": 0}
    rows = {"macro_P@1": [r.macro(1) for r in results], "micro_P@1": [r.micro(1) for r in results],
            "macro_MRR": [float(np.nanmean(r.mrr())) for r in results]}
    out: dict[str, Any] = {"draws": len(results)}
    for key, values in rows.items():
        out[key] = float(np.mean(values))
        out[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        out[f"{key}_per_draw"] = values
    # A relation without held-out prompts has NaN in every draw: it is left out, not averaged.
    per_draw = np.asarray([r.precision_at(1) for r in results])
    out["per_relation_P@1"] = {rel: float(column.mean()) for rel, column in
                               zip(results[0].relations, per_draw.T, strict=True)
                               if not np.isnan(column).all()}
    return out
