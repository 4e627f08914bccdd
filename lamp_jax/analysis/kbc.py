"""Knowledge-base completion: rank the tail of (head, relation, ?) with a relation's template.

Raw ranking over the whole vocabulary (other correct tails of the same head are not filtered
out), restricted to single-token tails; everything skipped is counted by reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lamp_jax.data import RelationBatcher, Triple, encode_facts, triples_to_facts
from lamp_jax.data.triples import TEMPLATES
from lamp_jax.masks import MaskMode
from lamp_jax.ranking import RankingResult, evaluate, make_rank_fn

KS = (1, 3, 10)


def _hits(result: RankingResult) -> dict[str, Any]:
    return {**{f"Hits@{k}": result.micro(k) for k in KS}, "MRR": result.summary()["micro_MRR"],
            "per_relation": {r: {**{f"Hits@{k}": float(result.precision_at(k)[i]) for k in KS},
                                 "count": int(result.count[i])}
                             for i, r in enumerate(result.relations) if result.count[i] > 0}}


def knowledge_base_completion(
    triples: Sequence[Triple],
    mlm: Any,
    mask_logits: Any,
    relations: Sequence[str],
    mode: MaskMode,
    templates: Mapping[str, str] = TEMPLATES,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Hits@1/3/10 and MRR of the full model and of each relation's own subnetwork."""
    facts, triples_report = triples_to_facts(triples, relations, templates)
    encoded, encode_report = encode_facts(facts, mlm.tokenizer, tuple(relations))
    out: dict[str, Any] = {"triples": triples_report.triples,
                           "negative_label_skipped": triples_report.negative_label,
                           "other_relation_skipped": triples_report.skipped_relations,
                           "ranked": len(encoded),
                           "skipped_at_encoding": dict(encode_report.skipped)}
    if len(encoded) == 0:
        return out
    batches = list(RelationBatcher(encoded, batch_size).eval_batches())
    rank_fn = make_rank_fn(mlm.config, mode, ks=KS, dtype=mlm.dtype)
    out["full"] = _hits(evaluate(rank_fn, None, mlm.params, batches, relations, KS))
    out["subnetwork"] = _hits(evaluate(rank_fn, mask_logits, mlm.params, batches, relations, KS))
    return out
