"""lamp_jax.sweep: train.py's step mapped over a group's runs equals the same runs made one by
one with train.py."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lamp_jax.configs import default
from lamp_jax.loop import train_and_evaluate
from lamp_jax.sweep import Trial, parse_grid, plan_groups, run_sweep, summarize, with_overrides
from lamp_jax.sweep import group as group_module


def test_grid_values_take_the_config_field_types_and_bad_fields_are_named():
    base = default.get_config()
    grid = parse_grid(base, ["optim.learning_rate=0.1,1", "mask.mode=stochastic,deterministic",
                             "epochs=2,3", "specialization=false"])
    assert grid == {"optim.learning_rate": [0.1, 1.0], "mask.mode": ["stochastic",
                                                                     "deterministic"],
                    "epochs": [2, 3], "specialization": [False]}
    assert isinstance(grid["epochs"][0], int) and isinstance(grid["optim.learning_rate"][1], float)
    with pytest.raises(ValueError, match="no field 'optim.lr'"):
        parse_grid(base, ["optim.lr=0.1"])
    with pytest.raises(ValueError, match="--seeds"):
        parse_grid(base, ["seed=1,2"])
    with pytest.raises(ValueError, match="not a number"):
        parse_grid(base, ["optim.learning_rate=fast"])


def test_program_settings_make_groups_and_value_settings_share_one():
    base = default.get_config()
    base.seed = 5
    grid = parse_grid(base, ["mask.mode=stochastic,deterministic",
                             "optim.learning_rate=0.1,0.3", "mask.init_value=0.5,1"])
    groups = plan_groups(base, grid, seeds=2)
    assert [fixed for fixed, _ in groups] == [{"mask.mode": "stochastic"},
                                              {"mask.mode": "deterministic"}]
    runs = groups[0][1]
    assert len(runs) == 2 * 2 * 2  # learning rates x inits x seeds
    assert all(isinstance(r, Trial) for r in runs)
    assert sorted({r.seed for r in runs}) == [5, 6]
    config = runs[-1].config(base)
    assert (config.mask.mode, config.optim.learning_rate, config.mask.init_value,
            config.seed) == ("stochastic", 0.3, 1.0, 6)
    assert base.optim.learning_rate == default.get_config().optim.learning_rate  # unmodified
    assert base.seed == 5


def _runs_step():
    """A small model's one-run training step (the test_step set-up) and three runs' states,
    batches and learning rates, stacked on a leading runs axis."""
    from lamp_jax.masks import MaskInit, MaskMode, MaskSpec, init_mask_logits
    from lamp_jax.models import init_params
    from lamp_jax.optim import OptimConfig, make_optimizer
    from lamp_jax.step import LossConfig, init_train_state, train_step
    from tests.test_step import CONFIG, synthetic_batch

    frozen = init_params(CONFIG, jax.random.key(0))
    optim = OptimConfig(learning_rate=0.05, clip_norm=0.05, eps=1e-3)
    spec = MaskSpec.create(CONFIG, first_layer=0)
    states = [init_train_state(init_mask_logits(spec, frozen, 3, MaskInit("normal", 1.0, 1.0),
                                                MaskMode(), jax.random.key(v)),
                               make_optimizer(optim), 10, jax.random.key(10 + v))
              for v in range(3)]
    batches = [synthetic_batch(3, 4, seed=v) for v in range(3)]
    rates = [0.05, 0.2, 0.01]
    one = jax.tree_util.Partial(train_step, model_config=CONFIG, optim_config=optim,
                                loss_config=LossConfig(MaskMode("stochastic", tau=0.5)))
    stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)  # noqa: E731
    return one, frozen, states, batches, rates, stack


@pytest.mark.parametrize("sequential", [True, False])
def test_the_group_step_is_the_one_run_step_mapped_over_the_runs(sequential):
    """Each run's slice of the mapped step equals that run's step alone: bit for bit when the
    runs go one after another (train.py's arithmetic, the CPU's choice), and up to float
    rounding under vmap (an accelerator's). Each run uses its own key and learning rate."""
    one, frozen, states, batches, rates, stack = _runs_step()
    mapped = jax.jit(group_module.map_runs(one, (0, None, 0, 0), sequential,
                                           update_first_argument=True))
    got, metrics = mapped(stack(states), frozen, stack(batches), jnp.asarray(rates))
    for v in range(3):
        want, want_metrics = jax.jit(one)(states[v], frozen, batches[v], jnp.float32(rates[v]))
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            x = jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            y = jax.random.key_data(y) if jnp.issubdtype(y.dtype, jax.dtypes.prng_key) else y
            if sequential:
                np.testing.assert_array_equal(np.asarray(x)[v], np.asarray(y))
            else:
                np.testing.assert_allclose(np.asarray(x)[v], np.asarray(y), atol=1e-5)
        np.testing.assert_allclose(metrics["loss"][v], want_metrics["loss"], rtol=1e-6)
    # Not trivially equal: the runs moved, and differently.
    moved = [float(np.abs(np.asarray(jax.tree.leaves(got.mask_logits)[0][v])
                          - np.asarray(jax.tree.leaves(states[v].mask_logits)[0])).max())
             for v in range(3)]
    assert min(moved) > 1e-4 and len(set(moved)) == 3


def test_the_sequential_group_step_writes_each_run_into_the_donated_state():
    """XLA's plan of the mapped step on a CPU: the new group state takes the donated old one's
    buffers, and the temporaries stay well below a second state (one run's at a time)."""
    one, frozen, states, batches, rates, stack = _runs_step()
    state = stack(states)
    mapped = jax.jit(group_module.map_runs(one, (0, None, 0, 0), True,
                                           update_first_argument=True), donate_argnums=0)
    plan = mapped.lower(state, frozen, stack(batches), jnp.asarray(rates)).compile(
    ).memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.mask_logits, state.opt_state)))
    assert plan.alias_size_in_bytes >= state_bytes
    assert plan.temp_size_in_bytes < state_bytes


