"""The training run behind ``train.py``: data -> masks for every relation -> metrics, plots, files.

Side effects (reading data, printing, checkpoints, plots) live here; everything numeric is a
call into the pure functions of ``masks``, ``training`` and ``evaluation``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from tqdm.auto import tqdm

from lamp_jax import evaluation, plots
from lamp_jax.checkpoint import (
    RunCheckpoints,
    UnreadableCheckpointsError,
    export_binary_masks,
)
from lamp_jax.config_checks import validate_config
from lamp_jax.data import (
    RelationBatcher,
    encode_facts,
    fetch_lama,
    labels_entry,
    read_for_config,
    reference_protocol_split,
    relation_display,
    split_by_fact,
)
from lamp_jax.hosts import (
    append_text,
    is_main,
    main_log,
    peak_rss_bytes,
    return_free_memory,
    sync,
    to_host,
    write_text,
)
from lamp_jax.masks import (
    MaskInit,
    MaskMode,
    MaskSpec,
    init_mask_logits,
    logit,
    pruned_fraction,
    sparsity_stats,
)
from lamp_jax.models.bert import ModelConfig
from lamp_jax.models.params import LoadedMLM, load_mlm
from lamp_jax.parallel import (
    ACCELERATOR_SHARE,
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
from lamp_jax.paths import run_dir
from lamp_jax.prefix import prefix_hidden_states
from lamp_jax.summaries import ScalarWriter
from lamp_jax.training import (
    LossConfig,
    OptimConfig,
    init_placed_state,
    jit_train_step,
    make_optimizer,
    max_logit_travel,
    state_nbytes,
    state_shardings,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# From this size of training state up, a CPU run donates the old state to the step.
DONATE_ON_CPU_BYTES = 256 * 2**20
# Below this size of training state, checkpoints are saved in the background.
BACKGROUND_SAVE_BYTES = 2**30


def resolve_model_and_data(config: ml_collections.ConfigDict) -> tuple[str, Path]:
    """Where the model and the LAMA-format jsonl come from ("embedded" = shipped toy world)."""
    model = config.model
    source = config.data.source
    if model == "embedded" or source == "embedded":
        from lamp_jax.embedded import ensure_embedded_model

        embedded = ensure_embedded_model()
        model = str(embedded) if model == "embedded" else model
        if source == "embedded":
            return model, embedded / "lama_probe.jsonl"
    if source == "lama":
        return model, fetch_lama(config.data.get("lama_set", "conceptnet"), config.data.cache_dir)
    return model, Path(source).expanduser()


def load_model_and_data(config: ml_collections.ConfigDict, log=print):
    """The model and the run's data, read, encoded and split (:func:`prepare_data`).

    Returns ``(model_source, jsonl, mlm, relations, data, facts_by_split)``."""
    model_source, jsonl = resolve_model_and_data(config)
    mlm = load_mlm(model_source, dtype=DTYPES[config.dtype])
    log(f"model: {model_source} ({mlm.config.family}, {mlm.config.num_layers} layers, "
        f"hidden {mlm.config.hidden_size}); data: {jsonl}")
    relations, data, facts_by_split = prepare_data(config, mlm.tokenizer, jsonl, log)
    return model_source, jsonl, mlm, relations, data, facts_by_split


def optim_settings(config: ml_collections.ConfigDict) -> OptimConfig:
    o = config.optim
    return OptimConfig(o.learning_rate, o.warmup_fraction, o.clip_norm or None, o.weight_decay,
                       moment_dtype=o.get("moment_dtype", "float32"),
                       schedule=o.get("schedule", "linear"))


def loss_settings(config: ml_collections.ConfigDict, mode: MaskMode, start_layer: int
                  ) -> LossConfig:
    return LossConfig(mode, config.loss.sparsity_weight, config.loss.target_sparsity,
                      compute_dtype=DTYPES[config.dtype], start_layer=start_layer)


def evaluation_batches(config: ml_collections.ConfigDict, data, features
                       ) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per split, its prompts in ``[R, B, ...]`` batches, each relation's own in order."""
    return {name: list(RelationBatcher(d, config.batch_size, mode="per_relation",
                                       row_features=features[name]).eval_batches())
            for name, d in data.items()}


