"""Everything a run needs, built once: ``setup_run(configs)`` -> a frozen :class:`RunSetup`.

    run = setup_run([config])                       # train.py: one configuration
    run = setup_run([config_a, config_b, ...])      # a sweep group: values differ, nothing else

In the order things happen: the model and the data (read, encoded, split), the mask layout and
modes, the device mesh and the relation slots, the frozen weights on every device, the frozen
prefix (layers below the lowest masked one, run once per prompt), the training batchers, the
evaluation batches, the relation chunk that fits in memory, and the jitted step and ranking
functions. The training state is not part of it: :meth:`RunSetup.init_state` builds it where
it will live, and the loop (:mod:`lamp_jax.loop`) either uses it or restores a checkpoint into
it, so a run never holds two states.

Several configurations that differ only in values (:data:`SLOT_KEYS`: learning rate, mask
init, seed) share one relation axis: slot ``v * R + r`` holds relation ``r`` of run ``v``,
with its own initial logits, noise, batches and learning rate, drawn exactly as that run
would draw them alone. Everything else is read from the first configuration.
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

from lamp_jax.config_checks import validate_config
from lamp_jax.data import RelationBatcher
from lamp_jax.data.prepare import PreparedData, prepare_data, resolve_sources
from lamp_jax.hosts import is_main, use_compile_cache
from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits, insert_path, logit
from lamp_jax.models import LoadedMLM, load_mlm
from lamp_jax.parallel import (
    ACCELERATOR_SHARE,
    DATA,
    RELATION,
    activation_bytes,
    available_bytes,
    pad_relations,
    relation_slots,
    replicate,
    run_mesh,
    run_relation_chunk,
    shard_batch,
    transient_budget,
    transient_bytes_per_relation,
    use_cpu_devices,
)
from lamp_jax.prefix import prefix_hidden_states
from lamp_jax.ranking import RankingResult, evaluate, make_rank_fn
from lamp_jax.step import (
    LossConfig,
    OptimConfig,
    TrainState,
    donates_state,
    init_placed_state,
    init_train_state,
    jit_train_step,
    make_optimizer,
    max_logit_travel,
    state_shardings,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Settings that only change values, not the program: runs side by side on one relation axis
# may differ in these (a sweep group), and in nothing else.
SLOT_KEYS = ("seed", "optim.learning_rate", "mask.init", "mask.init_value", "mask.init_std",
             "mask.init_low", "mask.init_high", "mask.init_sparsity")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """One run, or several side by side (a sweep group), ready to train and evaluate."""

    configs: tuple[ml_collections.ConfigDict, ...]
    model_source: str  # resolved: a hub id or a local directory
    data_path: Path
    mlm: LoadedMLM
    data: PreparedData
    spec: MaskSpec
    mode: MaskMode  # how the masks are trained
    eval_mode: MaskMode  # how dev selection and the report read them (config.mask.eval_kind)
    mesh: jax.sharding.Mesh
    slots: int  # length of the relation axis: runs x relations, padded with inert slots
    frozen: Any  # the model's weights on every device of the mesh
    start_layer: int  # the first layer that runs per step (0: no frozen prefix)
    chunk: int | None  # relations per device at a time (None: all)
    eval_sets: Mapping[str, list[dict[str, np.ndarray]]]  # per split, repeated per run
    report_split: str  # the split final_report reports on
    # Training only (None when the setup only evaluates, as lamp_jax.evaluate does):
    optim: OptimConfig | None
    batchers: tuple[RelationBatcher, ...] | None  # one per run
    step_fn: Callable[..., Any] | None
    state_bytes: int  # the training state (mask logits + Adam moments); logits when evaluating
    run_names: tuple[str, ...]  # how warnings name the runs of a group

    @property
    def config(self) -> ml_collections.ConfigDict:
        """The configuration of the program (shared by every run of a group)."""
        return self.configs[0]

    @property
    def relations(self) -> tuple[str, ...]:
        return self.data.relations

    @property
    def num_runs(self) -> int:
        return len(self.configs)

    @property
    def num_steps(self) -> int:
        return self.batchers[0].num_steps

    @property
    def eval_every(self) -> int:
        return self.config.eval_every or max(1, self.num_steps // self.config.epochs)

    @property
    def dtype(self) -> Any:
        return DTYPES[self.config.dtype]

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch ``[runs x R, ...]`` padded with inert slots and placed on the mesh."""
        return shard_batch({k: v for k, v in batch.items() if k != "index"}, self.mesh,
                           self.slots)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of ``step``: each run's own (its seed's batch order), run after run."""
        by_seed = {b.seed: b for b in self.batchers}
        batches = {seed: b.batch_at(step) for seed, b in by_seed.items()}  # once per seed
        if len(self.configs) == 1:
            return self.put(batches[self.config.seed])
        return self.put({k: np.concatenate([batches[c.seed][k] for c in self.configs])
                         for k in batches[self.config.seed]})

    def rank_fn(self, kind: str) -> Callable[..., Any]:
        """The jitted ranking of ``kind`` masks ("threshold" or "expectation")."""
        return make_rank_fn(self.mlm.config, self.mode.for_inference(kind),
                            relation_chunk=self.chunk, dtype=self.dtype,
                            start_layer=self.start_layer,
                            relation_shards=self.mesh.shape[RELATION])

    def scores(self, mask_logits: Any, split: str, kind: str | None = None,
               batches: Sequence[dict[str, np.ndarray]] | None = None) -> list[RankingResult]:
        """Per run, P@k and MRR of each of its relations on ``split`` (``mask_logits=None``:
        the full model), with ``kind`` masks (default: the eval mode's)."""
        kind = kind or self.eval_mode.kind
        result = evaluate(self.rank_fn(kind), mask_logits, self.frozen,
                          self.eval_sets[split] if batches is None else batches,
                          self.relations * self.num_runs, put_batch=self.put)
        return [_rows(result, v * len(self.relations), self.relations)
                for v in range(self.num_runs)]

    @cached_property
    def mask_layout(self) -> Any:
        """``jax.ShapeDtypeStruct`` of the ``[slots, ...]`` mask logits with their shardings:
        a checkpoint restores onto it."""
        sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(RELATION))
        tree: dict[str, Any] = {}
        for path in self.spec.paths():
            kernel = self.mlm.params
            for key in path:
                kernel = kernel[key]
            insert_path(tree, path, jax.ShapeDtypeStruct((self.slots, *kernel.shape),
                                                         jnp.float32, sharding=sharding))
        return tree

    def init_state(self, log=print) -> TrainState:
        """The initial training state, placed on the mesh: each run's logits from its own seed
        and init, each its own noise key and (several runs) learning rate. Warns when a run's
        masks cannot prune (:func:`threshold_warning`), once per distinct setting."""
        num, said = len(self.relations), set()
        logits, keys = [], []
        for v, config in enumerate(self.configs):
            key = jax.random.key(config.seed)
            logits.append(init_mask_logits(self.spec, self.mlm.params, num,
                                           _mask_init(config), self.mode, key))
            keys.append(key)
            warning = threshold_warning(logits[-1], num, int(max(self.batchers[v]
                                                                 .steps_per_relation)),
                                        optim_settings(config), self.mode.threshold)
            if warning and self.run_names[v] not in said:  # once per configuration
                said.add(self.run_names[v])
                log(f"warning{f' ({self.run_names[v]})' if self.num_runs > 1 else ''}: "
                    f"{warning}")
        logits = pad_relations(jax.tree.map(lambda *xs: np.concatenate(
            [np.asarray(x) for x in xs]), *logits), self.slots)
        return init_placed_state(logits, make_optimizer(self.optim), self._total_steps(),
                                 self._rng(keys), self.mesh, learning_rate=self._peaks())

    def run_record(self, run: int = 0) -> dict[str, Any]:
        """What ``run.json`` records for run ``run``: everything needed to rebuild its model,
        data and masks (read back by :class:`lamp_jax.run_dir.RunDirectory` only)."""
        from lamp_jax.data import labels_entry

        return {
            "model": self.model_source,
            "model_config": self.mlm.config.to_hf_dict(),
            "data": str(self.data_path),
            "dtype": self.config.dtype,
            "relations": list(self.relations),
            **labels_entry(self.relations, self.data.labels),
            "mask": {"layers": list(self.spec.layers), "matrices": list(self.spec.matrices),
                     "mode": self.mode.kind, "tau": self.mode.tau,
                     "threshold": self.mode.threshold, "ste_grad": self.mode.ste_grad,
                     "eval_kind": self.eval_mode.kind},
            "config": self.configs[run].to_dict(),
        }

    def _total_steps(self) -> np.ndarray:
        steps = np.concatenate([np.asarray(b.steps_per_relation) for b in self.batchers])
        return pad_relations(steps, self.slots)

    def _rng(self, keys: list[jax.Array]) -> jax.Array:
        if len(keys) == 1:
            return jax.random.fold_in(keys[0], 1)
        return jnp.stack([jax.random.fold_in(k, 1) for k in keys])

    def _peaks(self) -> np.ndarray | None:
        """Per-slot peak learning rates of a group; None for one run (the OptimConfig's)."""
        if len(self.configs) == 1:
            return None
        rates = np.repeat([c.optim.learning_rate for c in self.configs], len(self.relations))
        return pad_relations(rates, self.slots).astype(np.float32)