def test_summary_is_mean_and_sample_std_over_seeds():
    records = [{"label": "a", "seed": s, "dev_binary": v, "dev_soft": 0.0, "test_binary": v,
                "test_soft": 0.0, "sparsity": 0.5} for s, v in enumerate((0.2, 0.4, 0.9))]
    (row,) = summarize(records)
    assert row["seeds"] == [0, 1, 2]
    assert row["dev_binary"] == pytest.approx((0.5, np.std([0.2, 0.4, 0.9], ddof=1)))
    assert row["sparsity"] == (0.5, 0.0)


def _sweep_base():
    base = default.get_config()
    base.epochs = 3
    base.mask.mode = "stochastic"
    base.mask.init_value = 0.3  # near the threshold: masks prune within 3 epochs
    base.data.relations = ("AtLocation", "IsA")
    return base


GRID = ["optim.learning_rate=0.2,0.5"]
RUNS = ["optim.learning_rate=0.2,seed=0", "optim.learning_rate=0.2,seed=1",
        "optim.learning_rate=0.5,seed=0", "optim.learning_rate=0.5,seed=1"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    said: list[str] = []
    out = run_sweep(_sweep_base(), GRID, seeds=2, workdir=workdir, log=said.append)
    # The same trials, one after another, each as train.py runs it.
    for row in out["runs"]:
        config = with_overrides(_sweep_base(), dict(row["overrides"], seed=row["seed"],
                                                    plots=False))
        train_and_evaluate(config, workdir / "alone" / row["run_dir"].split("/")[-1],
                           log=lambda *_: None)
    return workdir, out, said


@pytest.mark.slow
def test_a_sweep_equals_the_same_runs_made_one_by_one_with_train_py(swept):
    workdir, out, said = swept
    # On a CPU the group's runs go one after another, each with train.py's shapes.
    assert any("group: 4 runs x 2 relations, the step mapped over the runs (one after "
               "another)" in line for line in said), said
    runs = out["runs"]
    assert [(r["learning_rate"], r["seed"]) for r in runs] == [(0.2, 0), (0.2, 1), (0.5, 0),
                                                               (0.5, 1)]
    # Not a comparison of trivial values: the runs prune, learn, and differ from each other.
    assert all(r["sparsity"] > 0.01 for r in runs)
    assert all(r["test_soft"] != r["test_full"] for r in runs)
    assert len({(r["test_binary"], r["test_soft"], r["sparsity"]) for r in runs}) == 4
    masks = [(workdir / "runs" / name / "masks.npz").read_bytes() for name in RUNS]
    assert len(set(masks)) == 4
    # train.py's own function, run after run, gives byte-identical masks.npz and the very
    # same dev and test metrics.
    for name, swept_masks in zip(RUNS, masks, strict=True):
        alone = workdir / "alone" / name
        assert (alone / "masks.npz").read_bytes() == swept_masks, name
        a, b = (json.loads((d / "metrics.json").read_text())
                for d in (workdir / "runs" / name, alone))
        for key in ("test", "dev", "sparsity", "best_dev_macro_P1", "relations"):
            assert a[key] == b[key], (name, key)
        # The controls too: each run's seed draws its random masks and bootstrap resamples
        # (NaN, where a mask prunes nothing, equals NaN here).
        assert json.dumps(a["controls"], sort_keys=True) == json.dumps(b["controls"],
                                                                       sort_keys=True), name
        assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]]
    saved = json.loads((workdir / "sweep.json").read_text())
    assert len(saved["table"]) == 2 and saved["table"][0]["seeds"] == [0, 1]
    table = (workdir / "sweep.md").read_text()
    assert "optim.learning_rate=0.2" in table and "+-" in table
    assert all(f"(runs/{name}/)" in table for name in RUNS)  # sweep.md links every run
    assert (workdir / "sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_every_run_of_a_sweep_is_a_run_directory(swept, tmp_path):
    """load_run, evaluate and report open a sweep's run as they open train.py's."""
    from lamp_jax import load_run
    from lamp_jax.evaluate import reevaluate
    from lamp_jax.report import write_report

    workdir, out, _ = swept
    run_dir = tmp_path / "run"
    shutil.copytree(workdir / "runs" / RUNS[2], run_dir)
    run = load_run(run_dir)
    assert run.relations == ("AtLocation", "IsA") and run.metrics["steps"] == out["runs"][2][
        "steps"]
    assert run.metrics["test"]["pruned"]["macro_P@1"] == out["runs"][2]["test_binary"]
    top = run.predict("the boat is a kind of [MASK] .", relation="IsA", k=3)
    assert [t for t, _ in top] != [t for t, _ in run.predict("the boat is a kind of [MASK] .",
                                                             k=3)]
    again = reevaluate(run_dir, log=lambda *_: None)
    assert again["test"] == run.metrics["test"]
    dev = reevaluate(run_dir, split="dev", log=lambda *_: None)
    assert set(dev) >= {"dev"} and "test" not in dev  # --split dev reports dev as dev
    assert dev["dev"]["pruned"] == run.metrics["dev"]["pruned"]
    index = (write_report(run_dir, max_size=1, log=lambda *_: None) / "index.md").read_text()
    assert "# lamp-jax report" in index


class _NoticeAt:
    """lamp_jax.hosts.PreemptionNotice with its SIGTERM answered at one step (the signal
    itself: tests/test_reliability.py and tests/test_topology.py)."""

    def __init__(self, step: int):
        self.step = step

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None

    def reached(self, step: int) -> bool:
        return step == self.step


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_and_ends_with_the_same_sweep_json(swept, tmp_path,
                                                                        monkeypatch):
    """Stopped by config.stop_after at step 3, then by preemption notices at step 5 and at
    the last step (6, before the reports), then resumed: the same runs as an uninterrupted
    sweep."""
    workdir, out, _ = swept
    base = _sweep_base()
    base.stop_after = 3
    said: list[str] = []
    stopped = run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=said.append)
    assert stopped == {"stopped": True, "preempted": False}
    assert not (tmp_path / "sweep.json").exists()
    base.stop_after = 0
    for step in (5, 6):
        with monkeypatch.context() as patched:
            patched.setattr(group_module, "PreemptionNotice",
                            lambda step=step: _NoticeAt(step))
            stopped = run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=said.append)
        assert stopped == {"stopped": True, "preempted": True}
        assert (f"preemption notice (SIGTERM): saved the state at step {step}; run the same "
                "command again to resume") in said
        assert not (tmp_path / "sweep.json").exists()
    said.clear()
    again = run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=said.append)
    assert "resumed from step 6" in said
    for name in RUNS:
        metrics = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())
        assert metrics["resumed_from"] == [3, 5, 6] and metrics["steps"] == 6
        assert ((tmp_path / "runs" / name / "masks.npz").read_bytes()
                == (workdir / "runs" / name / "masks.npz").read_bytes())
    drop = ("sweep_seconds", "group_seconds", "groups")
    assert ({k: v for k, v in again.items() if k not in drop}
            == {k: v for k, v in out.items() if k not in drop})
    # A finished sweep run again reads its runs back instead of training them.
    said.clear()
    assert run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=said.append)["runs"] == \
        again["runs"]
    assert any("finished earlier" in line for line in said)


