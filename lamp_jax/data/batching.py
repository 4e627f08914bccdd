"""Relation-stacked batches ``[R, B, ...]`` for the vmapped LAMP training step.

Why a leading relation axis: the trainer updates all R relation masks in one jitted step
(``jax.vmap`` over R), so each step needs B prompts *of each relation*. Rows that carry no data
(a relation with fewer prompts, or one already finished) are real prompts with ``weight`` 0, never
all-padding rows, so a model that masks attention with ``-inf`` cannot produce NaNs there.

Why ``batch_at(step)`` is a pure function of ``(seed, step)``: a resumed run asks for step k
directly instead of replaying k batches, and two processes agree on the data of every step.
Each relation's order for pass/epoch ``e`` is a permutation drawn from
``np.random.default_rng((seed, r, e))``.

Modes:

* ``"per_relation"`` (the reference): relation r walks its own shuffled data in batches of B for
  ``epochs`` epochs (the last batch of an epoch is padded with weight-0 rows), i.e.
  ``steps_r = epochs * ceil(n_r / B)`` updates; afterwards its rows have weight 0.
  ``num_steps = max_r steps_r``.
* ``"balanced"``: every relation fills all B rows at every step from an endless stream of
  per-pass reshuffled permutations of its data; ``num_steps = epochs * ceil(max_r n_r / B)``, so
  small relations see their data more often.

Every batch also carries ``index`` [R, B] int32: the row of ``encoded`` each prompt came from
(-1 where weight is 0), so evaluation can map predictions back to prompts.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np

from lamp_jax.data.encode import EncodedPrompts

Mode = Literal["balanced", "per_relation"]
Batch = dict[str, np.ndarray]


class RelationBatcher:
    """Deterministic, resumable batches with a leading relation axis (see module docstring)."""

    def __init__(
        self,
        encoded: EncodedPrompts,
        batch_size: int,
        seed: int = 0,
        mode: Mode = "per_relation",
        epochs: int = 1,
        row_features: dict[str, np.ndarray] | None = None,
    ) -> None:
        """``row_features``: more per-prompt arrays (first axis = rows of ``encoded``) that every
        batch carries under their keys, e.g. ``hidden`` from :mod:`lamp_jax.prefix`."""
        row_features = dict(row_features or {})
        for key, values in row_features.items():
            if len(values) != len(encoded):
                raise ValueError(f"row feature {key!r} has {len(values)} rows for "
                                 f"{len(encoded)} prompts")
        self.row_features = row_features
        if mode not in ("balanced", "per_relation"):
            raise ValueError(f"mode must be 'balanced' or 'per_relation', got {mode!r}")
        if batch_size < 1 or epochs < 1:
            raise ValueError(f"batch_size and epochs must be >= 1, got {batch_size}, {epochs}")
        if len(encoded) == 0:
            raise ValueError("cannot batch zero prompts")
        self.encoded = encoded
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mode: Mode = mode
        self.epochs = int(epochs)
        num_rel = len(encoded.relations)
        self._rows = [np.flatnonzero(encoded.relation == r) for r in range(num_rel)]
        self.counts = np.array([len(rows) for rows in self._rows], dtype=np.int64)
        b = self.batch_size
        per_epoch = np.array([math.ceil(n / b) for n in self.counts], dtype=np.int64)
        self._steps_per_epoch = per_epoch
        if mode == "per_relation":
            self.steps_per_relation = self.epochs * per_epoch
            self.num_steps = int(self.steps_per_relation.max())
        else:
            self.num_steps = self.epochs * int(math.ceil(self.counts.max() / b))
            self.steps_per_relation = np.where(self.counts > 0, self.num_steps, 0).astype(np.int64)
        # Filler for rows without data: a real prompt of the relation, or prompt 0 if it has none.
        self._filler = np.array([rows[0] if len(rows) else 0 for rows in self._rows], np.int64)
        self._perm = functools.lru_cache(maxsize=4 * max(num_rel, 1))(self._permutation)

    @property
    def num_relations(self) -> int:
        return len(self.encoded.relations)

    @property
    def seq_len(self) -> int:
        return self.encoded.seq_len

    def __len__(self) -> int:
        return self.num_steps

    def _permutation(self, relation: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed & 0xFFFFFFFF, relation, epoch))
        return self._rows[relation][rng.permutation(self.counts[relation])]

    def _gather(self, index: np.ndarray) -> Batch:
        """index [R, B] of encoded rows (-1 = no data) -> batch dict."""
        valid = index >= 0
        take = np.where(valid, index, self._filler[:, None])
        enc = self.encoded
        return {
            "input_ids": enc.input_ids[take],
            "attention_mask": enc.attention_mask[take],
            "mask_pos": enc.mask_pos[take],
            "obj_id": enc.obj_id[take],
            "weight": valid.astype(np.float32),
            "index": np.where(valid, index, -1).astype(np.int32),
            **({} if enc.obj_mask is None else {"obj_mask": enc.obj_mask[take]}),
            **{key: values[take] for key, values in self.row_features.items()},
        }

    def batch_indices(self, step: int) -> np.ndarray:
        """[R, B] rows of ``encoded`` at ``step`` (-1 for weight-0 rows); pure in (seed, step)."""
        step = int(step)
        if not 0 <= step < self.num_steps:
            raise IndexError(f"step {step} outside [0, {self.num_steps})")
        b = self.batch_size
        out = np.full((self.num_relations, b), -1, dtype=np.int64)
        for r, n in enumerate(self.counts):
            if n == 0:
                continue
            if self.mode == "per_relation":
                if step >= self.steps_per_relation[r]:
                    continue
                epoch, within = divmod(step, int(self._steps_per_epoch[r]))
                chunk = self._perm(r, epoch)[within * b : (within + 1) * b]
                out[r, : len(chunk)] = chunk
            else:
                positions = np.arange(step * b, (step + 1) * b)
                passes, offsets = np.divmod(positions, n)
                for p in np.unique(passes):
                    sel = passes == p
                    out[r, sel] = self._perm(r, int(p))[offsets[sel]]
        return out

    def batch_at(self, step: int) -> Batch:
        """The training batch of ``step``: input_ids/attention_mask [R,B,L] int32, mask_pos/obj_id
        [R,B] int32, weight [R,B] float32, index [R,B] int32."""
        return self._gather(self.batch_indices(step))

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_step: int) -> Iterator[Batch]:
        """Batches ``start_step .. num_steps-1`` (for resuming)."""
        for step in range(int(start_step), self.num_steps):
            yield self.batch_at(step)

    def num_eval_batches(self) -> int:
        """Number of batches :meth:`eval_batches` yields."""
        return int(self._steps_per_epoch.max())

    def eval_batches(self) -> Iterator[Batch]:
        """One unshuffled pass in per_relation layout: every prompt exactly once with weight 1.

        Relation r's prompts, in ``encoded`` order, fill row r of consecutive batches; rows past
        the end have weight 0 and index -1. Same dict layout and ``L`` as training batches.
        """
        b = self.batch_size
        for step in range(self.num_eval_batches()):
            index = np.full((self.num_relations, b), -1, dtype=np.int64)
            for r, rows in enumerate(self._rows):
                chunk = rows[step * b : (step + 1) * b]
                index[r, : len(chunk)] = chunk
            yield self._gather(index)
