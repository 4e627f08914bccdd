"""The command line as a user meets it: ``lamp-jax <command>``, its ``--help``, its one-line
errors, the older forms that must keep working, and progress bars only on a terminal.

Every command runs in a fresh process, as typed (``python -m lamp_jax ...``, ``python train.py
...``); independent ones run two at a time. Only the error boundary's own behaviour (a bug keeps
its traceback, ``--debug``, the exit statuses) is driven in-process through ``main(argv)``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import termios
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lamp_jax import cli
from lamp_jax.configs import default
from lamp_jax.errors import StorageError, UsageError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lama_conceptnet_sample.jsonl"
EMBEDDED_RELATIONS = ("AtLocation, CapableOf, Desires, HasProperty, IsA, MadeOf, PartOf, "
                      "UsedFor")
TINY_RELATIONS = "AtLocation, CapableOf, Desires, HasSubevent, IsA, UsedFor"


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _lamp_jax(*args: str) -> list[str]:
    return [sys.executable, "-m", "lamp_jax", *args]


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Every command in a fresh process, two at a time (the machine has two cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = {name: pool.submit(_run, command) for name, command in commands.items()}
        return {name: future.result() for name, future in done.items()}


def _files(directory: Path) -> dict[str, bytes | None]:
    """Every file under ``directory`` with its bytes, and every folder (None)."""
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


# --- help -----------------------------------------------------------------------------------

# Each command's flags; each must start a line of its --help and have help text on that line.
FLAGS = {
    "train": ("--config=NAME_OR_FILE", "--config.FIELD=VALUE", "--workdir=DIR",
              "--[no]distributed", "--coordinator_address=HOST:PORT", "--num_processes=N",
              "--process_id=I", "--help-config", "--debug", "-h, --help"),
    "sweep": ("--config=NAME_OR_FILE", "--config.FIELD=VALUE", "--grid=FIELD=V1,V2",
              "--seeds=N", "--workdir=DIR", "--help-config", "--debug", "-h, --help"),
    "evaluate": ("--workdir RUN", "--split {train,dev,test}", "--model DIR", "--cpu-devices N",
                 "--debug", "-h, --help"),
    "report": ("--workdir RUN", "--ckbc FILE", "--max-size K", "--qa FILE",
               "--qa-format {csqa,copa}", "--qa-relations R1,R2",
               "--qa-method {or,and,vote,soft}", "--control RUN", "--debug", "-h, --help"),
    "predict": ("RUN", "PROMPT", "--relation RELATION", "-k K", "--kind {threshold,expectation}",
                "--model DIR", "--debug", "-h, --help"),
    "export": ("RUN", "RELATION", "DIR", "--kind {threshold,expectation}", "--model DIR",
               "--debug", "-h, --help"),
    "launch": ("--processes N", "--devices-per-process N", "--grace SECONDS",
               "--heartbeat-timeout SECONDS", "--port PORT", "--debug", "-h, --help"),
}
COMMON_FIELDS = ("model", "data.source", "data.relations", "mask.first_layer",
                 "mask.last_layer", "mask.mode", "optim.learning_rate", "epochs", "dtype")
CONSOLE_SCRIPT = ("import sys; from lamp_jax.cli import {function}; "
                  "sys.argv = ['{script}', '--help']; sys.exit({function}())")


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    """``--help`` of every command, in its new form and in every older one."""
    commands = {"lamp-jax": _lamp_jax("--help"),
                **{name: _lamp_jax(name, "--help") for name in FLAGS},
                "train --help-config": _lamp_jax("train", "--help-config"),
                "python train.py": [sys.executable, "train.py", "--help"]}
    for module in ("sweep", "evaluate", "report", "launch"):
        commands[f"python -m lamp_jax.{module}"] = [sys.executable, "-m", f"lamp_jax.{module}",
                                                    "--help"]
    for function, script in (("main", "lamp-jax"), ("train", "lamp-jax-train"),
                             ("evaluate", "lamp-jax-evaluate"), ("report", "lamp-jax-report")):
        commands[script + " (console script)"] = [
            sys.executable, "-c", CONSOLE_SCRIPT.format(function=function, script=script)]
    commands["main --help"] = commands.pop("lamp-jax (console script)")
    return _run_all(commands)


@pytest.mark.parametrize("command", FLAGS)
def test_every_commands_help_exits_0_and_gives_each_flag_a_line(helps, command):
    done = helps[command]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"usage: lamp-jax {command}")
    for flag in FLAGS[command]:  # the flag, two spaces or more, and a line of help
        described = [m for m in (re.match(rf"\s+{re.escape(flag)}\s{{2,}}(\S.*)$", line)
                                 for line in lines) if m]
        assert described, (flag, done.stdout)
        assert len(described[0].group(1).split()) >= 3, described[0].group(0)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_train_and_sweep_help_name_the_common_config_fields_and_how_to_see_all(helps, command):
    lines = helps[command].stdout.splitlines()
    config = default.get_config()
    for field in COMMON_FIELDS:
        value = config
        for part in field.split("."):
            value = value[part]
        flag = f"--config.{field}={value}"
        line = next((m for m in (re.match(rf"\s+{re.escape(flag)}\s{{2,}}(\S.*)$", line)
                                 for line in lines) if m), None)
        assert line is not None, (flag, helps[command].stdout)
        assert len(line.group(1).split()) >= 3, line.group(0)  # and a line of help
    assert f"lamp-jax {command} --help-config" in helps[command].stdout


def test_the_overview_lists_every_command(helps):
    done = helps["lamp-jax"]
    assert done.returncode == 0, done.stderr
    for command in FLAGS:
        assert re.search(rf"^  {command} +\S+ \S+", done.stdout, re.M), (command, done.stdout)


def test_help_config_lists_every_field_with_its_default_and_its_comment(helps):
    done = helps["train --help-config"]
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    fields = dict(cli.config_fields(default.get_config()))
    for field, value in fields.items():
        assert f"{field} = {value!r}" in lines, field
    assert len([line for line in lines if re.match(r"\S+ = ", line)]) == len(fields)
    text = " ".join(line.strip() for line in lines)
    # Comments of configs/default.py: on the field's line, and in the lines above it.
    for field, comment in (
            ("model", 'hub id ("bert-base-uncased"), local directory, or "embedded"'),
            ("mask.tau", "concrete temperature (the reference's value)"),
            ("data.source", '"embedded" (the toy world), "lama" (LAMA\'s data, downloaded on '
                            "first use), the path of LAMA's unzipped data/ folder"),
            ("on_unreadable_checkpoints", 'A workdir whose checkpoints all fail to read: "stop"')):
        assert f"{field} = {fields[field]!r} {comment}" in text, field


def test_the_older_forms_give_the_same_help(helps):
    """``python train.py``, ``python -m lamp_jax.<module>`` and the console-script functions
    run the same commands: the same help, exit status 0."""
    same = {"python train.py": "train", "lamp-jax-train (console script)": "train",
            "python -m lamp_jax.sweep": "sweep", "python -m lamp_jax.evaluate": "evaluate",
            "lamp-jax-evaluate (console script)": "evaluate", "python -m lamp_jax.report":
            "report", "lamp-jax-report (console script)": "report",
            "python -m lamp_jax.launch": "launch", "main --help": "lamp-jax"}
    for old, new in same.items():
        assert helps[old].returncode == 0, (old, helps[old].stderr)
        assert helps[old].stdout == helps[new].stdout, old


# --- user mistakes ----------------------------------------------------------------------------

def _make_world(root: Path, run: Path) -> Path:
    """What a bad command is given: a copy of a finished run, a copy whose run.json names a
    model that is not there (commands that refuse before loading the model cannot tell),
    directories that are not runs, and a data file with a malformed line."""
    shutil.copytree(run, root / "run")
    shutil.copytree(run, root / "modelless_run")
    manifest = json.loads((root / "modelless_run" / "run.json").read_text())
    manifest["model"] = str(root / "no_model_here")
    (root / "modelless_run" / "run.json").write_text(json.dumps(manifest))
    for empty in ("not_a_run", "empty"):
        (root / empty).mkdir()
    lines = FIXTURE.read_text().splitlines()
    (root / "bad.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    return root


# (name, arguments, what the error line says, whether the model may load first). {w} is the
# command's own world (_make_world); nothing in it may be created or changed.
MISTAKES = [
    ("missing data file", ["train", "--config.data.source=/nonexistent.jsonl", "--workdir={w}/new"],
     r"config.data.source = '/nonexistent.jsonl': /nonexistent.jsonl does not exist", False),
    ("bad config value", ["train", "--config.mask.mode=bogus", "--workdir={w}/new"],
     r"invalid configuration: config.mask.mode = 'bogus'; choose one of \('stochastic', "
     r"'deterministic'\)", False),
    ("no such model directory", ["train", "--config.model=/nonexistent", "--workdir={w}/new"],
     r"config.model = '/nonexistent': no such directory", False),
    ("a directory that is not a model", ["train", "--config.model={w}/not_a_run",
                                         "--workdir={w}/new"],
     r"config.model = '.*not_a_run': .*not_a_run is not a model directory \(no config.json", False),
    ("unknown relation", ["train", "--config.data.relations=NotARelation", "--workdir={w}/new"],
     rf"config.data.relations lists \['NotARelation'\], .*the data holds no such relation \(the "
     rf"8 it holds: {EMBEDDED_RELATIONS}\)", False),
    ("workdir of another run", ["train", "--workdir={w}/run"],
     r"/run holds another run; its checkpoints do not fit this configuration:", True),
    ("--config names nothing", ["train", "--config=nope", "--workdir={w}/new"],
     r"--config 'nope': no such file, and not a packaged config \(packaged: .*default, ", False),
    ("unknown config field", ["train", "--config.mask.mdoe=stochastic", "--workdir={w}/new"],
     r"--config.mask.mdoe: the config has no field 'mask.mdoe'; did you mean mask.mode", False),
    ("unknown flag", ["train", "--work_dir={w}/new"],
     r"unknown flag --work_dir; did you mean --workdir\?", False),
    ("--grid on no field", ["sweep", "--grid", "optim.lr=0.1,1.0", "--workdir={w}/new"],
     r"--grid 'optim.lr=0.1,1.0': the config has no field 'optim.lr'", False),
    ("bad data line", ["train", "--config.data.source={w}/bad.jsonl", "--workdir={w}/empty"],
     r"bad.jsonl:3: malformed JSON", True),
    ("layers the model has not", ["train", "--config.mask.first_layer=2",
                                  "--config.mask.last_layer=9", "--workdir={w}/empty"],
     r"mask layers 2..9 are not within the model's 0..3 \(config.mask.first_layer", True),
    ("prompt without [MASK]", ["predict", "{w}/modelless_run", "a prompt without a mask ."],
     r"the prompt must contain exactly one \[MASK\] \(it has 0\): 'a prompt without a mask .'",
     False),
    ("predict: unknown relation", ["predict", "{w}/modelless_run", "a [MASK] .", "--relation",
                                   "NotARelation"],
     rf"unknown relation 'NotARelation'; this run has {TINY_RELATIONS}$", False),
    ("export: unknown relation", ["export", "{w}/modelless_run", "NotARelation", "{w}/new"],
     rf"unknown relation 'NotARelation'; this run has {TINY_RELATIONS}$", False),
    ("a required flag left out", ["evaluate", "--split", "dev"],
     r"lamp-jax evaluate: the following arguments are required: --workdir \(lamp-jax evaluate "
     r"--help lists the flags\)", False),
    ("not a run directory", ["evaluate", "--workdir", "{w}/not_a_run"],
     r"not_a_run is not a lamp-jax run directory \(no run.json\)", False),
    ("report: missing --qa file", ["report", "--workdir", "{w}/modelless_run", "--qa",
                                   "/nonexistent.jsonl"], r"--qa /nonexistent.jsonl: no such file",
     False),
    ("unknown command", ["trian"], r"unknown command 'trian'; did you mean train\?", False),
    ("launch without a command", ["launch", "--processes", "2"],
     r"name the command to start after --", False),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory, tiny_run) -> dict[str, tuple]:
    """Every mistake, each in its own fresh process and its own world: ``name -> (result,
    world, its files before, its files after)``."""
    worlds = {name: _make_world(tmp_path_factory.mktemp("world"), tiny_run[0])
              for name, *_ in MISTAKES}
    before = {name: _files(world) for name, world in worlds.items()}
    commands = {name: _lamp_jax(*(a.replace("{w}", str(worlds[name])) for a in args))
                for name, args, _, _ in MISTAKES}
    results = _run_all(commands)
    return {name: (results[name], worlds[name], before[name], _files(worlds[name]))
            for name in worlds}


@pytest.mark.parametrize("name,args,message,may_load", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_a_mistake_is_one_error_line_exit_2_no_traceback_and_nothing_written(
        refused, name, args, message, may_load):
    done, world, before, after = refused[name]
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert re.search(message, errors[0]), errors[0]
    if not may_load:  # refused before the model loaded ("model: ..." is logged once it has)
        assert "model: " not in done.stdout, done.stdout
    assert after == before  # no file or folder created or changed ({w}/new included)


# --- the error boundary, in-process -----------------------------------------------------------

def test_a_bug_keeps_its_traceback_and_debug_shows_a_mistakes(monkeypatch, tmp_path, capsys):
    import lamp_jax.loop

    def buggy(config, workdir):
        raise KeyError("a bug")

    monkeypatch.setattr(lamp_jax.loop, "train_and_evaluate", buggy)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    with pytest.raises(KeyError, match="a bug"):  # propagates: Python prints its traceback
        cli.main(["train", f"--workdir={tmp_path / 'w'}"])

    def mistaken(config, workdir):
        raise UsageError("config.epochs = 0; must be in [1, inf]")

    monkeypatch.setattr(lamp_jax.loop, "train_and_evaluate", mistaken)
    capsys.readouterr()
    assert cli.main(["train", f"--workdir={tmp_path / 'w'}"]) == 2
    err = capsys.readouterr().err
    assert err == "error: config.epochs = 0; must be in [1, inf]\n"
    for argv, env in ((["train", "--debug"], None), (["--debug", "train"], None),
                      (["train"], "1")):
        if env:
            monkeypatch.setenv(cli.DEBUG_ENV, env)
        assert cli.main([*argv, f"--workdir={tmp_path / 'w'}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "in mistaken" in err, argv
        assert err.splitlines()[-1] == "error: config.epochs = 0; must be in [1, inf]"


def test_storage_faults_and_preemption_exit_75(monkeypatch, tmp_path, capsys):
    import lamp_jax.loop

    def full_disk(config, workdir):
        raise StorageError(f"{workdir}/checkpoints: No space left on device")

    monkeypatch.setattr(lamp_jax.loop, "train_and_evaluate", full_disk)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["train", f"--workdir={tmp_path}"]) == 75
    assert capsys.readouterr().err == (f"error: {tmp_path}/checkpoints: No space left on "
                                       "device\n")
    monkeypatch.setattr(lamp_jax.loop, "train_and_evaluate",
                        lambda config, workdir: {"stopped_at": 3, "preempted": True})
    assert cli.main(["train", f"--workdir={tmp_path}"]) == 75


def test_train_and_sweep_take_the_config_flags_as_ml_collections_does(monkeypatch, tmp_path):
    """``--config`` by name or path, ``--config.FIELD=VALUE`` typed as the field, the other
    flags: what reaches train_and_evaluate and run_sweep."""
    import lamp_jax.loop
    import lamp_jax.sweep

    seen = {}
    monkeypatch.setattr(lamp_jax.loop, "train_and_evaluate",
                        lambda config, workdir: seen.update(config=config, workdir=workdir)
                        or {"stopped_at": 1})
    assert cli.main(["train", "--config=runlocal", "--config.batch_size=7",
                     "--config.mask.first_layer=1", "--config.data.relations=IsA,MadeOf",
                     "--workdir", str(tmp_path)]) == 0
    config = seen["config"]
    assert (config.batch_size, config.mask.first_layer, seen["workdir"]) == (7, 1, str(tmp_path))
    assert config.data.relations == ("IsA,MadeOf",)  # split on commas by the data reader
    assert (config.epochs, config.specialization) == (5, False)  # runlocal's, not default's
    monkeypatch.setattr(lamp_jax.sweep, "run_sweep",
                        lambda config, grid, seeds, workdir: seen.update(
                            config=config, grid=grid, seeds=seeds) or {})
    assert cli.main(["sweep", "--grid", "optim.learning_rate=0.1,1", "--grid=mask.mode=a,b",
                     "--seeds=2", f"--config={cli.CONFIG_DIR / 'default.py'}",
                     "--config.optim.learning_rate=0.5"]) == 0
    assert seen["grid"] == ["optim.learning_rate=0.1,1", "mask.mode=a,b"] and seen["seeds"] == 2
    assert seen["config"].optim.learning_rate == 0.5


# --- what the commands do -------------------------------------------------------------------

def test_predict_export_and_launch_from_the_command_line(tiny_run, tmp_path):
    from lamp_jax.api import load_run

    run_dir = tiny_run[0]
    prompt = "You are likely to find a book in a [MASK]."
    exported = tmp_path / "IsA"
    child = "import os; print('process', os.environ['JAX_PROCESS_ID'])"
    done = _run_all({
        "subnetwork": _lamp_jax("predict", str(run_dir), prompt, "--relation", "IsA", "-k", "3"),
        "full": _lamp_jax("predict", str(run_dir), prompt, "-k", "2"),
        "export": _lamp_jax("export", str(run_dir), "IsA", str(exported), "--kind",
                            "expectation"),
        "launch": _lamp_jax("launch", "--processes", "2", "--", sys.executable, "-c", child),
    })
    for result in done.values():
        assert result.returncode == 0, result.stdout + result.stderr
    run = load_run(run_dir)
    for name, relation, k in (("subnetwork", "IsA", 3), ("full", None, 2)):
        lines = done[name].stdout.splitlines()
        expected = run.predict(prompt, relation=relation, k=k)
        assert [line.split("\t")[0] for line in lines] == [t for t, _ in expected]
        assert [float(line.split("\t")[1]) for line in lines] == pytest.approx(
            [p for _, p in expected], abs=1e-6)
        assert "loading the model" not in done[name].stderr  # no bar: not a terminal
    provenance = json.loads((exported / "lamp_jax_subnetwork.json").read_text())
    assert (provenance["relation"], provenance["kind"]) == ("IsA", "expectation")
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()
    assert sorted(done["launch"].stdout.splitlines()) == ["[1] process 1", "process 0"]


def _on_a_terminal(command: list[str], timeout: float = 300) -> tuple[int, str]:
    """``command``'s exit status and output when its stdout and stderr are a terminal."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the terminal closed: the process is gone
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def test_long_phases_show_progress_bars_on_a_terminal(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(tiny_run[0], workdir)
    code, evaluated = _on_a_terminal(_lamp_jax("evaluate", "--workdir", str(workdir)))
    assert code == 0, evaluated[-3000:]
    code, reported = _on_a_terminal(_lamp_jax("report", "--workdir", str(workdir),
                                              "--max-size", "1"))
    assert code == 0, reported[-3000:]
    for output, bars in ((evaluated, ("loading the model (model): 100%|",
                                      "evaluating on test:  ")),
                         (reported, ("loading the model (model): 100%|",
                                     "report: findings:   0%|", "report: specialization: ",
                                     "combined masks:   0%|", "report: kbc: 100%|"))):
        for bar in bars:
            assert bar in output, (bar, output[-3000:])
