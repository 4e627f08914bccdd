"""A run's pieces, built once from its configuration, in the order things happen.

    evaluation = setup_evaluation(config, splits=("test",))   # rank saved masks
    training = setup_training(config)                          # train.py's run

:func:`setup_evaluation` gives what ranking masks needs (:class:`EvalSetup`): the model and the
data (read, encoded, split), the mask layout and modes, the device mesh and its relation slots,
the frozen weights on every device, the frozen prefix (layers below the lowest masked one, run
once per prompt), the evaluation batches and the relation chunk that fits in memory.
:func:`setup_training` adds the training pieces (:class:`TrainSetup`): the optimiser, the
batcher and the jitted step. The training state is not part of either: :meth:`TrainSetup.
init_state` builds it where it will live, and the loop either uses it or restores a checkpoint
into it, so a run never holds two states.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lamp_jax import placement
from lamp_jax.analysis.baselines import typed_candidates
from lamp_jax.answer_ranking import (
    HOST_KEYS,
    evaluate_candidates,
    make_candidate_fn,
    scoring_batches,
)
from lamp_jax.data import RelationBatcher
from lamp_jax.data.answers import gold_candidates, scoring_rows
from lamp_jax.data.prepare import PreparedData, prepare_data, resolve_sources
from lamp_jax.hosts import is_main, progress, use_compile_cache
from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits, insert_path, logit
from lamp_jax.models import LoadedMLM, family_of, load_mlm
from lamp_jax.optim import OptimConfig, make_optimizer, max_logit_travel
from lamp_jax.prefix import prefix_hidden_states
from lamp_jax.ranking import RankingResult, evaluate, make_rank_fn
from lamp_jax.step import LossConfig, TrainState, init_train_state, jit_train_step, train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class EvalSetup:
    """What ranking one run's masks needs: the frozen model on the mesh and the prompts."""

    config: ml_collections.ConfigDict
    model_source: str  # resolved: a hub id or a local directory
    data_path: Path
    mlm: LoadedMLM
    data: PreparedData
    spec: MaskSpec
    mode: MaskMode  # how the masks are trained
    eval_mode: MaskMode  # how dev selection and the report read them (config.mask.eval_kind)
    mesh: jax.sharding.Mesh
    slots: int  # length of the relation axis: the relations, padded with inert slots
    frozen: Any  # the model's weights on every device of the mesh
    start_layer: int  # the first layer that runs per step (0: no frozen prefix)
    chunk: int | None  # relations per device at a time (None: all)
    features: Mapping[str, dict[str, np.ndarray]]  # per split, the frozen prefix of each prompt
    eval_sets: Mapping[str, list[dict[str, np.ndarray]]]  # per split, [R, B, ...] batches

    @property
    def relations(self) -> tuple[str, ...]:
        return self.data.relations

    @property
    def dtype(self) -> Any:
        return DTYPES[self.config.dtype]

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch ``[R, ...]`` padded with inert slots and placed on the mesh."""
        return placement.shard_batch({k: v for k, v in batch.items() if k not in HOST_KEYS},
                                     self.mesh, self.slots)

    @property
    def any_length(self) -> bool:
        """Whether answers of any length are ranked among each relation's candidates
        (config.data.answers; :mod:`lamp_jax.answer_ranking`), not single tokens over the
        vocabulary."""
        return self.data.candidates is not None

    def rank_fn(self, kind: str, chunk: int | None = None) -> Callable[..., Any]:
        """The jitted ranking of ``kind`` masks ("threshold" or "expectation"), ``chunk``
        relations per device at a time (default: the run's): per-relation statistics over the
        vocabulary, or with answers of any length each candidate's score."""
        make = make_candidate_fn if self.any_length else make_rank_fn
        return make(self.mlm.config, self.mode.for_inference(kind),
                    relation_chunk=chunk or self.chunk, dtype=self.dtype,
                    start_layer=self.start_layer,
                    relation_shards=self.mesh.shape[placement.RELATION])

    def scorer(self, kind: str | None = None) -> Callable[[Any, Any], RankingResult]:
        """``score(mask_logits, batches) -> RankingResult`` with ``kind`` masks (default: the
        eval mode's)."""
        rank_fn = self.rank_fn(kind or self.eval_mode.kind)
        evaluate_fn = evaluate_candidates if self.any_length else evaluate
        return lambda mask_logits, batches: evaluate_fn(rank_fn, mask_logits, self.frozen,
                                                        batches, self.relations,
                                                        put_batch=self.put)

    def scores(self, mask_logits: Any, split: str, kind: str | None = None) -> RankingResult:
        """P@k and MRR of each relation on ``split`` (``mask_logits=None``: the full model),
        with ``kind`` masks (default: the eval mode's)."""
        return self.scorer(kind)(mask_logits, self.eval_sets[split])

    @cached_property
    def mask_layout(self) -> Any:
        """``jax.ShapeDtypeStruct`` of the ``[slots, ...]`` mask logits with their shardings:
        a checkpoint restores onto it."""
        sharding = placement.relation_sharding(self.mesh)
        tree: dict[str, Any] = {}
        for path in self.spec.paths():
            shape = (self.slots, *_kernel(self.mlm.params, path).shape)
            insert_path(tree, path, jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding))
        return tree

    @property
    def mask_params(self) -> int:
        """Mask weights per relation."""
        return sum(int(np.prod(_kernel(self.mlm.params, p).shape)) for p in self.spec.paths())


