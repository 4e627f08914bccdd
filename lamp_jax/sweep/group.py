"""A sweep group: train.py's one-run step and ranking mapped over a leading runs axis ``[V]``.

The trials of a group share the program (:data:`~lamp_jax.sweep.grid.VALUE_KEYS` aside), so
their training states stack into one pytree whose leaves are ``[V, R, ...]`` (the runs axis in
front of train.py's state), their learning rates and noise keys into ``[V]`` arrays, and one
jitted program updates all of them: :func:`map_runs` is ``jax.vmap`` on an accelerator, and on
a CPU a loop over the runs inside the program that computes each run exactly as ``train.py``
computes it alone, with the same shapes (so each run's masks equal train.py's, byte for byte),
writing each run's new state into the group state's own buffers.

The loop below reads as :func:`lamp_jax.loop.train_and_evaluate` does, with a run directory per
trial (``<workdir>/runs/<trial>/``, which ``load_run``, ``lamp_jax.report`` and
``lamp_jax.evaluate`` open as they open train.py's) and the group's latest states under
``<workdir>/groups/<group>/checkpoints`` (kill -9 and rerun the same command: it resumes).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from lamp_jax import placement
from lamp_jax.answer_ranking import candidate_result
from lamp_jax.checkpoint import BestMasks, open_state_checkpoints, saved_steps
from lamp_jax.config_changes import describe_changes
from lamp_jax.data import RelationBatcher
from lamp_jax.hosts import (
    PreemptionNotice,
    is_main,
    put_global,
    return_free_memory,
    sync,
    to_host,
    write_text,
)
from lamp_jax.loop import (
    check_finite,
    checkpoint_fields,
    evaluation_record,
    evaluation_scalars,
    stop_now,
)
from lamp_jax.masks import pruned_fraction
from lamp_jax.optim import make_optimizer
from lamp_jax.paths import absolute
from lamp_jax.phase_clock import PhaseClock
from lamp_jax.ranking import DEFAULT_KS, RankingResult, sum_rank_stats
from lamp_jax.results import final_report
from lamp_jax.run_dir import RunDirectory, config_change_refused, manifest
from lamp_jax.setup import TrainSetup, noise_key, setup_training
from lamp_jax.step import TrainState, init_train_state
from lamp_jax.summaries import ScalarWriter
from lamp_jax.sweep.grid import Trial, check_group, slug
from lamp_jax.workdir_lock import Unlocked

# What group.json says of the layout of the group's checkpoints: each leaf of train.py's state
# with the runs axis in front. Checkpoints without it put the runs on the relation axis.
LAYOUT = "runs x relations"


def map_runs(fn: Callable[..., Any], in_axes: Sequence[int | None], sequential: bool, *,
             update_first_argument: bool = False) -> Callable[..., Any]:
    """``fn`` (one run's) mapped over the leading runs axis of the arguments whose
    ``in_axes`` entry is 0 (None: shared by every run, e.g. the frozen weights).

    ``sequential=False`` is ``jax.vmap``. ``sequential=True`` runs the runs one after another
    inside the program, each on its own slice (no batching dimension added, so XLA compiles
    each run's arithmetic as it compiles ``fn`` alone), and stacks the outputs.
    ``update_first_argument``: ``fn`` returns ``(new first argument, outputs)`` and each run's
    new value is written into the first argument's buffers (donated by the caller: the group
    keeps one state, not two)."""
    if not sequential:
        return jax.vmap(fn, in_axes=tuple(in_axes))

    def mapped(*args):
        runs = next(jax.tree.leaves(a)[0].shape[0] for a, axis in zip(args, in_axes, strict=True)
                    if axis == 0)

        def call(v, args):
            own = [jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, v, keepdims=False), a)
                   if axis == 0 else a for a, axis in zip(args, in_axes, strict=True)]
            return fn(*own)

        shapes = jax.eval_shape(lambda *a: call(0, a), *args)
        stacked = jax.tree.map(lambda s: jnp.zeros((runs, *s.shape), s.dtype), shapes)
        if update_first_argument:
            stacked = (args[0], stacked[1])

        def body(v, buffers):
            if not update_first_argument:
                values = call(v, args)
            else:
                # As lamp_jax.relation_map does for its chunks: behind a conditional XLA cannot
                # fold (v < runs always holds), the run's new values are whole before any is
                # written back, so the state's buffers are updated in place, not copied.
                def unchanged(inputs):  # never taken
                    old = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(
                        x, v, keepdims=False), inputs[0])
                    return old, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[1])

                values = jax.lax.cond(v < runs, partial(call, v), unchanged,
                                      (buffers[0], *args[1:]))
            return jax.tree.map(lambda b, x: jax.lax.dynamic_update_index_in_dim(
                b, x.astype(b.dtype), v, 0), buffers, values)

        return jax.lax.fori_loop(0, runs, body, stacked)

    return mapped


@dataclasses.dataclass(frozen=True)
class Group:
    """A group's trials, their configurations and directories, over one shared setup."""

    name: str
    trials: tuple[Trial, ...]
    configs: tuple[ml_collections.ConfigDict, ...]
    directories: tuple[RunDirectory, ...]
    state_dir: Any  # <workdir>/groups/<name>: the group's checkpoints and group.json
    overrides: dict[str, Any]

    @classmethod
    def plan(cls, base: ml_collections.ConfigDict, workdir: Any, fixed: dict[str, Any],
             trials: Sequence[Trial]) -> Group:
        root = absolute(workdir)
        configs = tuple(trial.config(base) for trial in trials)
        check_group(configs)
        name = slug(",".join(f"{k}={v}" for k, v in fixed.items()) or "base")
        return cls(name, tuple(trials), configs,
                   tuple(RunDirectory(root / "runs" / t.name) for t in trials),
                   root / "groups" / name, dict(fixed))

    def record(self) -> dict[str, Any]:
        """``group.json``: what the group's checkpoints belong to."""
        return {"overrides": self.overrides, "runs": [t.name for t in self.trials],
                "layout": LAYOUT}


def train_group(base: ml_collections.ConfigDict, workdir: Any, fixed: dict[str, Any],
                trials: Sequence[Trial], log=print, lock: Any = None) -> dict[str, Any]:
    """Trains (or resumes) the trials of one group side by side, each into its own run
    directory; ``{"stopped": {"stopped_at": step, "preempted": bool}}`` when
    ``config.stop_after`` or a preemption notice (SIGTERM) stopped it first. ``lock``: the
    sweep workdir's (:mod:`lamp_jax.workdir_lock`), checked at every evaluation."""
    group = Group.plan(base, workdir, fixed, trials)
    if all(d.metrics() is not None for d in group.directories):
        log(f"group {fixed or '(one)'}: its {len(trials)} runs finished earlier")
        return {"steps": None}
    log(f"group {fixed or '(one)'}: {len(trials)} runs side by side")
    for directory in group.directories:
        directory.ensure_writable()
    # A resume under other settings is refused before the model loads, as train.py's.
    policy = base.on_config_change
    check_run_configs(group, policy, max(saved_steps(group.state_dir / "checkpoints"),
                                         default=None), before_loading=True)
    clock = PhaseClock()
    setup = setup_training(group.configs[0], log, lap=clock.lap)
    runs = GroupRuns.build(setup, group.configs, log)

    # Restore or init. Nothing is written before a refused resume could stop the group.
    run_jsons = [manifest(setup, config) for config in group.configs]
    for directory, run_json in zip(group.directories, run_jsons, strict=True):
        directory.check_resumable(run_json)
    check_state_dir(group)
    background = placement.saves_in_background(runs.state_bytes)
    states, restored = open_state_checkpoints(
        group.state_dir / "checkpoints", runs.state_layout(), background=background,
        on_unreadable=setup.config.on_unreadable_checkpoints,
        start_over=partial(start_over, group), log=log)
    state = (restored if restored is not None
             else runs.init_state([t.label for t in group.trials], log))
    first = int(to_host(state.step)[0])  # every run has taken as many steps
    changes = check_run_configs(group, policy, first if restored is not None else None)
    for directory, run_json, config, changed in zip(group.directories, run_jsons,
                                                    group.configs, changes, strict=True):
        run_json["config_history"] = directory.next_config_history(
            config, first, restored is not None, changed)
    best = [BestMasks(d.path, background=background) for d in group.directories]
    sync("run directories checked")  # before process 0 replaces run.json
    for directory, run_json in zip(group.directories, run_jsons, strict=True):
        directory.write_manifest(run_json, setup.data.facts_by_split)
    write_text(group.state_dir / "group.json", json.dumps(group.record(), indent=1))
    history = [d.keep_records_until(first) for d in group.directories]
    if restored is not None:
        log(f"resumed from step {first}")
        for directory in group.directories:
            directory.append_record({"step": first, "event": "resumed"})
    for directory, changed in zip(group.directories, changes, strict=True):
        if changed:
            log(f"{directory.path.name}: the configuration changed at step {first}, as "
                f"config.on_config_change='continue' allows: "
                f"{'; '.join(describe_changes(changed))}")
            directory.append_record({"step": first, "event": "config_changed",
                                     "changes": changed})
    lock = lock or Unlocked()
    scalars = [ScalarWriter(d.path, first) for d in group.directories]
    clock.lap("setup")

    relations, config = setup.relations, setup.config
    bar = tqdm(range(first, setup.num_steps), desc="training masks", unit="step",
               initial=first, total=setup.num_steps, disable=not is_main())
    pending = metrics = None
    with PreemptionNotice() as notice:
        for step in bar:
            state, metrics = runs.step_fn(state, setup.frozen, runs.train_batch(step),
                                          runs.learning_rates)
            done = step + 1
            if pending is not None:
                check_finite(pending, done - 1, relations, config.on_nonfinite, log)
            pending = metrics
            if done % setup.eval_every == 0 or done == setup.num_steps:
                check_finite(pending, done, relations, config.on_nonfinite, log)
                pending = None
                clock.lap("steps", state.mask_logits)
                dev = runs.scores(state.mask_logits, "dev")
                bar.set_postfix(best_dev_macro_p1=f"{max(d.macro(1) for d in dev):.3f}")
                seen = to_host({k: metrics[k] for k in ("ce", "count")})
                pruned = to_host(jax.vmap(partial(pruned_fraction, threshold=setup.mode.threshold))(
                    state.mask_logits))
                records = [evaluation_record(done, {k: x[v] for k, x in seen.items()}, d)
                           for v, d in enumerate(dev)]
                for v, record in enumerate(records):
                    scalars[v].write(done, evaluation_scalars(record, dev[v], pruned[v]))
                clock.lap("evaluation")
                lock.check()  # a bucket's lock: still this sweep's
                improved = [v for v in range(len(dev)) if best[v].beats(dev[v].macro(1))]
                if improved:  # every run's slice from one host copy, saves started together
                    logits = to_host(state.mask_logits)
                    for v in improved:
                        best[v].save(done, jax.tree.map(lambda g, v=v: g[v], logits),
                                     dev[v].macro(1), wait=False)
                        records[v]["best"] = True
                    for v in improved:
                        best[v].commit()
                saved = checkpoint_fields(states.save(state, done))
                if not background:
                    return_free_memory()  # as train.py: the saves' host buffers go back
                clock.lap("checkpoints")
                for v, record in enumerate(records):
                    record.update(saved)
                    history[v].append(record)
                    group.directories[v].append_record(record)
            preempted, stop = stop_now(notice, done, first, setup.num_steps, config.stop_after)
            if stop:
                bar.close()
                states.save(state, done)
                for closing in (*scalars, states, *best):
                    closing.close()
                if preempted:
                    log(f"preemption notice (SIGTERM): saved the state at step {done}; run the "
                        "same command again to resume")
                return {"stopped": {"stopped_at": done, "preempted": preempted}}
    bar.close()
    for writer in scalars:
        writer.close()
    states.wait()
    clock.lap("checkpoints")

    # Reports, run by run, as train.py makes them: the group's state is gone by now.
    del state, metrics, pending
    write_reports(group, setup, history, [b.score() for b in best], clock)
    states.close()
    for b in best:
        b.close()
    return {"steps": setup.num_steps, "phase_seconds": dict(clock.seconds)}


def write_reports(group: Group, setup: TrainSetup, history: Sequence[list[dict[str, Any]]],
                  best_scores: Sequence[float | None], clock: PhaseClock) -> None:
    """Each run's final files, as train.py writes its own: masks.npz, the controls' per-prompt
    ranks and metrics.json (its final report, history, best dev score, resumes, changes of
    configuration)."""
    full = setup.scores(None, "test")  # the same for every run: computed once
    summaries = []
    for v, directory in enumerate(group.directories):
        best_masks = directory.best_masks(setup.mask_layout)
        # The run's own configuration: its seed draws its random control masks and bootstrap
        # resamples, as train.py's does (the group's setup carries the first run's).
        run_setup = dataclasses.replace(setup, config=group.configs[v])
        report = final_report(run_setup, best_masks, "test", full=full)
        directory.write_masks(best_masks, setup.spec, setup.relations, setup.mode.threshold)
        if report.prompt_ranks is not None:
            directory.write_prompt_ranks(report.prompt_ranks, "test")
        summaries.append(dict(report.summary, history=history[v],
                              best_dev_macro_P1=best_scores[v],
                              resumed_from=directory.resumes(),
                              config_changes=directory.recorded_config_changes(),
                              steps=setup.num_steps))
    clock.lap("report")
    for directory, summary in zip(group.directories, summaries, strict=True):
        directory.write_metrics(dict(summary, resources=clock.resources()))


@dataclasses.dataclass(frozen=True)
class GroupRuns:
    """The runs of a group on top of one :class:`~lamp_jax.setup.TrainSetup`: their batchers,
    learning rates, initial states and the mapped, jitted step and ranking."""

    setup: TrainSetup
    configs: tuple[ml_collections.ConfigDict, ...]
    batchers: tuple[RelationBatcher, ...]  # one per run (runs of one seed share one)
    learning_rates: jax.Array  # [V]
    chunk: int | None  # relations per device at a time, in each run's step
    state_bytes: int  # the group's training state
    sharding: TrainState  # of the [V, R, ...] state
    step_fn: Callable[..., Any]
    rank_fns: dict[str, Callable[..., Any]]  # per inference kind, the mapped ranking

    @classmethod
    def build(cls, setup: TrainSetup, configs: Sequence[ml_collections.ConfigDict],
              log=print) -> GroupRuns:
        by_seed = {setup.config.seed: setup.batcher}
        for c in configs:
            if c.seed not in by_seed:
                by_seed[c.seed] = RelationBatcher(
                    setup.data.splits["train"], c.batch_size, c.seed, c.batching, c.epochs,
                    row_features=setup.features["train"])
        runs = len(configs)
        sequential = jax.default_backend() == "cpu"
        state_bytes = runs * setup.state_bytes
        per_relation = placement.step_transient_bytes(
            setup.mlm.config, setup.config.batch_size,
            setup.data.splits["train"].input_ids.shape[1], setup.mask_params, setup.dtype)
        # vmap holds every run's transients at once; the CPU's loop, one run's.
        chunk = placement.relation_chunk_for(
            setup.config.relation_chunk, len(setup.relations), setup.mesh,
            per_relation * (1 if sequential else runs), state_bytes, log, placed=False)
        sharding = jax.tree.map(lambda s: NamedSharding(setup.mesh, P(None, *s.spec)),
                                placement.state_shardings(setup.abstract_state(), setup.mesh))
        donate = placement.donates_state(state_bytes)
        step_fn = jax.jit(
            map_runs(setup.step_body(chunk), (0, None, 0, 0), sequential,
                     update_first_argument=True),
            donate_argnums=0 if donate else (), out_shardings=(sharding, None))
        rank_fns = {kind: jax.jit(map_runs(setup.rank_fn(kind, chunk), (0, None, None),
                                           sequential))
                    for kind in ("threshold", "expectation")}
        log(f"group: {runs} runs x {len(setup.relations)} relations, the step mapped over the "
            f"runs ({'one after another' if sequential else 'vmapped'}), relations per device "
            f"at a time: {chunk or 'all'}; training state {state_bytes / 2**30:.2f} GiB")
        return cls(setup, tuple(configs), tuple(by_seed[c.seed] for c in configs),
                   jnp.asarray([c.optim.learning_rate for c in configs], jnp.float32), chunk,
                   state_bytes, sharding, step_fn, rank_fns)

    def state_layout(self) -> TrainState:
        """The group state's shapes, dtypes and shardings: a checkpoint restores onto it."""
        one = self.setup.abstract_state()
        group = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(self.configs), *x.shape),
                                                            x.dtype), one)
        return placement.abstract_placed(group, self.sharding)

    def init_state(self, labels: Sequence[str], log=print) -> TrainState:
        """Each run's initial state as train.py builds it (its logits from its own seed and
        init, its noise key from its seed), stacked and placed. Warns when a run's masks cannot
        prune, once per configuration (``labels``: the runs' configurations, seeds aside)."""
        logits, said = [], set()
        for config, label in zip(self.configs, labels, strict=True):
            logits.append(self.setup.initial_logits(config))
            warning = self.setup.warning(logits[-1], config)
            if warning and label not in said:
                said.add(label)
                log(f"warning ({label}): {warning}")
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *logits)
        keys = jnp.stack([noise_key(c.seed) for c in self.configs])
        placed = jax.tree.map(lambda x, s: put_global(x, s), stacked, self.sharding.mask_logits)
        optimizer, total_steps = make_optimizer(self.setup.optim), self.setup.total_steps()
        build = jax.vmap(lambda g, key: init_train_state(g, optimizer, total_steps, key))
        # Donated: the new state's logits are the placed ones, not a copy.
        return jax.jit(build, out_shardings=self.sharding, donate_argnums=0)(placed, keys)

    def train_batch(self, step: int) -> dict[str, jax.Array]:
        """Each run's batch of ``step`` (its seed's order), ``[V, R, B, ...]`` on the mesh."""
        by_seed: dict[int, dict[str, np.ndarray]] = {}
        for config, batcher in zip(self.configs, self.batchers, strict=True):
            if config.seed not in by_seed:
                batch = {k: v for k, v in batcher.batch_at(step).items() if k != "index"}
                by_seed[config.seed] = placement.pad_batch(batch, self.setup.slots)
        sharding = NamedSharding(self.setup.mesh, P(None, *placement.batch_sharding(
            self.setup.mesh).spec))
        return {k: put_global(np.stack([by_seed[c.seed][k] for c in self.configs]), sharding)
                for k in by_seed[self.configs[0].seed]}

    def scores(self, mask_logits: Any, split: str, kind: str | None = None
               ) -> list[RankingResult]:
        """Per run, P@k and MRR of its relations on ``split`` with ``kind`` masks (default:
        the eval mode's)."""
        setup = self.setup
        rank = self.rank_fns[kind or setup.eval_mode.kind]
        batches = setup.eval_sets[split]
        outputs = [rank(mask_logits, setup.frozen, setup.put(batch)) for batch in batches]
        if setup.any_length:
            scores = [to_host(out["scores"]) for out in outputs]
            return [candidate_result(batches, [s[v] for s in scores], setup.relations)
                    for v in range(len(self.configs))]
        sums = sum_rank_stats(outputs)
        return [RankingResult.from_sums(setup.relations, DEFAULT_KS,
                                        {k: x[v] for k, x in sums.items()})
                for v in range(len(self.configs))]