def setup_run(configs: Sequence[ml_collections.ConfigDict], log=print, *,
              training: bool = True, report_split: str = "test",
              sources: tuple[str, Path] | None = None, mlm: LoadedMLM | None = None,
              data: PreparedData | None = None, run_names: Sequence[str] | None = None,
              lap: Callable[[str], None] = lambda phase: None) -> RunSetup:
    """Builds the run (see the module docstring). ``training=False``: only what evaluating
    saved masks needs (no batchers, step or optimizer; only ``report_split``'s prompts).
    ``sources``: the model and data to read instead of the configuration's (a run directory's
    resolved ones); ``mlm`` / ``data``: a model and prepared data already in memory (the
    benchmarks' synthetic ones). ``run_names`` name the runs of a group in warnings; ``lap``
    is told when the "load" and "prefix" phases end (:class:`lamp_jax.loop.PhaseClock`)."""
    configs = tuple(configs)
    for config in configs:
        validate_config(config)
    _check_group(configs)
    config = configs[0]
    # First, before JAX starts its backends (a no-op once they have, e.g. later in a notebook).
    use_cpu_devices(config.cpu_devices)
    use_compile_cache(config.get("compile_cache_dir", ""))  # before the first compilation

    # The model and the data.
    model_source, data_path = sources or (
        (str(mlm.source), Path("<in memory>")) if mlm is not None else resolve_sources(config))
    if mlm is None:
        mlm = load_mlm(model_source, dtype=DTYPES[config.dtype])
    log(f"model: {model_source} ({mlm.config.family}, {mlm.config.num_layers} layers, "
        f"hidden {mlm.config.hidden_size}); data: {data_path}")
    if data is None:
        data = prepare_data(config, mlm.tokenizer, data_path, log)
    relations = data.relations
    lap("load")

    # The masks.
    m = config.mask
    spec = MaskSpec.create(mlm.config, m.first_layer, m.last_layer, tuple(m.matrices))
    mode = MaskMode(m.mode, tau=m.tau, threshold=m.threshold, ste_grad=m.ste_grad)
    eval_mode = mode.for_inference(m.eval_kind)

    # Devices: the relation axis holds runs x relations, padded to a multiple of its devices.
    mesh = run_mesh(len(configs) * len(relations), config.batch_size,
                    config.relation_parallelism or None)
    slots = relation_slots(len(configs) * len(relations), mesh)
    frozen = replicate(mlm.params, mesh)
    # Layers below the lowest masked one are frozen: their output is computed once per prompt.
    start_layer = min(spec.layers) if config.cache_frozen_prefix else 0
    splits = SPLITS if training else (report_split,)
    features = {name: frozen_prefix(mlm.config, frozen, data.splits[name], start_layer,
                                    DTYPES[config.dtype], mesh) for name in splits}
    lap("prefix")

    optim = batchers = None
    if training:
        optim = optim_settings(config)
        by_seed: dict[int, RelationBatcher] = {}
        for c in configs:  # runs of one seed share a batch order
            if c.seed not in by_seed:
                by_seed[c.seed] = RelationBatcher(data.splits["train"], c.batch_size, c.seed,
                                                  c.batching, c.epochs,
                                                  row_features=features["train"])
        batchers = tuple(by_seed[c.seed] for c in configs)
    eval_sets = {}
    for name in splits:
        batches = list(RelationBatcher(data.splits[name], config.batch_size, mode="per_relation",
                                       row_features=features[name]).eval_batches())
        # Every run meets the same prompts: the batches repeat along the relation axis.
        eval_sets[name] = batches if len(configs) == 1 else [
            {k: np.concatenate([v] * len(configs)) for k, v in b.items()} for b in batches]

    # Memory: the state, and the relation chunk that fits beside it.
    mask_params = sum(int(np.prod(_kernel(mlm.params, p).shape)) for p in spec.paths())
    moment_bytes = jnp.dtype(optim.moment_dtype).itemsize if training else 0
    state_bytes = slots * mask_params * (4 + 2 * moment_bytes)
    hint = allocator_hint(slots * mask_params * 4, jax.default_backend(), platform.system(),
                          os.environ, mesh.devices.size)
    if hint and training:
        log(hint)
    length = data.splits[splits[0]].input_ids.shape[1]
    chunk = relation_chunk_for(config, mlm.config, len(configs) * len(relations), mesh, length,
                               mask_params, state_bytes, log if training else None,
                               placed=False,
                               relations_per_run=len(relations) if len(configs) > 1 else None)

    step_fn = None
    if training:
        loss = LossConfig(mode, config.loss.sparsity_weight, config.loss.target_sparsity,
                          compute_dtype=DTYPES[config.dtype], start_layer=start_layer)
        abstract = jax.eval_shape(partial(
            init_train_state, optimizer=make_optimizer(optim),
            total_steps=np.zeros(slots, np.int32), rng=jax.random.key(0),
            learning_rate=None if len(configs) == 1 else np.zeros(slots, np.float32)),
            _abstract_logits(spec, mlm.params, slots))
        make_step = partial(
            jit_train_step, model_config=mlm.config, loss_config=loss, optim_config=optim,
            state_sharding=state_shardings(abstract, mesh),
            relations_per_run=len(relations) if len(configs) > 1 else None,
            donate=donates_state(state_bytes))
        if chunk is not None and not config.relation_chunk and jax.default_backend() != "cpu":
            # An accelerator takes the fastest chunk that fits: all relations at once when
            # XLA's own plan of that step fits in its free memory (the estimate behind the
            # memory-first chunk counts a chunk's transients for each relation; XLA shares
            # them across the vmap). The compiled plan is kept by the compilation cache.
            chunk = fastest_fitting_chunk(chunk, lambda: planned_peak_bytes(
                make_step(relation_chunk=None), abstract, frozen,
                batchers[0].batch_at(0), mesh, slots), available_bytes(mesh), log)
        step_fn = make_step(relation_chunk=chunk)
        log(f"{len(relations)} relations x {len(spec.paths())} masked matrices (layers "
            f"{spec.layers[0]}..{spec.layers[-1]})"
            + (f" x {len(configs)} runs" if len(configs) > 1 else "")
            + f"; {batchers[0].num_steps} steps; devices: mesh {dict(mesh.shape)} "
            f"({mesh.devices.size} of {jax.device_count()} devices in {jax.process_count()} "
            f"process(es)), relation slots {slots} ({slots - len(configs) * len(relations)} "
            f"inert), relations per device at a time: {chunk or 'all'}; training state "
            f"{state_bytes / 2**30:.2f} GiB (mask logits + Adam moments in "
            f"{optim.moment_dtype})")
    return RunSetup(configs, model_source, data_path, mlm, data, spec, mode, eval_mode, mesh,
                    slots, frozen, start_layer, chunk, eval_sets, report_split, optim,
                    batchers, step_fn, state_bytes,
                    tuple(run_names or (f"run {v}" for v in range(len(configs)))))