@dataclasses.dataclass(frozen=True)
class TrainSetup(EvalSetup):
    """An :class:`EvalSetup` that also trains: optimiser, batcher and the jitted step."""

    optim: OptimConfig
    loss: LossConfig
    batcher: RelationBatcher
    step_fn: Callable[..., Any]  # (state, frozen, batch, peak learning rate) -> (state, metrics)
    state_bytes: int  # the training state: mask logits + Adam moments

    @property
    def num_steps(self) -> int:
        return self.batcher.num_steps

    @property
    def eval_every(self) -> int:
        return self.config.eval_every or max(1, self.num_steps // self.config.epochs)

    @property
    def learning_rate(self) -> jax.Array:
        """The peak learning rate the step is given."""
        return jnp.float32(self.optim.learning_rate)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of ``step`` (in the run's seed's order), placed on the mesh."""
        return self.put(self.batcher.batch_at(step))

    def step_body(self, chunk: int | None) -> Callable[..., Any]:
        """:func:`~lamp_jax.step.train_step` with this run's configuration bound, unjitted,
        ``chunk`` relations per device at a time."""
        return partial(train_step, model_config=self.mlm.config, loss_config=self.loss,
                       optim_config=self.optim, relation_chunk=chunk,
                       relation_shards=self.mesh.shape[placement.RELATION])

    def initial_logits(self, config: ml_collections.ConfigDict | None = None) -> Any:
        """Host ``[slots, ...]`` initial mask logits from ``config``'s seed and mask init
        (default: the run's)."""
        config = config or self.config
        logits = init_mask_logits(self.spec, self.mlm.params, len(self.relations),
                                  mask_init(config), self.mode, jax.random.key(config.seed))
        return placement.pad_relations(jax.tree.map(np.asarray, logits), self.slots)

    def total_steps(self) -> np.ndarray:
        """``[slots]`` updates in each relation's schedule (0 for inert slots)."""
        return placement.pad_relations(np.asarray(self.batcher.steps_per_relation), self.slots)

    def warning(self, logits: Any, config: ml_collections.ConfigDict | None = None
                ) -> str | None:
        """:func:`threshold_warning` for initial ``logits`` under ``config`` (default: the
        run's)."""
        config = config or self.config
        return threshold_warning(logits, len(self.relations),
                                 int(max(self.batcher.steps_per_relation)),
                                 optim_settings(config), self.mode.threshold)

    def init_state(self, log=print) -> TrainState:
        """The initial training state, placed on the mesh: logits from the run's seed and mask
        init, the noise key from its seed. Warns when the masks cannot prune."""
        logits = self.initial_logits()
        warning = self.warning(logits)
        if warning:
            log(f"warning: {warning}")
        return placement.init_placed_state(logits, make_optimizer(self.optim),
                                           self.total_steps(), noise_key(self.config.seed),
                                           self.mesh)

    def abstract_state(self) -> TrainState:
        """The state's shapes and dtypes (nothing allocated)."""
        build = partial(init_train_state, optimizer=make_optimizer(self.optim),
                        total_steps=np.zeros(self.slots, np.int32), rng=jax.random.key(0))
        return jax.eval_shape(build, _abstract_logits(self.spec, self.mlm.params, self.slots))

    def state_layout(self) -> TrainState:
        """The state's shapes, dtypes and shardings (nothing allocated): a checkpoint restores
        onto it."""
        abstract = self.abstract_state()
        return placement.abstract_placed(abstract,
                                         placement.state_shardings(abstract, self.mesh))


def noise_key(seed: int) -> jax.Array:
    """The key of a run's first step's noise (its mask init draws from ``key(seed)``)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def with_weights(mlm: LoadedMLM, config: ml_collections.ConfigDict) -> LoadedMLM:
    """``mlm`` with the weights ``config.model_weights`` asks for: its own (``"pretrained"``),
    or ``"random"``: the same architecture drawn as transformers initialises it
    (:func:`lamp_jax.models.init_like_transformers`, the family's own rules), from
    ``config.seed``: the control of a model that knows nothing."""
    if config.get("model_weights", "pretrained") == "pretrained":
        return mlm
    params = family_of(mlm.config).random_params(
        mlm.config, jax.random.fold_in(jax.random.key(config.seed), 2))
    return dataclasses.replace(mlm, params=jax.tree.map(lambda x: x.astype(mlm.dtype), params))


def load_model_and_data(config: ml_collections.ConfigDict, log=print, *,
                        sources: tuple[str, Path] | None = None, mlm: LoadedMLM | None = None,
                        data: PreparedData | None = None
                        ) -> tuple[str, Path, LoadedMLM, PreparedData]:
    """The model and the data a configuration names: ``(model source, data path, model,
    data)``. ``sources``: read these instead of the configuration's (a run directory's resolved
    ones); ``mlm`` / ``data``: already in memory (the benchmarks' synthetic ones)."""
    model_source, data_path = sources or (
        (str(mlm.source), Path("<in memory>")) if mlm is not None else resolve_sources(config))
    if mlm is None:
        with progress(total=1, desc=f"loading the model ({Path(model_source).name})",
                      unit="model") as bar:
            mlm = with_weights(load_mlm(model_source, dtype=DTYPES[config.dtype]), config)
            bar.update()
    log(f"model: {model_source} ({mlm.config.family}, {mlm.config.num_layers} layers, "
        f"hidden {mlm.config.hidden_size}, {config.get('model_weights', 'pretrained')} "
        f"weights); data: {data_path}")
    if data is None:
        data = prepare_data(config, mlm.tokenizer, data_path, log,
                            causal=family_of(mlm.config).causal)
    return model_source, data_path, mlm, data


def setup_evaluation(config: ml_collections.ConfigDict, log=print, *,
                     splits: Sequence[str] = SPLITS, state_bytes: int | None = None,
                     sources: tuple[str, Path] | None = None, mlm: LoadedMLM | None = None,
                     data: PreparedData | None = None,
                     lap: Callable[[str], None] = lambda phase: None) -> EvalSetup:
    """Everything ranking masks of ``config``'s run needs, for ``splits``. ``state_bytes``:
    the training state the caller will hold on the devices beside a step (default: the mask
    logits alone); the relation chunk is sized to the memory left. ``lap`` is told when the
    "load" and "prefix" phases end (:class:`lamp_jax.phase_clock.PhaseClock`); ``sources``, ``mlm``
    and ``data`` as :func:`load_model_and_data` takes them. The configuration is taken as
    valid: callers check it first, before they write anything
    (:func:`lamp_jax.config_checks.validate_config`)."""
    # First, before JAX starts its backends (a no-op once they have, e.g. later in a notebook).
    placement.use_cpu_devices(config.cpu_devices)
    use_compile_cache(config.get("compile_cache_dir", ""))  # before the first compilation
    model_source, data_path, mlm, data = load_model_and_data(config, log, sources=sources,
                                                             mlm=mlm, data=data)
    lap("load")

    m = config.mask
    spec = MaskSpec.create(mlm.config, m.first_layer, m.last_layer, tuple(m.matrices))
    mode = MaskMode(m.mode, tau=m.tau, threshold=m.threshold, ste_grad=m.ste_grad)

    relations = data.relations
    mesh = placement.run_mesh(len(relations), config.batch_size,
                              config.relation_parallelism or None)
    slots = placement.relation_slots(len(relations), mesh)
    frozen = placement.replicate(mlm.params, mesh)
    # Layers below the lowest masked one are frozen: their output is computed once per prompt.
    start_layer = min(spec.layers) if config.cache_frozen_prefix else 0
    features = {name: frozen_prefix(mlm.config, frozen, data.splits[name], start_layer,
                                    DTYPES[config.dtype], mesh) for name in splits}
    lap("prefix")
    eval_sets = {name: evaluation_batches(config, mlm, data, data.splits[name], features[name],
                                          frozen, start_layer, mesh) for name in splits}

    mask_params = sum(int(np.prod(_kernel(mlm.params, p).shape)) for p in spec.paths())
    state_bytes = slots * mask_params * 4 if state_bytes is None else state_bytes
    per_relation = placement.step_transient_bytes(
        mlm.config, config.batch_size, data.splits[splits[0]].input_ids.shape[1], mask_params,
        DTYPES[config.dtype])
    chunk = placement.relation_chunk_for(config.relation_chunk, len(relations), mesh,
                                         per_relation, state_bytes, log=None, placed=False)
    return EvalSetup(config, model_source, data_path, mlm, data, spec, mode,
                     mode.for_inference(m.eval_kind), mesh, slots, frozen, start_layer, chunk,
                     features, eval_sets)


def setup_training(config: ml_collections.ConfigDict, log=print, *,
                   mlm: LoadedMLM | None = None, data: PreparedData | None = None,
                   lap: Callable[[str], None] = lambda phase: None) -> TrainSetup:
    """:func:`setup_evaluation` for every split, then the optimiser, the batcher and the jitted
    step, with the relation chunk that fits beside the training state."""
    optim = optim_settings(config)
    # The state's size needs the model, which setup_evaluation loads: evaluate first with the
    # logits' size, then size the chunk for the whole training state below.
    evaluation = setup_evaluation(config, log, mlm=mlm, data=data, lap=lap)
    e = evaluation
    state_bytes = e.slots * e.mask_params * (4 + 2 * jnp.dtype(optim.moment_dtype).itemsize)
    hint = placement.allocator_hint(e.slots * e.mask_params * 4, jax.default_backend(),
                                    platform.system(), os.environ, e.mesh.devices.size)
    if hint:
        log(hint)
    per_relation = placement.step_transient_bytes(
        e.mlm.config, config.batch_size, e.data.splits["train"].input_ids.shape[1],
        e.mask_params, e.dtype)
    chunk = placement.relation_chunk_for(config.relation_chunk, len(e.relations), e.mesh,
                                         per_relation, state_bytes, log, placed=False)
    loss = LossConfig(e.mode, config.loss.sparsity_weight, config.loss.target_sparsity,
                      compute_dtype=e.dtype, start_layer=e.start_layer)
    batcher = RelationBatcher(e.data.splits["train"], config.batch_size, config.seed,
                              config.batching, config.epochs, row_features=e.features["train"])
    fields = {f.name: getattr(e, f.name) for f in dataclasses.fields(EvalSetup)}
    setup = TrainSetup(**dict(fields, chunk=chunk), optim=optim, loss=loss, batcher=batcher,
                       step_fn=None, state_bytes=state_bytes)
    state_sharding = placement.state_shardings(setup.abstract_state(), e.mesh)
    donate = placement.donates_state(state_bytes)

    def jitted(relation_chunk):
        return jit_train_step(model_config=e.mlm.config, loss_config=loss, optim_config=optim,
                              relation_chunk=relation_chunk, state_sharding=state_sharding,
                              donate=donate)

    if chunk is not None and not config.relation_chunk and jax.default_backend() != "cpu":
        # An accelerator takes the fastest chunk that fits: all relations at once when XLA's
        # own plan of that step fits in its free memory (the estimate behind the memory-first
        # chunk counts a chunk's transients for each relation; XLA shares them across the
        # vmap). The compiled plan is kept by the compilation cache.
        abstract = (placement.abstract_placed(setup.abstract_state(), state_sharding),
                    placement.abstract_placed(e.frozen, placement.replicated(e.mesh)),
                    placement.abstract_placed(placement.pad_batch(
                        _arrays(batcher.batch_at(0)), e.slots), placement.batch_sharding(e.mesh)),
                    jax.ShapeDtypeStruct((), jnp.float32))
        chunk = placement.fastest_fitting_chunk(
            chunk, lambda: placement.planned_peak_bytes(jitted(None), *abstract),
            placement.available_bytes(e.mesh), log)
    setup = dataclasses.replace(setup, chunk=chunk, step_fn=jitted(chunk))
    log(f"{len(e.relations)} relations x {len(e.spec.paths())} masked matrices (layers "
        f"{e.spec.layers[0]}..{e.spec.layers[-1]}); {setup.num_steps} steps; devices: mesh "
        f"{dict(e.mesh.shape)} ({e.mesh.devices.size} of {jax.device_count()} devices in "
        f"{jax.process_count()} process(es)), relation slots {e.slots} "
        f"({e.slots - len(e.relations)} inert), relations per device at a time: "
        f"{chunk or 'all'}; training state {state_bytes / 2**30:.2f} GiB (mask logits + Adam "
        f"moments in {optim.moment_dtype})")
    return setup


def evaluation_batches(config: ml_collections.ConfigDict, mlm: LoadedMLM, data: PreparedData,
                       encoded: Any, features: dict[str, np.ndarray], frozen: Any,
                       start_layer: int, mesh: jax.sharding.Mesh) -> list[dict[str, np.ndarray]]:
    """One split's evaluation batches ``[R, B, ...]``. Single tokens: the prompts, each batch
    with the answers each relation can have, so that one forward pass also gives the typed
    ranking among them (:func:`lamp_jax.ranking.restricted_rank`). Answers of any length: the
    rows that score every candidate (:func:`lamp_jax.data.answers.scoring_rows`), with their
    own frozen prefix."""
    num = len(data.relations)
    if data.candidates is None:
        candidates = typed_candidates(data.splits, config.data.split, num,
                                      mlm.config.vocab_size)
        return [dict(b, candidates=candidates) for b in RelationBatcher(
            encoded, config.batch_size, mode="per_relation", row_features=features)
            .eval_batches()]
    rows = scoring_rows(encoded, mlm.tokenizer, data.candidates, family_of(mlm.config).causal)
    prefix = [frozen_prefix(mlm.config, frozen, group, start_layer, DTYPES[config.dtype], mesh)
              for group in rows]
    return scoring_batches(rows, data.candidates, gold_candidates(encoded, data.candidates),
                           num, config.batch_size, prefix)


def optim_settings(config: ml_collections.ConfigDict) -> OptimConfig:
    o = config.optim
    return OptimConfig(o.learning_rate, o.warmup_fraction, o.clip_norm or None, o.weight_decay,
                       moment_dtype=o.get("moment_dtype", "float32"),
                       schedule=o.get("schedule", "linear"))


def mask_init(config: ml_collections.ConfigDict) -> MaskInit:
    m = config.mask
    return MaskInit(m.init, value=m.init_value, std=m.init_std, low=m.init_low,
                    high=m.init_high, sparsity=m.init_sparsity)


def frozen_prefix(model_config: Any, frozen: Any, encoded, start_layer: int, dtype,
                  mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """``{"hidden": [N, L, H]}`` for the batcher, or nothing when the prefix is not cached."""
    if not start_layer or len(encoded) == 0:
        return {}
    return {"hidden": prefix_hidden_states(frozen, encoded.input_ids, encoded.attention_mask,
                                           model_config=model_config, stop_layer=start_layer,
                                           dtype=dtype, progress=is_main(), mesh=mesh)}


def threshold_warning(logits: Any, num_relations: int, updates: int, optim: OptimConfig,
                      threshold: float) -> str | None:
    """A warning when no initial mask logit is close enough to the threshold for training to
    move it across: binary (threshold) inference then equals the full model by construction.
    Adam moves a logit by about the learning rate per update at most (lr 3e-4 over a few
    hundred updates: well under 1), so the paper's recipe with logits starting at 1 and
    threshold 0.5 (logit 0) cannot prune."""
    travel = max_logit_travel(updates, optim)
    boundary = logit(threshold)
    nearest = min(float(np.min(np.abs(np.asarray(leaf[:num_relations]) - boundary)))
                  for leaf in jax.tree.leaves(logits))
    if nearest <= travel:
        return None
    return (f"no mask logit can cross the threshold: the nearest starts {nearest:.3g} from it, "
            f"and {updates} updates at learning rate {optim.learning_rate:g} ({optim.schedule} "
            f"schedule) move a logit by at most about {travel:.3g}. Binary (threshold) results "
            "will equal the full model; the soft (expectation) results still show what was "
            "learned. A larger learning rate, more epochs or an init nearer the threshold "
            "(config.mask.init_value) lets masks prune.")


def _kernel(params: Any, path: Sequence[str]) -> Any:
    for key in path:
        params = params[key]
    return params


def _abstract_logits(spec: MaskSpec, params: Any, slots: int) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in spec.paths():
        insert_path(tree, path, jax.ShapeDtypeStruct((slots, *_kernel(params, path).shape),
                                                     jnp.float32))
    return tree


def _arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k != "index"}
