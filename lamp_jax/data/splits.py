"""Train/dev/test splits of LAMA prompts, by fact and stratified per relation.

Why split by *fact*: a fact often has several cloze sentences; if paraphrases of one fact landed in
both train and test, test P@1 would measure memorisation of that fact's object, not knowledge the
mask extracts. Why stratify per relation: every relation trains its own mask, so each needs its own
dev set (model selection) and test set (reporting).

Why a separate RNG stream per relation, seeded from ``(seed, crc32(relation name))``: adding or
removing a relation does not reshuffle the splits of the others.

The reference implementation trains, selects the best epoch and reports on one and the same file;
:func:`reference_protocol_split` reproduces that for comparison only.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from lamp_jax.data.encode import EncodedPrompts
from lamp_jax.data.lama import Fact

SPLITS = ("train", "dev", "test")


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Split ``n`` items into counts close to ``fractions`` (largest remainder).

    With ``n >= number of positive fractions`` every split with a positive fraction gets at least
    one item; smaller ``n`` fill splits in order of decreasing fraction (train first).
    """
    k = len(fractions)
    positive = [i for i in range(k) if fractions[i] > 0]
    order = sorted(positive, key=lambda i: (-fractions[i], i))
    if n < len(positive):
        counts = [0] * k
        for i in order[:n]:
            counts[i] = 1
        return counts
    counts = [1 if i in positive else 0 for i in range(k)]
    rest = n - len(positive)
    total = sum(fractions)
    # Ideal share of the whole n, minus the one already given.
    ideal = [max(0.0, n * fractions[i] / total - counts[i]) for i in range(k)]
    scale = rest / sum(ideal) if sum(ideal) > 0 else 0.0
    ideal = [x * scale for x in ideal]
    floors = [int(np.floor(x)) for x in ideal]
    left = rest - sum(floors)
    by_remainder = sorted(positive, key=lambda i: (-(ideal[i] - floors[i]), i))
    for i in by_remainder[:left]:
        floors[i] += 1
    return [c + f for c, f in zip(counts, floors, strict=True)]


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, dev, test), got {fractions}")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be non-negative and not all zero, got {fractions}")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def _relation_rng(seed: int, relation: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(relation.encode("utf-8"))])


def split_fact_ids(
    fact_relations: Sequence[str],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Assign fact ids ``0..len(fact_relations)-1`` to train/dev/test, stratified by relation.

    Deterministic for ``seed``; every relation with at least 3 facts (and all fractions positive)
    gets at least one fact in each split. Returns sorted int64 fact ids per split.
    """
    fractions = _check_fractions(fractions)
    rel = np.asarray(list(fact_relations), dtype=object)
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for relation in sorted(set(rel.tolist())):
        ids = np.flatnonzero(rel == relation)
        ids = ids[_relation_rng(seed, relation).permutation(len(ids))]
        start = 0
        for name, count in zip(SPLITS, _allocate(len(ids), fractions), strict=True):
            out[name].append(ids[start : start + count])
            start += count
    return {s: np.sort(np.concatenate(out[s])) if out[s] else np.zeros(0, np.int64) for s in SPLITS}


def split_facts(
    facts: Sequence[Fact],
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fact indices per split for a list of facts (before encoding); see :func:`split_fact_ids`."""
    return split_fact_ids([f.relation for f in facts], fractions, seed)


def split_by_fact(
    encoded: EncodedPrompts,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Prompt indices of ``encoded`` per split; all prompts of one fact land in the same split.

    Only facts that kept at least one prompt after encoding take part, so the ">= 1 fact per split
    for relations with >= 3 facts" guarantee holds for the encoded data. Use
    ``encoded.subset(idx)`` to get the split's prompts.
    """
    facts, first = np.unique(encoded.fact_index, return_index=True)
    rel_of_fact = encoded.relation[first]
    # A fact has one relation; guard against hand-built inputs that break this.
    clash = encoded.relation != rel_of_fact[np.searchsorted(facts, encoded.fact_index)]
    if np.any(clash):
        raise ValueError("a fact_index occurs with more than one relation")
    names = [encoded.relations[r] for r in rel_of_fact]
    fact_split = split_fact_ids(names, fractions, seed)
    out = {}
    for name in SPLITS:
        chosen = facts[fact_split[name]]
        out[name] = np.flatnonzero(np.isin(encoded.fact_index, chosen)).astype(np.int64)
    return out


def reference_protocol_split(n: int) -> dict[str, np.ndarray]:
    """train = dev = test = all ``n`` prompts: the reference paper's protocol, for comparison only.

    The reference trains, selects its best epoch and reports on the same LAMA file, which
    overstates what a mask extracts; numbers obtained with this split must not be reported as
    held-out results.
    """
    everything = np.arange(int(n), dtype=np.int64)
    return {name: everything.copy() for name in SPLITS}