def optim_settings(config: ml_collections.ConfigDict) -> OptimConfig:
    o = config.optim
    return OptimConfig(o.learning_rate, o.warmup_fraction, o.clip_norm or None, o.weight_decay,
                       moment_dtype=o.get("moment_dtype", "float32"),
                       schedule=o.get("schedule", "linear"))


def frozen_prefix(model_config: Any, frozen: Any, encoded, start_layer: int, dtype,
                  mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """``{"hidden": [N, L, H]}`` for the batcher, or nothing when the prefix is not cached."""
    if not start_layer or len(encoded) == 0:
        return {}
    return {"hidden": prefix_hidden_states(frozen, encoded.input_ids, encoded.attention_mask,
                                           model_config=model_config, stop_layer=start_layer,
                                           dtype=dtype, progress=is_main(), mesh=mesh)}


def relation_chunk_for(config, model_config: Any, num_relations: int,
                       mesh: jax.sharding.Mesh, length: int, mask_params: int,
                       state_bytes: int, log=None, placed: bool = True,
                       relations_per_run: int | None = None) -> int | None:
    """``config.relation_chunk``, or for 0 the automatic choice for batches of prompts padded
    to ``length`` (every split of a run shares it) and relations of ``mask_params`` mask
    weights, in the memory the devices have left beside a state of ``state_bytes`` (already
    on the devices, or with ``placed=False`` about to be). With ``log``: says when a larger
    chunk would fit in free memory and run faster.

    ``relations_per_run``: the relations of one run, when the axis holds a sweep group's
    runs. On a CPU such a group runs in chunks of one run's share of a device at most: the
    shapes train.py computes, so each run's masks come out as train.py's, byte for byte, and
    faster than all at once (12 runs x 8 relations on 2 cores: 48 slots per device at once
    80 s of steps, in chunks of 4 66 s; bench/README.md)."""
    # ModernBERT's fused Wi gives [input | gate]: twice the FFN width.
    width = model_config.intermediate_size * (2 if model_config.family == "modernbert" else 1)
    size = activation_bytes(config.batch_size * length, width, model_config.hidden_size,
                            DTYPES[config.dtype])
    per_relation = transient_bytes_per_relation(mask_params, size, model_config.num_layers)
    reserve = 0 if placed else state_bytes // mesh.devices.size
    budget = transient_budget(mesh, state_bytes, reserve)
    chunk = run_relation_chunk(config.relation_chunk, num_relations, mesh, per_relation, budget)
    if relations_per_run and not config.relation_chunk and jax.default_backend() == "cpu":
        one_run = relation_slots(relations_per_run, mesh) // mesh.shape[RELATION]
        return min(chunk or one_run, one_run)  # larger chunks are slower here: no hint
    free = available_bytes(mesh)
    if log is None or config.relation_chunk or free is None:
        return chunk
    fastest = run_relation_chunk(0, num_relations, mesh, per_relation,
                                 int(ACCELERATOR_SHARE * (free - reserve)))
    local = relation_slots(num_relations, mesh) // mesh.shape[RELATION]
    if (fastest or local) > (chunk or local):
        extra = ((fastest or local) - chunk) * per_relation
        log(f"memory first: {chunk} relation(s) per device at a time keep the step within "
            f"1.25x the state; --config.relation_chunk={fastest or local} fits in free memory "
            f"too: faster steps for about {extra / 2**30:.1f} GiB more per device")
    return chunk


def fastest_fitting_chunk(memory_first: int | None, plan_all_at_once: Callable[[], int],
                          free_bytes: int | None, log=print) -> int | None:
    """On an accelerator: all relations at once (None) when XLA's plan of that step, in bytes
    per device (``plan_all_at_once()``, the state and frozen weights included), fits in
    :data:`~lamp_jax.parallel.ACCELERATOR_SHARE` of the device's free memory (before the state
    is placed); else the ``memory_first`` chunk. bert-base x 16 relations on an H200: all at
    once 0.023 s per bfloat16 step at 1.6x the state, one at a time 0.054 s at 1.11x."""
    if memory_first is None or free_bytes is None:
        return memory_first
    peak = plan_all_at_once()
    if peak <= ACCELERATOR_SHARE * free_bytes:
        log(f"all relations at once: XLA plans {peak / 2**30:.2f} GiB per device for the step, "
            f"within {ACCELERATOR_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB free")
        return None
    log(f"memory first: all relations at once would take {peak / 2**30:.2f} GiB per device "
        f"(XLA's plan), more than {ACCELERATOR_SHARE:.0%} of the {free_bytes / 2**30:.1f} GiB "
        f"free; {memory_first} relation(s) per device at a time")
    return memory_first


def planned_peak_bytes(step_fn: Callable[..., Any], abstract_state: TrainState, frozen: Any,
                       batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                       slots: int) -> int:
    """XLA's plan of one step, in bytes per device: its arguments (state, frozen weights,
    batch), outputs and temporaries, less what the donated state lends the new one. Compiled
    for abstract inputs: nothing is allocated."""
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         abstract_state, state_shardings(abstract_state, mesh))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(RELATION, DATA))
    placed_batch = {k: jax.ShapeDtypeStruct((slots, *v.shape[1:]), v.dtype, sharding=rows)
                    for k, v in batch.items() if k != "index"}
    plan = step_fn.lower(state, frozen, placed_batch).compile().memory_analysis()
    return int(plan.argument_size_in_bytes + plan.output_size_in_bytes
               + plan.temp_size_in_bytes - plan.alias_size_in_bytes)


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