def mask_settings(config: ml_collections.ConfigDict, mlm: LoadedMLM):
    m = config.mask
    spec = MaskSpec.create(mlm.config, m.first_layer, m.last_layer, tuple(m.matrices))
    mode = MaskMode(m.mode, tau=m.tau, threshold=m.threshold, ste_grad=m.ste_grad)
    init = MaskInit(m.init, value=m.init_value, std=m.init_std, low=m.init_low,
                    high=m.init_high, sparsity=m.init_sparsity)
    return spec, mode, init


def prepare_data(config, tokenizer, jsonl: Path, log=print):
    """Reads, encodes and splits; prints what was kept and skipped (nothing silently).

    Returns the relations, the encoded prompts per split, and per split its facts (uuid,
    relation, subject, object, its sentences as read): what ``split.json`` records."""
    wanted = requested_relations(config.data.relations) or None
    read = read_for_config(config.data, jsonl)  # the LAMA set config.data.lama_set names
    facts, present = read.facts, read.relations
    log(read.report.summary())
    relations = wanted or tuple(present)
    encoded, encode_report = encode_facts(facts, tokenizer, relations,
                                          max_length=config.data.max_length, labels=read.labels)
    log(encode_report.summary())
    if len(encoded) == 0:
        raise ValueError(f"no usable prompts in {jsonl} (see the report above)")
    empty = [r for r, n in zip(relations, encoded.counts_per_relation(), strict=True) if n == 0]
    if empty and wanted:
        raise ValueError(f"config.data.relations lists {empty}, which have no usable prompts in "
                         f"{jsonl}; relations with prompts: {sorted(set(present) - set(empty))}")
    if empty:  # nothing was asked for by name: train the others, and say which were left out
        log(f"relations skipped: {len(empty)} ({', '.join(empty)}): every prompt was dropped "
            "at encoding (see the report above)")
        relations = tuple(r for r in relations if r not in empty)
        encoded, _ = encode_facts(facts, tokenizer, relations, max_length=config.data.max_length,
                                  labels=read.labels)
    if config.data.split == "reference":
        log("split: reference protocol (train = dev = test = all prompts; NOT held-out numbers)")
        splits = reference_protocol_split(len(encoded))
    else:
        splits = split_by_fact(encoded, tuple(config.data.fractions), config.data.seed)
    data = {name: encoded.subset(idx) for name, idx in splits.items()}
    log("prompts per split: " + ", ".join(f"{k}={len(v)}" for k, v in data.items()))
    return relations, data, _facts_by_split(facts, data)


def requested_relations(relations: Any) -> tuple[str, ...]:
    """``config.data.relations`` as a tuple of names. On the command line,
    ``--config.data.relations=AtLocation,IsA`` reaches the config as the 1-tuple
    ``("AtLocation,IsA",)`` (ml_collections parses no commas), so names are split on commas."""
    if isinstance(relations, str):
        relations = (relations,)
    return tuple(name.strip() for item in relations for name in item.split(",") if name.strip())