def check_run_configs(group: Group, policy: str, resume_step: int | None,
                      before_loading: bool = False) -> list[dict[str, dict[str, Any]]]:
    """Per run of the group, how its configuration differs from the one it trained under at
    ``resume_step`` (train.py's check, :meth:`RunDirectory.check_config`); with ``policy``
    "stop" any difference refuses the resume, naming every run's differences at once."""
    changes = [d.config_changes_at(c, resume_step, before_loading)
               for d, c in zip(group.directories, group.configs, strict=True)]
    if any(changes) and policy != "continue":
        raise config_change_refused({d.path: c for d, c in zip(group.directories, changes,
                                                                strict=True) if c},
                                    resume_step)
    return changes


def check_state_dir(group: Group) -> None:
    """Refuses a group directory whose checkpoints belong to another group, or were written
    with the runs on the relation axis (``group.json`` without :data:`LAYOUT`)."""
    path = group.state_dir / "group.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    if previous.get("layout") != LAYOUT and (group.state_dir / "checkpoints").exists():
        raise ValueError(
            f"{group.state_dir} holds checkpoints written by lamp-jax at or before commit "
            "7541094, which kept a group's runs side by side on the relation axis; this version "
            "gives the runs an axis of their own and cannot resume them. Finish that sweep with "
            "the version that started it (git checkout 7541094), or delete "
            f"{group.state_dir / 'checkpoints'} to train this group again from its start "
            "(groups that finished are kept).")
    previous.pop("layout", None)
    current = {k: v for k, v in json.loads(json.dumps(group.record())).items() if k != "layout"}
    if previous != current:
        raise ValueError(f"{group.state_dir} holds the checkpoints of another sweep group "
                         f"({previous}); this one is {current}. Use another --workdir.")


def start_over(group: Group) -> None:
    """Deletes the group's checkpoints and every trial's records of the training."""
    for directory in (*group.directories, RunDirectory(group.state_dir)):
        directory.start_over()