def test_trial_labels_name_the_grid_values():
    assert Trial((("optim.learning_rate", 0.1),), 0).label == "optim.learning_rate=0.1"
    assert Trial((), 2).label == "base config"


@pytest.mark.slow
def test_a_sigterm_stops_the_sweep_command_with_status_75_after_saving(tmp_path):
    """``python -m lamp_jax.sweep`` as a job runs it: a SIGTERM while a group trains saves
    the group's state, says so in one line and exits with status 75 (rerun: resumed, as
    test_an_interrupted_sweep_resumes_and_ends_with_the_same_sweep_json shows)."""
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lamp_jax.hosts import PREEMPTED_EXIT
    from tests.test_reliability import _latest_step

    repo = Path(__file__).resolve().parents[1]
    log = tmp_path / "sweep.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lamp_jax.sweep", "--grid", "optim.learning_rate=0.5,1.0",
         "--seeds", "1", f"--workdir={tmp_path / 'sweep'}", "--config.epochs=20",
         "--config.plots=False", "--config.specialization=False",
         "--config.controls.enabled=False"],
        cwd=repo, stdout=log.open("w"), stderr=subprocess.STDOUT)
    records = tmp_path / "sweep" / "runs" / "optim.learning_rate=0.5,seed=0" / "metrics.jsonl"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not (
            records.exists() and records.read_text().endswith("\n")):
        time.sleep(0.02)  # until the group trains: its first evaluation is written
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    output = log.read_text()
    assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
    step = int(re.search(r"^preemption notice \(SIGTERM\): saved the state at step (\d+); "
                         r"run the same command again to resume$", output, re.MULTILINE)[1])
    assert _latest_step(tmp_path / "sweep" / "groups" / "base") == step
    assert not (tmp_path / "sweep" / "sweep.json").exists()


def test_a_group_checkpointed_with_the_runs_on_the_relation_axis_is_refused_by_name(tmp_path):
    """group.json without the runs-axis layout, beside checkpoints: a sweep started by lamp-jax
    at or before 7541094. Refused before anything is read or written, saying what to do."""
    base = _sweep_base()
    state_dir = tmp_path / "groups" / "base"
    (state_dir / "checkpoints" / "3").mkdir(parents=True)
    old = {"overrides": {}, "runs": RUNS}
    (state_dir / "group.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"7541094.*git checkout 7541094.*delete .*checkpoints"):
        run_sweep(base, GRID, seeds=2, workdir=tmp_path, log=lambda *_: None)
    assert json.loads((state_dir / "group.json").read_text()) == old
    assert not any((tmp_path / "runs").glob("*/run.json"))