def _facts_by_split(facts, data) -> dict[str, list[dict[str, Any]]]:
    """Per split, the facts whose prompts it holds, in file order."""
    out = {}
    for name, encoded in data.items():
        out[name] = [{"uuid": facts[i].uuid, "relation": facts[i].relation,
                      "subject": facts[i].subject, "object": facts[i].obj,
                      "sentences": list(facts[i].sentences)}
                     for i in np.unique(encoded.fact_index)]
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       log=print) -> dict[str, Any]:
    """Learns one mask per relation, selects by dev macro P@1, reports held-out test metrics.

    Resumes from ``workdir/checkpoints`` when a run was interrupted. Writes ``run.json``,
    ``metrics.json``, ``masks.npz`` and ``plots/*.png`` into ``workdir`` and returns the metrics.
    """
    validate_config(config)
    clock = PhaseClock()
    # First, before JAX starts its backends (a no-op once they have, e.g. later in a notebook).
    use_cpu_devices(config.cpu_devices)
    log = main_log(log)
    workdir = _writable_workdir(workdir)
    dtype = DTYPES[config.dtype]
    model_source, jsonl, mlm, relations, data, facts_by_split = load_model_and_data(config, log)
    spec, mode, init = mask_settings(config, mlm)
    eval_mode = mode.for_inference(config.mask.eval_kind)
    clock.lap("load")

    mesh = run_mesh(len(relations), config.batch_size, config.relation_parallelism or None)
    # The relation axis, padded with inert relations to a multiple of its devices.
    slots = relation_slots(len(relations), mesh)
    frozen = replicate(mlm.params, mesh)
    # Layers below the lowest masked one are frozen: their output is computed once per prompt.
    start_layer = min(spec.layers) if config.cache_frozen_prefix else 0
    features = {name: frozen_prefix(mlm.config, frozen, d, start_layer, dtype, mesh)
                for name, d in data.items()}
    train = RelationBatcher(data["train"], config.batch_size, config.seed, config.batching,
                            config.epochs, row_features=features["train"])
    clock.lap("prefix")

    rng = jax.random.key(config.seed)
    # Initialised for the real relations (so the values do not depend on the topology), then
    # padded with inert slots: they get no data, so the step never updates them.
    logits = pad_relations(init_mask_logits(spec, mlm.params, len(relations), init, mode, rng),
                           slots)
    hint = allocator_hint(sum(x.nbytes for x in jax.tree.leaves(logits)), jax.default_backend(),
                          platform.system(), os.environ, mesh.devices.size)
    if hint:
        log(hint)
    optim = optim_settings(config)
    warning = threshold_warning(logits, len(relations), max(train.steps_per_relation), optim,
                                mode.threshold)
    if warning:
        log("warning: " + warning)
    loss = loss_settings(config, mode, start_layer)
    state = init_placed_state(logits, make_optimizer(optim),
                              pad_relations(np.asarray(train.steps_per_relation), slots),
                              jax.random.fold_in(rng, 1), mesh)
    del logits  # the host copy: 2.7 GB for bert-base x 16 relations, for the whole run
    state_bytes = state_nbytes(state)
    # After the state is placed: the chunk fits in the memory that is left.
    chunk = relation_chunk_for(config, mlm.config, len(relations), mesh,
                               data["train"].input_ids.shape[1],
                               mask_params_per_relation(state.mask_logits), state_bytes, log)
    log(f"{len(relations)} relations x {len(spec.paths())} masked matrices (layers "
        f"{spec.layers[0]}..{spec.layers[-1]}); {train.num_steps} steps; devices: mesh "
        f"{dict(mesh.shape)} ({mesh.devices.size} of {jax.device_count()} devices in "
        f"{jax.process_count()} process(es)), relation slots {slots} ({slots - len(relations)} "
        f"inert), relations per device at a time: {chunk or 'all'}; training state "
        f"{state_bytes / 2**30:.2f} GiB (mask logits + Adam moments in "
        f"{optim.moment_dtype})")
    donate = donates_state(state_bytes)
    step_fn = jit_train_step(model_config=mlm.config, loss_config=loss, optim_config=optim,
                             relation_chunk=chunk, state_sharding=state_shardings(state, mesh),
                             donate=donate)
    shards = mesh.shape[RELATION]
    rank_fn = evaluation.make_rank_fn(mlm.config, eval_mode, relation_chunk=chunk, dtype=dtype,
                                      start_layer=start_layer, relation_shards=shards)
    put = lambda b: shard_batch(b, mesh, slots)  # noqa: E731
    eval_sets = evaluation_batches(config, data, features)

    run_record = _run_json(config, model_source, jsonl, relations, spec, mode, eval_mode,
                           mlm.config, data["train"].relation_labels)
    _check_resumable(workdir, run_record)
    # A background save must first copy the whole state off the devices (the next step
    # overwrites the donated buffers): bert-base x 16 relations on a GPU took 18 GB of host
    # memory to save. Large states are saved in place, 1 GB at a time, while training waits.
    checkpoints = RunCheckpoints(workdir, background=state_bytes < BACKGROUND_SAVE_BYTES)
    try:
        restored = checkpoints.restore_latest(state, log)
    except UnreadableCheckpointsError as err:
        if config.on_unreadable_checkpoints != "start_over":
            raise
        log(f"warning: {str(err).splitlines()[0]}; starting over, as "
            "config.on_unreadable_checkpoints='start_over' asks")
        checkpoints.start_over(log)
        restored = None
    # Written once the run is known to go ahead: a refused resume changes nothing.
    sync("run.json checked")  # before process 0 replaces it
    write_text(workdir / "run.json", json.dumps(run_record, indent=2, default=str))
    # Which facts were held out: anyone can recompute the metrics from this, the masks and
    # the model, without our code.
    write_text(workdir / "split.json", json.dumps(facts_by_split, indent=1))
    # The evaluations logged up to the resumed step, kept; those after it will be redone.
    earlier = _truncate_metrics_log(workdir / "metrics.jsonl",
                                    int(restored.step) if restored is not None else 0)
    if restored is not None:
        state = restored
        log(f"resumed from step {int(state.step)}")
        # The run's own record of every resume, read back into metrics.json.
        append_text(workdir / "metrics.jsonl",
                    json.dumps({"step": int(state.step), "event": "resumed"}) + "\n")
    clock.lap("setup")

    def dev_score(logits) -> evaluation.RankingResult:
        return evaluation.evaluate(rank_fn, logits, frozen, eval_sets["dev"], relations,
                                   put_batch=put)

    eval_every = config.eval_every or max(1, train.num_steps // config.epochs)
    scalars = ScalarWriter(workdir, int(state.step))
    history = [r for r in earlier if "event" not in r]
    start, first_step, pending, metrics = time.perf_counter(), int(state.step), None, None
    bar = tqdm(range(first_step, train.num_steps), desc="training masks", unit="step",
               initial=first_step, total=train.num_steps, disable=not is_main())
    for step in bar:
        state, metrics = step_fn(state, frozen, put(_model_inputs(train.batch_at(step))))
        done = step + 1
        # Checked one step late, so the host never stalls the device queue to look.
        if pending is not None:
            _check_finite(pending, done - 1, relations, config.on_nonfinite, log)
        pending = metrics
        if done % eval_every == 0 or done == train.num_steps:
            _check_finite(pending, done, relations, config.on_nonfinite, log)
            pending = None
            clock.lap("steps", state.mask_logits)
            dev = dev_score(state.mask_logits)
            seen = to_host({k: metrics[k] for k in ("ce", "count")})
            ce = seen["ce"][seen["count"] > 0]
            record = {"step": done, "train_ce": float(ce.mean()) if ce.size else None,
                      "dev_macro_P@1": dev.macro(1), "dev_micro_P@1": dev.micro(1)}
            history.append(record)
            bar.set_postfix(dev_macro_p1=f"{dev.macro(1):.3f}")
            pruned = to_host(pruned_fraction(state.mask_logits, mode.threshold))
            scalars.write(done, {
                "train/ce": record["train_ce"], "dev/macro_P1": dev.macro(1),
                "dev/micro_P1": dev.micro(1),
                **{f"dev_P1/{r}": p for r, p in zip(relations, dev.precision_at(1),
                                                      strict=True)},
                **{f"sparsity/{r}": p for r, p in zip(relations, pruned, strict=False)}})
            clock.lap("evaluation")
            if checkpoints.save_best(done, state.mask_logits, dev.macro(1)):
                record["best"] = True
            saved = checkpoints.save(state)
            if saved:
                record["checkpoint_GB"] = round(saved["bytes"] / 1e9, 3)
                record["checkpoint_s"] = round(saved["seconds"], 2)
            if state_bytes >= BACKGROUND_SAVE_BYTES:
                # The save's and the evaluation's host buffers are free now, but glibc kept
                # them mapped: bert-base x 16 relations crept from 9.2 to 10.5 GiB between
                # two steps on a CPU (bench/README.md, memory).
                return_free_memory()
            clock.lap("checkpoints")
            append_text(workdir / "metrics.jsonl", json.dumps(record) + "\n")
        if config.stop_after and done - first_step >= config.stop_after and done < train.num_steps:
            checkpoints.save(state)
            checkpoints.wait()
            checkpoints.close()
            bar.close()
            scalars.close()
            return {"stopped_at": done, "history": history,
                    "resumed_from": _resumes(workdir / "metrics.jsonl")}
    bar.close()
    scalars.close()
    checkpoints.wait()
    clock.lap("checkpoints")
    train_seconds = time.perf_counter() - start

    # The best masks replace the training state: only their layout is kept (bert-base x 16
    # relations: 8 GB freed before the final evaluations).
    layout = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state.mask_logits)
    del state, metrics, pending
    best = checkpoints.restore_best(layout)
    summary = final_report(config, workdir, mlm.config, best, frozen, eval_sets, relations,
                            spec, mode, mesh, log, start_layer, data["test"].relation_labels)
    clock.lap("report")
    summary.update(history=history, train_seconds=train_seconds, steps=train.num_steps,
                   best_dev_macro_P1=checkpoints.best_score(),
                   resumed_from=_resumes(workdir / "metrics.jsonl"),
                   resources=clock.resources())
    log(clock.summary())
    write_text(workdir / "metrics.json", json.dumps(summary, indent=2))
    checkpoints.close()
    return summary


