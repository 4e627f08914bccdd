"""Bad input, bad configs, NaNs, damaged checkpoints and kill -9: clear failures, nothing lost."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from lamp_jax.hosts import PREEMPTED_EXIT, PreemptionNotice
from lamp_jax.loop import train_and_evaluate
from lamp_jax.models import load_mlm, save_mlm
from lamp_jax.placement import CPU_MALLOC_TUNABLES, allocator_hint
from lamp_jax.run_dir import RunDirectory
from tests.conftest import EMBEDDED_RUN_ARGS
from tests.test_end_to_end import FIXTURE, _config

ROOT = Path(__file__).parents[1]
QUIET = {"log": lambda *_: None}
GOOD_LINE = {"sub": "book", "obj": "library", "pred": "AtLocation", "obj_label": "library",
             "masked_sentences": ["You are likely to find a book in a [MASK]."], "uuid": "u1"}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir  # tests/conftest.py: built once per session


def _write(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            if not isinstance(line, bytes):
                line = (line if isinstance(line, str) else json.dumps(line)).encode()
            f.write(line + b"\n")
    return path


def _fixture_lines() -> list[bytes]:
    return FIXTURE.read_bytes().splitlines()


@pytest.mark.parametrize("bad,message", [
    ("{not json", r"bad.jsonl:3: .*JSON"),
    (json.dumps({"sub": "x", "pred": "AtLocation", "masked_sentences": ["a [MASK] ."]}),
     r"bad.jsonl:3: .*obj"),
    (b"\xff\xfe not utf-8", r"bad.jsonl:3: not valid UTF-8"),
])
def test_malformed_line_stops_with_file_and_line_or_is_skipped_and_counted(
        model_dir, tmp_path, bad, message):
    lines = _fixture_lines()
    data = _write(tmp_path / "bad.jsonl", lines[:2] + [bad] + lines[2:])
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(_config(model_dir, **{"data.source": str(data)}), tmp_path / "a",
                           **QUIET)
    said = []
    summary = train_and_evaluate(
        _config(model_dir, **{"data.source": str(data), "data.on_error": "skip",
                              "specialization": False, "plots": False, "controls.enabled": False}),
        tmp_path / "b", log=said.append)
    assert "malformed lines skipped 1" in said[1]
    assert summary["test"]["full"]["count"] > 0


@pytest.mark.parametrize("content", [[], [""], [{**GOOD_LINE, "masked_sentences": ["no mask"]}],
                                     [{**GOOD_LINE, "obj": "ice cream", "obj_label": "ice cream"}]])
def test_no_usable_prompts_is_a_clear_stop_before_compiling(model_dir, tmp_path, content):
    data = _write(tmp_path / "empty.jsonl", content)
    with pytest.raises(ValueError, match=r"no usable prompts in .*empty.jsonl"):
        train_and_evaluate(_config(model_dir, **{"data.source": str(data)}), tmp_path / "w",
                           **QUIET)


def test_requested_relation_missing_from_data_is_named(model_dir, tmp_path):
    config = _config(model_dir, **{"data.relations": ("AtLocation", "MadeOf")})
    with pytest.raises(ValueError, match=r"lists \['MadeOf'\], which have no usable prompts"):
        train_and_evaluate(config, tmp_path, **QUIET)


def test_a_relation_losing_every_prompt_is_skipped_and_counted_when_none_were_listed(
        model_dir, tmp_path):
    # As with a byte-level BPE vocabulary on real LAMA, where every ReceivesAction object is
    # several tokens: here MadeOf's objects are two words, never one token.
    made_of = [{**GOOD_LINE, "pred": "MadeOf", "sub": f"thing{i}", "obj": "ice cream",
                "obj_label": "ice cream", "uuid": f"m{i}"} for i in range(3)]
    data = _write(tmp_path / "data.jsonl", _fixture_lines() + made_of)
    said = []
    summary = train_and_evaluate(_config(model_dir, **{"data.source": str(data),
                                                       "specialization": False, "plots": False,
                                                       "controls.enabled": False}),
                                 tmp_path / "w", log=said.append)
    assert "MadeOf" not in summary["relations"] and "AtLocation" in summary["relations"]
    assert any("relations skipped: 1 (MadeOf): every prompt was dropped at encoding" in line
               for line in said)


def test_relations_not_requested_are_counted_not_trained(model_dir, tmp_path):
    said = []
    config = _config(model_dir, **{"data.relations": ("AtLocation", "IsA"),
                                   "specialization": False, "plots": False,
                                   "controls.enabled": False})
    summary = train_and_evaluate(config, tmp_path, log=said.append)
    assert summary["relations"] == ["AtLocation", "IsA"]
    assert "facts of unrequested relations skipped: CapableOf=" in said[1]


def test_out_of_range_config_is_refused_naming_every_field(model_dir, tmp_path):
    config = _config(model_dir, **{"mask.tau": 0.0, "mask.threshold": 1.5, "batch_size": 0,
                                   "mask.mode": "stochastc", "cpu_devices": -1})
    with pytest.raises(ValueError) as err:
        train_and_evaluate(config, tmp_path / "w", **QUIET)
    for field in ("config.mask.tau = 0.0", "config.mask.threshold = 1.5",
                  "config.batch_size = 0", "config.mask.mode = 'stochastc'",
                  "config.cpu_devices = -1"):
        assert field in str(err.value)
    assert not (tmp_path / "w").exists()  # refused before anything was written
    with pytest.raises(ValueError, match=r"mask layers 1\..5 are not within the model's 0..1"):
        train_and_evaluate(_config(model_dir, **{"mask.first_layer": 1, "mask.last_layer": 5}),
                           tmp_path / "w2", **QUIET)


def test_unwritable_workdir_fails_fast(model_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="cannot write to the workdir"):
        train_and_evaluate(_config(model_dir), blocker / "run", **QUIET)


def _model_with_nan(model_dir: Path, out: Path) -> Path:
    mlm = load_mlm(model_dir)
    params = jax.tree.map(np.asarray, mlm.params)
    params["layer_1"]["ffn_out"]["kernel"] = params["layer_1"]["ffn_out"]["kernel"].copy()
    params["layer_1"]["ffn_out"]["kernel"][0, 0] = np.nan
    return save_mlm(out, params, mlm.config, mlm.tokenizer)


def test_nan_stops_with_step_and_relation_or_is_skipped(model_dir, tmp_path):
    broken = _model_with_nan(model_dir, tmp_path / "nan_model")
    with pytest.raises(FloatingPointError, match=r"at step 1 for relation\(s\) \['AtLocation'"):
        train_and_evaluate(_config(model_dir, model=str(broken)), tmp_path / "a", **QUIET)
    said = []
    train_and_evaluate(_config(model_dir, model=str(broken), on_nonfinite="skip",
                               specialization=False, plots=False,
                               **{"controls.enabled": False}), tmp_path / "b",
                       log=said.append)
    assert any("non-finite loss" in line for line in said)
    masks = RunDirectory(tmp_path / "b").best_masks()
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(masks))


def _damage(checkpoint: Path) -> int:
    """Truncates every data file of one checkpoint to a third; returns how many."""
    damaged = 0
    for f in checkpoint.rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "metadata" not in f.name:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
            damaged += 1
    return damaged


def _checkpoint_steps(workdir: Path) -> list[int]:
    """The steps of the state checkpoints under ``workdir/checkpoints`` (none yet: [])."""
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _snapshot(workdir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``workdir``: its bytes and modification time."""
    return {str(f.relative_to(workdir)): (f.read_bytes(), f.stat().st_mtime_ns)
            for f in sorted(workdir.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def reference_run(tiny_run) -> dict:
    """The uninterrupted run the damaged-checkpoint drills must end with (tests/conftest.py)."""
    return tiny_run[1]


def test_damaged_latest_checkpoint_falls_back_to_an_older_one(model_dir, reference_run,
                                                              tmp_path):
    quick = {"specialization": False, "plots": False, "controls.enabled": False}
    work = tmp_path / "run"
    train_and_evaluate(_config(model_dir, stop_after=5, **quick), work, **QUIET)
    steps = _checkpoint_steps(work)
    assert len(steps) == 2
    assert _damage(work / "checkpoints" / str(steps[-1]))
    said = []
    resumed = train_and_evaluate(_config(model_dir, **quick), work, log=said.append)
    assert any(f"checkpoint step {steps[-1]}" in line and "cannot be read" in line
               for line in said)
    assert f"resumed from step {steps[0]}" in said
    assert resumed["resumed_from"] == [steps[0]]
    assert resumed["test"] == reference_run["test"]


def test_when_no_checkpoint_can_be_read_the_run_stops_and_changes_nothing(
        model_dir, reference_run, tmp_path):
    """No silent restart: a fresh start would push the old checkpoints out. Starting over is
    the explicit config.on_unreadable_checkpoints="start_over"."""
    quick = {"specialization": False, "plots": False, "controls.enabled": False}
    work = tmp_path / "run"
    train_and_evaluate(_config(model_dir, stop_after=5, **quick), work, **QUIET)
    steps = _checkpoint_steps(work)
    assert len(steps) == 2
    for step in steps:
        assert _damage(work / "checkpoints" / str(step))
    before = _snapshot(work)
    with pytest.raises(RuntimeError) as err:
        train_and_evaluate(_config(model_dir, **quick), work, **QUIET)
    message = str(err.value)
    assert message.startswith(f"cannot resume: none of the 2 checkpoint(s) under "
                              f"{work / 'checkpoints'} can be read, and nothing was changed")
    for step in steps:  # each checkpoint named, with the reason it failed
        assert any(line.startswith(f"  step {step}: ") and len(line) > 20
                   for line in message.splitlines()), message
    assert "--config.on_unreadable_checkpoints=start_over" in message
    assert "fresh --workdir" in message
    assert _snapshot(work) == before  # not a byte, not a timestamp
    said = []
    again = train_and_evaluate(_config(model_dir, on_unreadable_checkpoints="start_over",
                                       **quick), work, log=said.append)
    assert any("starting over" in line for line in said)
    assert again["resumed_from"] == [] and again["test"] == reference_run["test"]
    history = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [h["step"] for h in reference_run["history"]]


def _train_cmd(workdir: Path) -> list[str]:
    # The embedded default shortened to 20 of its 40 epochs (the masks are specialized by
    # then), exactly as the session's embedded run was trained (tests/conftest.py), which is
    # the uninterrupted reference.
    return [sys.executable, "train.py", f"--workdir={workdir}", *EMBEDDED_RUN_ARGS]


@pytest.mark.slow
def test_kill_9_several_times_then_resume_gives_identical_masks(embedded_run_dir, tmp_path):
    """Soak test on the embedded default: kill -9 at random moments, restart the same command."""
    reference = embedded_run_dir
    # Every restart compiles the same programs: the session's persistent compilation cache
    # (tests/conftest.py), filled when the reference was trained, keeps them.
    env = dict(os.environ)
    _assert_the_default_run_shows_the_effect(json.loads((reference / "metrics.json").read_text()))
    work, kills, rng = tmp_path / "killed", 0, np.random.default_rng(0)
    for _ in range(12):
        proc = subprocess.Popen(_train_cmd(work), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, env=env)
        # Wait until this process is training (a checkpoint newer than before appears), then
        # kill it at a random moment of the next few seconds.
        deadline = time.time() + 120
        before = _latest_step(work)
        while _latest_step(work) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if kills == 3:
            break
    assert kills == 3
    done = subprocess.run(_train_cmd(work), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    for a, b in zip(jax.tree.leaves(RunDirectory(work).best_masks()),
                    jax.tree.leaves(RunDirectory(reference).best_masks()), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (work / "masks.npz").read_bytes() == (reference / "masks.npz").read_bytes()
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (work, reference)]
    assert metrics[0]["test"] == metrics[1]["test"]
    # Each relaunch resumed, from a later checkpoint than the one before, before the end.
    resumes = metrics[0]["resumed_from"]
    assert len(resumes) == kills and resumes == sorted(set(resumes)), resumes
    assert 0 < resumes[0] and resumes[-1] < metrics[0]["steps"]
    assert metrics[1]["resumed_from"] == []
    history = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    evaluations = [h["step"] for h in history if "event" not in h]
    assert evaluations == [h["step"] for h in metrics[1]["history"]]  # none lost or repeated
    assert [h["step"] for h in history if h.get("event") == "resumed"] == resumes
    # Never a half-written checkpoint among the ones Orbax would resume from.
    assert all(p.name.isdigit() for p in (work / "checkpoints").iterdir()
               if not p.name.startswith("."))


PREEMPTED_LINE = re.compile(r"^preemption notice \(SIGTERM\): saved the state at step (\d+); "
                            r"run the same command again to resume$", re.MULTILINE)


def _evaluated_steps(workdir: Path) -> list[int]:
    """Steps of the evaluations in ``metrics.jsonl`` so far (a line being written is left)."""
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return [h["step"] for h in map(json.loads, lines) if "event" not in h]


def test_the_preemption_notice_hears_sigterm_only_while_entered():
    """Inside, a SIGTERM is noted (and answered at the next step); outside, the handler is the
    one from before, so a SIGTERM during the final report still stops the process."""
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionNotice() as notice:
        assert not notice.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.reached(2) and notice.reached(3)
    assert signal.getsignal(signal.SIGTERM) is before
    with PreemptionNotice() as notice:  # a new loop starts without the old notice
        assert not notice.reached(1)


@pytest.mark.slow
def test_sigterm_saves_the_step_it_reached_and_the_rerun_ends_with_identical_masks(
        embedded_run_dir, tmp_path):
    """A preemption notice (SIGTERM) while training: the run saves its state at the step it
    reached, between two evaluations (whose periodic checkpoints would lose the steps since the
    last one), says so in one line and exits with status 75; the same command resumes from that
    step and ends with the masks of the uninterrupted run."""
    reference, work = embedded_run_dir, tmp_path / "preempted"
    notices = 0
    while True:  # until a notice lands between two evaluations (2 in 3 do)
        before = _evaluated_steps(work)
        log = tmp_path / f"notice_{notices}.log"  # a file: a full pipe would stall the run
        proc = subprocess.Popen(_train_cmd(work), cwd=ROOT, stdout=log.open("w"),
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        # Training: an evaluation newer than the earlier invocations' is written.
        while (proc.poll() is None and time.time() < deadline
               and _evaluated_steps(work) == before):
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        output = log.read_text()
        notices += 1
        assert proc.returncode == PREEMPTED_EXIT, output[-3000:]
        assert "Traceback" not in output
        step = int(PREEMPTED_LINE.search(output)[1])
        assert _latest_step(work) == step  # the state of that very step
        if step not in _evaluated_steps(work):
            break
        assert notices < 4, "four SIGTERMs all landed on evaluation steps"
    total = json.loads((reference / "metrics.json").read_text())["steps"]
    assert max(_evaluated_steps(work)) < step < total
    done = subprocess.run(_train_cmd(work), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((work / "metrics.json").read_text())
    assert metrics["resumed_from"][-1] == step and len(metrics["resumed_from"]) == notices
    assert (work / "masks.npz").read_bytes() == (reference / "masks.npz").read_bytes()
    assert metrics["test"] == json.loads((reference / "metrics.json").read_text())["test"]


def _assert_the_default_run_shows_the_effect(summary: dict) -> None:
    """The default config's result: held-out macro P@1 of the subnetworks >= full model + 10
    pts, and each subnetwork is specialized to its relation."""
    full = summary["test"]["full"]["macro_P@1"]
    pruned = summary["test"]["pruned"]["macro_P@1"]
    # Measured (40 epochs, seeds 0-2): full 0.172, pruned 0.609 +- 0.028 (held-out facts, best
    # checkpoint chosen on dev).
    assert pruned >= full + 0.10
    matrix = np.asarray(summary["specialization"])
    off_diagonal = matrix[~np.eye(len(matrix), dtype=bool)]
    assert np.mean(np.diag(matrix)) > np.mean(off_diagonal) + 0.2


def _latest_step(workdir: Path) -> int:
    """The newest state checkpoint's step under ``workdir/checkpoints`` (none yet: -1)."""
    return max(_checkpoint_steps(workdir), default=-1)


def test_allocator_hint_only_for_large_masks_on_a_linux_cpu_with_glibc_defaults():
    big, small = 6 * 42_467_328 * 4, 3_145_728 * 4  # bert-base layers 6..11 x 6 relations; ours
    hint = allocator_hint(big, "cpu", "Linux", {})
    assert hint is not None and f"GLIBC_TUNABLES={CPU_MALLOC_TUNABLES}" in hint
    assert "cpu_devices" not in hint
    # Its single heap slowed two CPU devices down: the tip then says to use one.
    assert "and --config.cpu_devices=1" in allocator_hint(big, "cpu", "Linux", {}, devices=2)
    assert allocator_hint(small, "cpu", "Linux", {}) is None
    assert allocator_hint(big, "gpu", "Linux", {}) is None
    assert allocator_hint(big, "cpu", "Darwin", {}) is None
    assert allocator_hint(big, "cpu", "Linux", {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert allocator_hint(big, "cpu", "Linux", {"LD_PRELOAD": "libtcmalloc.so"}) is None
