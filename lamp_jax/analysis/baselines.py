"""Baselines that need no subnetwork: what a relation's answers alone predict, and a model's
ranking restricted to the answers a relation can have.

* The **relation prior** answers every prompt of a relation with its most frequent training
  object. Frequency counts distinct training *facts* (a fact with three sentences counts once);
  ties go to the smallest token id. As a ranking it orders the whole vocabulary by
  (training facts descending, token id ascending), so its P@1 is "the prior is the object" and
  its MRR is well defined (:func:`prior_ranks`).
* **Typed candidate sets** (:func:`candidate_matrix`): per relation, a boolean ``[R, vocab]``
  matrix of the objects it has in the prompts given (its training prompts; for an
  object-disjoint split, where no held-out object is a training one, pass every split's prompts
  to get the relation's whole object set; :func:`typed_candidates` picks by the held-out
  protocol). :func:`restricted_rank` ranks the object among them.

Arrays follow :class:`lamp_jax.data.encode.EncodedPrompts`: ``relation``, ``obj_id`` and
``fact_index`` per prompt.
"""

from __future__ import annotations

import numpy as np

from lamp_jax.ranking import restricted_rank

__all__ = ["candidate_matrix", "object_fact_counts", "prior_ranks", "relation_prior",
           "restricted_rank", "typed_candidates"]


def object_fact_counts(relation: np.ndarray, obj_id: np.ndarray, fact_index: np.ndarray,
                       num_relations: int, vocab_size: int) -> np.ndarray:
    """``[R, V]`` int64: number of distinct facts of relation r whose object is token v."""
    relation, obj_id, fact_index = (np.asarray(x, np.int64) for x in (relation, obj_id,
                                                                         fact_index))
    facts = np.unique(np.stack([relation, fact_index, obj_id], axis=1), axis=0)
    counts = np.zeros((num_relations, vocab_size), np.int64)
    np.add.at(counts, (facts[:, 0], facts[:, 2]), 1)
    return counts


def relation_prior(counts: np.ndarray) -> np.ndarray:
    """``[R]`` token id of each relation's most frequent object (ties: smallest id); -1 for a
    relation without facts."""
    counts = np.asarray(counts)
    return np.where(counts.sum(axis=1) > 0, np.argmax(counts, axis=1), -1)


def prior_ranks(counts: np.ndarray, relation: np.ndarray, obj_id: np.ndarray) -> np.ndarray:
    """``[M]`` rank of each prompt's object in its relation's frequency ordering of the whole
    vocabulary (training facts descending, then token id ascending): 1 + tokens before it.
    Rank 1 is exactly "the relation prior is the object" (for relations with facts)."""
    rows = np.asarray(counts)[np.asarray(relation)]  # [M, V]
    obj_id = np.asarray(obj_id)
    own = rows[np.arange(len(obj_id)), obj_id][:, None]
    lower_id = np.arange(rows.shape[1])[None, :] < obj_id[:, None]
    return 1 + np.sum((rows > own) | ((rows == own) & lower_id), axis=1)


def candidate_matrix(relation: np.ndarray, obj_id: np.ndarray, num_relations: int,
                     vocab_size: int) -> np.ndarray:
    """``[R, V]`` bool: token v is an object of relation r among the prompts given."""
    out = np.zeros((num_relations, vocab_size), bool)
    out[np.asarray(relation, np.int64), np.asarray(obj_id, np.int64)] = True
    return out


def typed_candidates(splits: dict, protocol: str, num_relations: int,
                     vocab_size: int) -> np.ndarray:
    """``[R, V]`` bool: the answers a relation's typed ranking chooses among, under the held-out
    ``protocol``: its training objects; for ``object_disjoint``, where no held-out object is a
    training one, the objects of every split (as LAMA's common vocabulary does). ``splits``:
    name -> :class:`~lamp_jax.data.encode.EncodedPrompts`."""
    names = list(splits) if protocol == "object_disjoint" else ["train"]
    return np.logical_or.reduce([candidate_matrix(splits[n].relation, splits[n].obj_id,
                                                  num_relations, vocab_size) for n in names])
