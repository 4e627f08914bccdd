"""Notebook-facing access to a finished (or running) training run.

    from lamp_jax.api import load_run
    run = load_run("runs/default")           # or a bucket: load_run("gs://my-bucket/runs/x")
    run.predict("You are likely to find a fork in the [MASK].", relation="AtLocation")
    run.sparsity()["total"]                  # fraction pruned, per relation
    params = run.masked_params("AtLocation") # a plain params pytree for mlm_forward
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from lamp_jax.errors import UsageError
from lamp_jax.hosts import progress
from lamp_jax.masks import MaskMode, MaskSpec, apply_masks, multiply_masks, sparsity_stats
from lamp_jax.models import LoadedMLM, family_of, load_mlm, mlm_forward, save_mlm
from lamp_jax.paths import as_path
from lamp_jax.ranking import RankingResult, evaluate, make_rank_fn
from lamp_jax.run_dir import RunDirectory
from lamp_jax.setup import DTYPES, with_weights


@dataclasses.dataclass
class Run:
    """A trained run: the frozen model, the best mask logits ``[R, ...]`` and how to use them."""

    workdir: epath.Path  # a local path or a URL (lamp_jax.paths)
    mlm: LoadedMLM
    relations: tuple[str, ...]
    spec: MaskSpec
    mode: MaskMode  # the inference mode (threshold or expectation)
    mask_logits: Any
    metrics: dict[str, Any] | None
    # Relation -> human-readable label, where the data has one (T-REx: "P19" -> "place of
    # birth"); relations are always named by their id.
    relation_labels: dict[str, str] = dataclasses.field(default_factory=dict)
    _batches: dict[str, list] = dataclasses.field(default_factory=dict, repr=False)
    any_length: bool = False  # set once the batches are built (config.data.answers)
    candidates: Any = None  # with answers of any length: each relation's candidate answers

    @property
    def shown_relations(self) -> tuple[str, ...]:
        """The relations as tables and plots name them: "P19 (place of birth)"."""
        from lamp_jax.data import relation_display

        return relation_display(self.relations, self.relation_labels)

    def eval_batches(self, split: str = "test") -> list[dict[str, np.ndarray]]:
        """The run's ``split`` ("train", "dev" or "test") as ``[R, B, ...]`` evaluation batches,
        rebuilt from ``run.json`` exactly as training split the data (cached)."""
        if split not in self._batches:
            from lamp_jax.data.prepare import prepare_data
            from lamp_jax.setup import evaluation_batches

            manifest = RunDirectory(self.workdir).manifest()
            data = prepare_data(manifest.config, self.mlm.tokenizer, Path(manifest.data),
                                log=lambda *_: None, causal=family_of(self.mlm.config).causal)
            self.any_length = data.candidates is not None
            self.candidates = data.candidates
            for name, encoded in data.splits.items():
                self._batches[name] = evaluation_batches(
                    manifest.config, self.mlm, data, encoded, {}, self.mlm.params, 0, None)
        return self._batches[split]

    def scorer(self, kind: str | None = None):
        """``score(mask_logits, batches) -> RankingResult`` with ``kind`` masks (default: the
        run's inference mode), on this process's default device: the vocabulary ranking, or
        for answers of any length the ranking among each relation's candidates."""
        from lamp_jax.answer_ranking import evaluate_candidates, make_candidate_fn

        mode = self.mode if kind is None else self.mode.for_inference(kind)
        self.eval_batches("test")  # tells which ranking the run's data takes
        make, evaluate_fn = ((make_candidate_fn, evaluate_candidates) if self.any_length
                             else (make_rank_fn, evaluate))
        rank_fn = make(self.mlm.config, mode, dtype=self.mlm.dtype)
        return lambda mask_logits, batches, params=None: evaluate_fn(
            rank_fn, mask_logits, self.mlm.params if params is None else params, batches,
            self.relations)

    def evaluate(self, split: str = "test", masks: Any = "own",
                 kind: str | None = None) -> RankingResult:
        """P@k and MRR per relation on ``split``. ``masks``: "own" (each relation's own
        subnetwork), None (the full model), or one multiplier tree for every relation (e.g.
        :meth:`combine`)."""
        score = self.scorer(kind)
        batches = self.eval_batches(split)
        if isinstance(masks, str):
            if masks != "own":
                raise ValueError(f"masks must be 'own', None or a multiplier tree, not {masks!r}")
            return score(self.mask_logits, batches)
        params = self.mlm.params if masks is None else multiply_masks(self.mlm.params, masks)
        return score(None, batches, params)

    def combine(self, relations: Sequence[str], method: str = "or") -> Any:
        """One mask (a multiplier tree) from several relations' masks: "or" (union of the
        binary masks, the paper's choice), "and", "vote", or "soft" (mean of sigmoid(G))."""
        from lamp_jax.analysis.combine import combine

        return combine(self.mask_logits, [self.relation_index(r) for r in relations], method,
                       self.mode.threshold)

    def relation_index(self, relation: str) -> int:
        check_relation(relation, self.relations)
        return self.relations.index(relation)

    def masked_params(self, relation: str, kind: str | None = None) -> Any:
        """The model's params with ``relation``'s subnetwork applied (``kind``: threshold or
        expectation; default the run's inference mode)."""
        r = self.relation_index(relation)
        mode = self.mode if kind is None else self.mode.for_inference(kind)
        logits_r = jax.tree.map(lambda g: jnp.asarray(g[r]), self.mask_logits)
        return apply_masks(self.mlm.params, logits_r, mode)

    def predict(self, prompt: str, relation: str | None = None, k: int = 5,
                kind: str | None = None, among: str | None = None) -> list[tuple[str, float]]:
        """Top-k answers at the prompt's ``[MASK]`` (write ``[MASK]`` for any tokenizer) and
        their probabilities. ``relation=None`` uses the full, unpruned model.

        A run of single-token answers ranks the vocabulary at the mask. A run of answers of any
        length (``config.data.answers``; every causal LM's) ranks the candidates of relation
        ``among`` (default: ``relation``) by their tokens' summed log-probability, as its
        evaluation does, and gives each its share of the candidates' probability mass; for a
        causal LM ``[MASK]`` must end the prompt (punctuation aside)."""
        check_prompt(prompt)
        params = self.mlm.params if relation is None else self.masked_params(relation, kind)
        self.eval_batches("test")  # tells which ranking the run's data takes
        if self.any_length:
            return self._predict_candidates(prompt, params, among or relation, k)
        tokenizer = self.mlm.tokenizer
        text = prompt.replace("[MASK]", tokenizer.mask_token)
        encoded = tokenizer([text], return_tensors="np")
        positions = np.flatnonzero(encoded["input_ids"][0] == tokenizer.mask_token_id)
        if len(positions) != 1:  # the tokenizer's own mask token was written too
            raise UsageError(f"the prompt must contain exactly one [MASK], and no "
                             f"{tokenizer.mask_token}: {prompt!r}")
        logits = mlm_forward(params, encoded["input_ids"], encoded["attention_mask"],
                             config=self.mlm.config, output_positions=positions[:1],
                             dtype=self.mlm.dtype)["logits"][0]
        probs = jax.nn.softmax(logits)
        top = np.argsort(-np.asarray(probs))[:k]
        return [(tokenizer.convert_ids_to_tokens(int(t)), float(probs[t])) for t in top]

    def _predict_candidates(self, prompt: str, params: Any, among: str | None, k: int
                            ) -> list[tuple[str, float]]:
        from lamp_jax.answer_ranking import make_candidate_fn, scoring_batches
        from lamp_jax.data.answers import prompt_rows

        if among is None:
            raise UsageError("this run ranks each relation's candidate answers: name the "
                             "relation whose candidates to rank (relation=... or among=...)")
        r = self.relation_index(among)
        causal = family_of(self.mlm.config).causal
        rows = prompt_rows(prompt, r, len(self.relations), self.mlm.tokenizer,
                           self.candidates, causal)
        batches = scoring_batches(rows, self.candidates, np.zeros(1, np.int64),
                                  len(self.relations), 1)
        score = make_candidate_fn(self.mlm.config, self.mode, dtype=self.mlm.dtype)
        scores = np.full(self.candidates.length.shape[1], -np.inf)
        for batch in batches:
            device = {key: v for key, v in batch.items()
                      if key not in ("index", "prompt", "cand", "gold")}
            got = np.asarray(score(None, params, device)["scores"])[r, 0]
            own = batch["cand"][r, 0]
            scores[own[own >= 0]] = got[own >= 0]
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        top = np.argsort(-scores)[:min(k, int(np.sum(np.isfinite(scores))))]
        return [(self.candidates.texts[r][c], float(probs[c])) for c in top]

    def export_subnetwork(self, relation: str, directory: str | Path,
                          kind: str = "threshold") -> Path:
        """Writes ``relation``'s subnetwork as a Hugging Face checkpoint (``config.json``,
        ``model.safetensors``, the tokenizer): the frozen model with the mask applied
        (``kind``: "threshold" = the binary subnetwork, "expectation" = weights scaled by
        sigmoid(G)). transformers opens it as any masked LM, e.g.
        ``pipeline("fill-mask", model=directory)``, and gives the same top-k as
        ``predict(..., relation=relation, kind=kind)``. ``lamp_jax_subnetwork.json`` in the
        directory says which run, relation and mask it came from."""
        params = jax.device_get(self.masked_params(relation, kind))
        directory = save_mlm(directory, params, self.mlm.config, self.mlm.tokenizer)
        r = self.relation_index(relation)
        provenance = {"run": str(self.workdir), "relation": relation, "kind": kind,
                      "mask_threshold": self.mode.threshold,
                      "masked_layers": list(self.spec.layers),
                      "masked_matrices": list(self.spec.matrices),
                      "fraction_pruned": float(self.sparsity()["total"][r])}
        (Path(directory) / "lamp_jax_subnetwork.json").write_text(json.dumps(provenance, indent=2))
        return Path(directory)

    def sparsity(self) -> dict[str, np.ndarray]:
        """Fraction of pruned weights per ``layer_<i>/<matrix>`` and ``total``, each ``[R]``."""
        return sparsity_stats(self.mask_logits, self.spec, self.mode.threshold)


def check_relation(relation: str, relations: Sequence[str]) -> None:
    """UsageError naming ``relation`` and the run's relations when it is not one of them."""
    if relation not in relations:
        raise UsageError(f"unknown relation {relation!r}; this run has {', '.join(relations)}")


def check_prompt(prompt: str) -> None:
    """UsageError unless ``prompt`` has exactly one ``[MASK]`` (where the answer goes)."""
    if prompt.count("[MASK]") != 1:
        raise UsageError(f"the prompt must contain exactly one [MASK] (it has "
                         f"{prompt.count('[MASK]')}): {prompt!r}")


def load_run(workdir: str | Path, model: str | None = None) -> Run:
    """Opens a run directory written by ``train.py`` or by a sweep (each of its runs): a local
    path or a URL such as ``gs://bucket/runs/x`` (:mod:`lamp_jax.paths`). ``model`` overrides
    where the frozen model is loaded from (e.g. a local copy of the hub checkpoint on an
    offline machine)."""
    directory = RunDirectory(workdir)
    manifest = directory.manifest()
    source = model or manifest.model
    with progress(total=1, desc=f"loading the model ({Path(source).name})", unit="model") as bar:
        # A run on a random-weight model (config.model_weights) gets the same weights back.
        mlm = with_weights(load_mlm(source, dtype=DTYPES[manifest.dtype]), manifest.config)
        bar.update()
    return Run(as_path(workdir), mlm, manifest.relations, manifest.spec, manifest.eval_mode,
               directory.best_masks(), directory.metrics(), manifest.labels)