class PhaseClock:
    """Wall seconds per phase of a run (load, prefix, setup, steps, evaluation, checkpoints,
    report) and peak memory. A lap ends a phase; ``lap(phase, arrays)`` first waits for the
    device work behind ``arrays``, so asynchronous steps are charged to "steps"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started_unix = time.time()
        self._start = self._mark = time.perf_counter()
        self.timeline: list[tuple[str, float, float]] = []  # (phase, from s, to s)

    def lap(self, phase: str, arrays: Any = None) -> None:
        if arrays is not None:
            jax.block_until_ready(arrays)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._mark
        self.timeline.append((phase, round(self._mark - self._start, 3),
                              round(now - self._start, 3)))
        self._mark = now

    def resources(self) -> dict[str, Any]:
        device_peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use")
                        for d in jax.local_devices() if d.platform != "cpu"]
        return {"phase_seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "phase_timeline": self.timeline, "started_unix": self.started_unix,
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_device_bytes": max([p for p in device_peaks if p], default=None)}

    def summary(self) -> str:
        res = self.resources()
        phases = ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items())
        device = (f", peak device memory {res['peak_device_bytes'] / 2**30:.2f} GiB"
                  if res["peak_device_bytes"] else "")
        return (f"wall seconds per phase: {phases}; peak RSS "
                f"{res['peak_rss_bytes'] / 2**30:.2f} GiB{device}")


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


def _writable_workdir(workdir: str | Path) -> epath.Path:
    """Creates the workdir (a local path or a gs://... URL, :mod:`lamp_jax.paths`) and proves
    it writable now, not at the first checkpoint."""
    workdir = run_dir(workdir)
    probe = workdir / f".write_test.{jax.process_index()}"  # one per process: no races
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write to the workdir {workdir}: {err.strerror or err} "
                      "(checkpoints, metrics and plots go there; pick another --workdir or "
                      "free space)") from err
    return workdir


def _truncate_metrics_log(path: Path, step: int) -> list[dict[str, Any]]:
    """Drops records of steps after the resumed one: they will be recomputed, not duplicated.
    Returns the records kept (process 0; elsewhere nothing)."""
    if not path.exists() or not is_main():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [record for record in kept if record["step"] <= step]
    write_text(path, "".join(json.dumps(record) + "\n" for record in kept))
    return kept


def _check_finite(metrics, step: int, relations, policy: str, log) -> None:
    """The step already refused non-finite updates; here we stop or say it was skipped."""
    finite = to_host(metrics["finite"])[: len(relations)]
    if finite.all():
        return
    bad = [r for r, ok in zip(relations, finite, strict=True) if not ok]
    message = (f"non-finite loss or gradient at step {step} for relation(s) {bad}; their masks "
               "were left unchanged")
    if policy == "stop":
        raise FloatingPointError(message + " (config.on_nonfinite='skip' skips such updates)")
    log("warning: " + message)


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


def frozen_prefix(model_config: ModelConfig, frozen: Any, encoded, start_layer: int, dtype,
                   mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
    """``{"hidden": [N, L, H]}`` for the batcher, or nothing when the prefix is not cached."""
    if not start_layer or len(encoded) == 0:
        return {}
    return {"hidden": prefix_hidden_states(frozen, encoded.input_ids, encoded.attention_mask,
                                           model_config=model_config, stop_layer=start_layer,
                                           dtype=dtype, progress=is_main(), mesh=mesh)}


def _model_inputs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in batch.items() if k != "index"}


def final_report(config, workdir, model_config, best, frozen, eval_sets, relations, spec, mode,
                  mesh: jax.sharding.Mesh, log, start_layer: int = 0,
                  labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    test = eval_sets["test"]
    put = lambda b: shard_batch(b, mesh, relation_slots(len(relations), mesh))  # noqa: E731
    dtype = DTYPES[config.dtype]
    chunk = relation_chunk_for(config, model_config, len(relations), mesh,
                               test[0]["input_ids"].shape[-1] if test else 1,
                               mask_params_per_relation(best),
                               sum(x.nbytes for x in jax.tree.leaves(best)))
    shards = mesh.shape[RELATION]
    eval_mode = mode.for_inference(config.mask.eval_kind)
    rank_fn = evaluation.make_rank_fn(model_config, eval_mode, relation_chunk=chunk, dtype=dtype,
                                      start_layer=start_layer, relation_shards=shards)
    pruned = evaluation.evaluate(rank_fn, best, frozen, test, relations, put_batch=put)
    full = evaluation.evaluate(rank_fn, None, frozen, test, relations, put_batch=put)
    # The other inference kind too: binary subnetwork vs soft sigmoid(G) multipliers.
    other_kind = "expectation" if config.mask.eval_kind == "threshold" else "threshold"
    other_fn = evaluation.make_rank_fn(model_config, mode.for_inference(other_kind),
                                       relation_chunk=chunk, dtype=dtype, start_layer=start_layer,
                                       relation_shards=shards)
    other = evaluation.evaluate(other_fn, best, frozen, test, relations, put_batch=put)
    sparsity = {k: v[: len(relations)]
                for k, v in sparsity_stats(best, spec, mode.threshold).items()}
    summary = {"test": {"pruned": pruned.summary(), "full": full.summary(),
                        f"pruned_{other_kind}": other.summary()},
               "split": config.data.split,
               "sparsity": {k: v.tolist() for k, v in sparsity.items()},
               "relations": list(relations), **labels_entry(relations, labels or {})}
    shown = relation_display(relations, labels or {})  # "P19 (place of birth)"
    log(_table(shown, full, pruned, sparsity["total"]))
    log(f"test macro P@1: full {full.macro(1):.3f} -> pruned {pruned.macro(1):.3f}; "
        f"micro P@1: full {full.micro(1):.3f} -> pruned {pruned.micro(1):.3f} (one run, seed "
        f"{config.seed}; mean +- std over seeds: python -m lamp_jax.sweep --seeds 3)")
    spec_matrix = None
    if config.specialization:
        spec_matrix = evaluation.specialization_matrix(rank_fn, best, frozen, test, relations,
                                                       put_batch=put)
        summary["specialization"] = spec_matrix.tolist()
        diagonal = np.diag(spec_matrix)
        off = spec_matrix[~np.eye(len(relations), dtype=bool)].reshape(len(relations), -1)
        log(f"specialization: own mask P@1 {np.nanmean(diagonal):.3f}, other relations' masks "
            f"{np.nanmean(off):.3f}, full model {full.macro(1):.3f}")
    export_binary_masks(workdir / "masks.npz", best, spec, tuple(relations), mode.threshold)
    if config.plots and is_main():
        written = plots.write_run_plots(workdir / "plots", shown, full, pruned, sparsity,
                                        spec, spec_matrix)
        log("plots: " + ", ".join(str(p) for p in written))
    return summary


def mask_params_per_relation(mask_logits) -> int:
    """Mask weights of one relation."""
    return sum(x.size // x.shape[0] for x in jax.tree.leaves(mask_logits))


def donates_state(state_bytes: int) -> bool:
    """Whether the step reuses the old state's buffers for the new one. XLA:CPU ran small
    donated steps 1.3-1.5x slower (bench/README.md), so a CPU donates only where the state is
    large."""
    return jax.default_backend() != "cpu" or state_bytes >= DONATE_ON_CPU_BYTES


def relation_chunk_for(config, model_config: ModelConfig, num_relations: int,
                       mesh: jax.sharding.Mesh, length: int, mask_params: int,
                       state_bytes: int, log=None) -> int | None:
    """``config.relation_chunk``, or for 0 the automatic choice for batches of prompts padded
    to ``length`` (every split of a run shares it) and relations of ``mask_params`` mask
    weights, in the memory the devices have left now beside a state of ``state_bytes``.
    With ``log``: says when a larger chunk would fit in free memory and run faster."""
    size = activation_bytes(config.batch_size * length, model_config.intermediate_size,
                            model_config.hidden_size, DTYPES[config.dtype])
    per_relation = transient_bytes_per_relation(mask_params, size, model_config.num_layers)
    budget = transient_budget(mesh, state_bytes)
    chunk = run_relation_chunk(config.relation_chunk, num_relations, mesh, per_relation, budget)
    free = available_bytes(mesh)
    if log is None or config.relation_chunk or free is None:
        return chunk
    fastest = run_relation_chunk(0, num_relations, mesh, per_relation,
                                 int(ACCELERATOR_SHARE * free))
    local = relation_slots(num_relations, mesh) // mesh.shape[RELATION]
    if (fastest or local) > (chunk or local):
        extra = ((fastest or local) - chunk) * per_relation
        log(f"memory first: {chunk} relation(s) per device at a time keep the step within "
            f"1.25x the state; --config.relation_chunk={fastest or local} fits in free memory "
            f"too: faster steps for about {extra / 2**30:.1f} GiB more per device")
    return chunk


def _table(relations, full, pruned, sparsity_total) -> str:
    width = max([18, *(len(r) + 2 for r in relations)])
    lines = [f"{'relation':<{width}}{'prompts':>8}{'full P@1':>10}{'pruned P@1':>12}"
             f"{'sparsity':>10}"]
    for i, r in enumerate(relations):
        lines.append(f"{r:<{width}}{int(pruned.count[i]):>8}{full.precision_at(1)[i]:>10.3f}"
                     f"{pruned.precision_at(1)[i]:>12.3f}{sparsity_total[i]:>10.3f}")
    return "\n".join(lines)


def _run_json(config, model_source, jsonl, relations, spec, mode, eval_mode, model_config,
              labels=None) -> dict[str, Any]:
    """What run.json records: everything needed to rebuild the model and masks."""
    return {
        "model": model_source,
        "model_config": model_config.to_hf_dict(),
        "data": str(jsonl),
        "dtype": config.dtype,
        "relations": list(relations),
        **labels_entry(relations, labels or {}),
        "mask": {"layers": list(spec.layers), "matrices": list(spec.matrices),
                 "mode": mode.kind, "tau": mode.tau, "threshold": mode.threshold,
                 "ste_grad": mode.ste_grad, "eval_kind": eval_mode.kind},
        "config": config.to_dict(),
    }


def _check_resumable(workdir, run: dict[str, Any]) -> None:
    """Refuses a workdir whose earlier run used another model, relation set or mask layout
    (its checkpoints could not be resumed into this configuration)."""
    path = workdir / "run.json"
    if not path.exists():  # every process checks, so that every process stops on a mismatch
        return
    previous = json.loads(path.read_text())
    for key in ("model_config", "relations"):
        if previous.get(key) != run[key]:
            raise ValueError(
                f"{workdir} holds a run with a different {key} ({previous.get(key)} vs now "
                f"{run[key]}); its checkpoints do not fit this configuration. Use another "
                "--workdir or delete that one."
            )
    for key in ("layers", "matrices", "mode"):
        if previous["mask"][key] != run["mask"][key]:
            raise ValueError(
                f"{workdir} holds masks with {key} {previous['mask'][key]}, this config "
                f"asks for {run['mask'][key]}; use another --workdir or delete that one."
            )


def _resumes(path) -> list[int]:
    """The steps this run was resumed from, in order (``metrics.jsonl``'s resume records)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r.get("event") == "resumed"]