# glibc's malloc returns every large buffer of a step to the kernel and maps it again in the next
# one, which zeroes it page by page. These settings keep one heap and reuse it (README, Speed).
CPU_MALLOC_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                       "glibc.malloc.trim_threshold=68719476736")


def allocator_hint(mask_logit_bytes: int, backend: str, system: str,
                   environ: Mapping[str, str], devices: int = 1) -> str | None:
    """A tip for large masks on a Linux CPU under glibc's default malloc, else None.

    Measured with bert-base shapes (4 relations x 8 prompts), one device: 1.76-1.85 s per step
    without, 1.02 s with the settings. With the small benchmark config they were 8-12% slower,
    so the tip only appears from 256 MiB of mask logits up. Their single heap also serialises
    the allocations of several CPU devices (bert-base on 2 devices: 1.26 s without, 1.47 s
    with; on one device with them: 1.06 s), so with ``devices`` > 1 the tip says to use one.
    """
    if (backend != "cpu" or system != "Linux" or mask_logit_bytes < 256 * 2**20
            or "GLIBC_TUNABLES" in environ or "LD_PRELOAD" in environ):
        return None
    return (f"tip: {mask_logit_bytes / 2**30:.1f} GiB of mask logits on a CPU; starting with "
            f"GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}"
            + (" and --config.cpu_devices=1" if devices > 1 else "")
            + " made bert-base steps 1.7x faster here (README, Speed)")


def _mask_init(config: ml_collections.ConfigDict) -> MaskInit:
    m = config.mask
    return MaskInit(m.init, value=m.init_value, std=m.init_std, low=m.init_low,
                    high=m.init_high, sparsity=m.init_sparsity)


def _check_group(configs: Sequence[ml_collections.ConfigDict]) -> None:
    """Runs side by side may differ in :data:`SLOT_KEYS` only."""
    def program(config):
        flat = dict(_flatten(config.to_dict()))
        return {k: v for k, v in flat.items() if k not in SLOT_KEYS}

    first = program(configs[0])
    for config in configs[1:]:
        other = program(config)
        differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if differing:
            raise ValueError(f"runs side by side must differ only in {SLOT_KEYS}; these "
                             f"differ: {differing}")


def _flatten(tree: Mapping[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


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


def _rows(result: RankingResult, first: int, relations: Sequence[str]) -> RankingResult:
    rows = slice(first, first + len(relations))
    return RankingResult(tuple(relations), result.ks, result.hits[rows],
                         result.reciprocal_rank_sum[rows], result.count[rows])
