"""The ``lamp-jax`` command: one program, a subcommand per job, and the only argument parser.

    lamp-jax train [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...] [--workdir=DIR]
    lamp-jax sweep --grid FIELD=V1,V2 [--seeds N] [--workdir=DIR]
    lamp-jax evaluate --workdir RUN [--split dev]
    lamp-jax report --workdir RUN [--ckbc FILE] [--qa FILE]
    lamp-jax predict RUN "You are likely to find a fork in the [MASK]." [--relation R] [-k 5]
    lamp-jax export RUN RELATION DIR [--kind threshold|expectation]
    lamp-jax launch --processes N -- lamp-jax train ...

The older forms run the same code: ``python train.py`` and ``lamp-jax-train`` are ``lamp-jax
train``; ``lamp-jax-evaluate`` and ``lamp-jax-report`` are ``lamp-jax evaluate`` and ``lamp-jax
report``; ``python -m lamp_jax.sweep|evaluate|report|launch`` are the subcommands of those names.

``train`` and ``sweep`` take ml_collections config flags: ``--config`` names a config file or a
packaged config (``lamp_jax/configs``: default, runlocal, bert_base_conceptnet, ...) and
``--config.FIELD=VALUE`` sets one field; ``--help-config`` lists every field.

Errors. A mistake in what the user asked for (:class:`~lamp_jax.errors.UsageError`: a missing
file, a bad config value, an unknown relation or flag) prints one ``error: ...`` line and exits
with status 2; a failed write to the run's storage (:class:`~lamp_jax.errors.StorageError`)
prints ``error: ...`` and exits with 75, as a preemption does (rerun to resume). ``--debug`` (or
``LAMP_JAX_DEBUG=1``) prints their traceback too. Any other exception is a bug in lamp-jax: it
keeps its traceback and its non-zero exit status.

Several processes (a pod, or one machine): run the same ``train`` command in every process with
``--distributed``. The coordinator is auto-detected where JAX can (TPU, SLURM, Open MPI, ...);
elsewhere pass ``--coordinator_address``/``--num_processes``/``--process_id`` (or set
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). ``lamp-jax launch
--processes 2 -- lamp-jax train`` does that for N local processes.

Heavy modules (JAX, the model code) are imported by the command that needs them, so ``--help``
and most refusals answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import io
import os
import re
import sys
import textwrap
import tokenize
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lamp_jax.errors import StorageError, UsageError

PROG = "lamp-jax"
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.py"
USAGE_EXIT = 2  # what argparse and most Unix tools return for a usage mistake
STORAGE_EXIT = 75  # EX_TEMPFAIL, as a preemption (lamp_jax.hosts.PREEMPTED_EXIT): rerun later
DEBUG_ENV = "LAMP_JAX_DEBUG"
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")

# The config fields users set most often, as `train --help` and `sweep --help` name them.
COMMON_FIELDS = (
    ("model", "hub id (bert-base-uncased), model directory, or embedded"),
    ("data.source", "embedded, lama (downloads it), LAMA's data/ folder, a jsonl"),
    ("data.relations", "relations to train, comma-separated (empty: all)"),
    ("mask.first_layer", "the lowest masked layer (None: the top half)"),
    ("mask.last_layer", "the highest masked layer (None: the last layer)"),
    ("mask.mode", "stochastic (binary concrete) or deterministic (STE)"),
    ("optim.learning_rate", "Adam's learning rate (embedded: 2.0, bert-base: 3e-4)"),
    ("epochs", "passes over each relation's training prompts"),
    ("dtype", "float32, or bfloat16 (half the memory)"),
)
HELP_WIDTH = 100


# --- the error boundary ---------------------------------------------------------------------

def _debug_requested(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (anywhere before a ``--``: what follows belongs to the
    command ``launch`` starts), and whether a traceback was asked for (``--debug`` or
    ``LAMP_JAX_DEBUG=1``)."""
    end = list(argv).index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != "--debug"]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return head + list(argv[end:]), env or len(head) < end


def _guarded(command: Callable[[list[str]], int], argv: list[str]) -> int:
    """Runs ``command(argv)`` and returns its exit status; a user's mistake or a storage
    fault becomes one ``error:`` line. Every other exception propagates with its traceback."""
    argv, debug = _debug_requested(argv)
    try:
        return command(argv)
    except (UsageError, StorageError) as err:
        sys.stdout.flush()
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {err}\n")  # one write: another thread's log cannot split it
        sys.stderr.flush()
        if isinstance(err, StorageError) and err.writes_in_flight:
            os._exit(STORAGE_EXIT)  # not waiting for client threads stuck on failed storage
        return USAGE_EXIT if isinstance(err, UsageError) else STORAGE_EXIT


class _Parser(argparse.ArgumentParser):
    """argparse with its mistakes raised as :class:`UsageError` (one ``error:`` line, exit 2)
    and its exits (``--help``) returned as statuses instead of ending the process."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} ({self.prog} --help lists the flags)")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


class _Exit(Exception):
    """argparse finished the command itself (``--help``) with this exit status."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _parser(command: str, description: str, epilog: str = "") -> _Parser:
    def formatter(prog: str) -> argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=36, width=HELP_WIDTH)

    parser = _Parser(prog=f"{PROG} {command}", description="\n".join(textwrap.wrap(
        description, HELP_WIDTH)), epilog=epilog, formatter_class=formatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"on an error, show the traceback too (or {DEBUG_ENV}=1)")
    return parser


def _parse(parser: _Parser, argv: Sequence[str]) -> argparse.Namespace | int:
    """The parsed flags, or the exit status of ``--help``."""
    try:
        return parser.parse_args(list(argv))
    except _Exit as done:
        return done.status


# --- config flags (train, sweep) ------------------------------------------------------------

def resolve_config_argument(argv: list[str]) -> list[str]:
    """``argv`` with ``--config NAME`` / ``--config=NAME`` turned into the packaged config's
    path when NAME is not a file (``:arg`` suffixes of ml_collections are kept)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            out += [arg, _config_path(argv[i + 1])]
            i += 2
            continue
        if arg.startswith(("--config=", "-config=")):
            flag, value = arg.split("=", 1)
            arg = f"{flag}={_config_path(value)}"
        out.append(arg)
        i += 1
    return out


def _config_path(value: str) -> str:
    path, sep, suffix = value.partition(":")
    if Path(path).is_file():
        return value
    name = path.removesuffix(".py")
    packaged = CONFIG_DIR / f"{Path(name).name}.py"
    if packaged.is_file() and (not Path(path).parent.parts or path.startswith("configs/")):
        return str(packaged) + sep + suffix
    raise UsageError(f"--config {value!r}: no such file, and not a packaged config "
                     f"(packaged: {', '.join(packaged_configs())})")


def packaged_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def _named_config(argv: Sequence[str]) -> str:
    """The (resolved) value of ``--config`` in ``argv``; the default config when none."""
    for i, arg in enumerate(argv):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
    return str(DEFAULT_CONFIG)


def load_config(value: str) -> Any:
    """The ConfigDict of a config file (``path`` or ``path:arg``), as ``--config`` loads it;
    UsageError naming the file when it cannot be loaded."""
    path, _, arg = value.partition(":")
    try:
        spec = importlib.util.spec_from_file_location("lamp_jax_cli_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as err:  # the user's own file: any failure is theirs to fix
        raise UsageError(f"--config {path}: could not load it: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''} (--debug shows where)"
                         ) from err


def config_fields(config: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of ``config`` as ``(dotted name, value)``."""
    for key, value in config.items():
        if hasattr(value, "items") and not isinstance(value, dict | str):
            yield from config_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def config_comments(path: Path = DEFAULT_CONFIG) -> dict[str, str]:
    """Field -> what ``path``'s ``get_config`` says of it: the comment lines just above its
    ``c.<field> = ...`` line and the comment at the end of that line, in file order."""
    comments, block = {}, []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        assigned = re.match(r"c\.([\w.]+)\s*=", stripped)
        if assigned:
            comments[assigned.group(1)] = " ".join([*block, _line_comment(line)]).strip()
        block = []
    return comments


def _line_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):
        return ""
    return " ".join(t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT)


def _check_overrides(config: Any, argv: Sequence[str], prog: str) -> None:
    """Every ``--config.FIELD=...`` names a field of ``config``."""
    known = dict(config_fields(config))
    for arg in argv:
        if not arg.startswith(("--config.", "-config.")):
            continue
        field = arg.split("=", 1)[0].split("config.", 1)[1]
        node, parts = config, field.split(".")
        for part in parts:
            if not hasattr(node, "items") or part not in node:
                close = difflib.get_close_matches(field, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise UsageError(f"--config.{field}: the config has no field {field!r}{hint} "
                                 f"({prog} --help-config lists every field)")
            node = node[part]


@dataclasses.dataclass(frozen=True)
class Flag:
    """One absl flag of ``train`` or ``sweep``: how it is defined and the line of help it gets."""

    name: str
    kind: str  # absl's DEFINE_<kind>: string, bool, integer, multi_string
    default: Any
    help: str
    metavar: str = ""


TRAIN_FLAGS = (
    Flag("workdir", "string", "runs/default",
         "where the run goes, a path or a gs:// URL (default: runs/default)", "DIR"),
    Flag("distributed", "bool", False, "join the run's other processes first (jax.distributed)"),
    Flag("coordinator_address", "string", None, "process 0's address (default: auto-detected)",
         "HOST:PORT"),
    Flag("num_processes", "integer", None, "processes in the run (default: auto-detected)",
         "N"),
    Flag("process_id", "integer", None, "this process's index from 0 (default: auto-detected)",
         "I"),
)
SWEEP_FLAGS = (
    Flag("grid", "multi_string", [], "values of one config field; repeat for more fields",
         "FIELD=V1,V2"),
    Flag("seeds", "integer", 3, "seeds per configuration: config.seed, +1, ... (default: 3)",
         "N"),
    Flag("workdir", "string", "runs/sweep", "where the sweep goes (default: runs/sweep)", "DIR"),
)


def _config_command_help(command: str, summary: str, flags: Sequence[Flag], config: Any,
                         config_name: str, examples: Sequence[str]) -> str:
    """``train --help`` / ``sweep --help``: the flags, then the config fields set most
    often with their current values, then how to see all of them."""
    rows = [("--config=NAME_OR_FILE", "a config file, or a packaged config (default: default)"),
            ("--config.FIELD=VALUE", "set one field of the config (repeat for more)")]
    for flag in flags:
        rows.append((f"--[no]{flag.name}" if flag.kind == "bool"
                     else f"--{flag.name}={flag.metavar or 'VALUE'}", flag.help))
    rows += [("--help-config", "list every config field, its default and what it means"),
             ("--debug", f"on an error, show the traceback too (or {DEBUG_ENV}=1)"),
             ("-h, --help", "show this help")]
    shown = Path(config_name.partition(":")[0]).stem
    fields = dict(config_fields(config))
    common = [(f"--config.{name}={fields.get(name, '(not in this config)')}", text)
              for name, text in COMMON_FIELDS]
    lines = [f"usage: {PROG} {command} [--config=NAME_OR_FILE] [--config.FIELD=VALUE ...] "
             "[flags]", "", *textwrap.wrap(summary, HELP_WIDTH), "", "flags:", *_columns(rows),
             "", *textwrap.wrap(f"packaged configs: {', '.join(packaged_configs())}", HELP_WIDTH),
             "", f"config fields set most often (with the values of the {shown!r} config):",
             *_columns(common), "",
             f"Every field, its default and what it means: {PROG} {command} --help-config",
             "", "examples:", *(f"  {example}" for example in examples)]
    return "\n".join(lines) + "\n"


def _columns(rows: Sequence[tuple[str, str]], width: int = HELP_WIDTH) -> list[str]:
    """``name  text`` rows, the texts aligned and wrapped to ``width`` columns."""
    indent = max(len(name) for name, _ in rows) + 4
    lines = []
    for name, text in rows:
        wrapped = textwrap.wrap(text, max(40, width - indent)) or [""]
        lines.append(f"  {name:<{indent - 2}}{wrapped[0]}")
        lines += [" " * indent + more for more in wrapped[1:]]
    return lines


def _config_fields_help(config: Any, config_name: str) -> str:
    """``--help-config``: every field of ``config``, its value and what configs/default.py
    says of it, in default.py's order."""
    comments = config_comments()
    fields = dict(config_fields(config))
    order = [f for f in comments if f in fields] + sorted(f for f in fields if f not in comments)
    lines = [*textwrap.wrap(
        f"Every field of the config {config_name}, with its value; set one with "
        "--config.FIELD=VALUE. What each means is the comment on its line of "
        f"{DEFAULT_CONFIG.relative_to(CONFIG_DIR.parent.parent)}.", HELP_WIDTH), ""]
    for field in order:
        lines.append(f"{field} = {fields[field]!r}")
        if comments.get(field):
            lines += textwrap.wrap(comments[field], HELP_WIDTH, initial_indent="    ",
                                   subsequent_indent="    ", break_on_hyphens=False,
                                   break_long_words=False)
    return "\n".join(lines) + "\n"


def _parse_config_flags(command: str, argv: Sequence[str], flags_: Sequence[Flag],
                        summary: str, examples: Sequence[str]) -> Any:
    """The parsed absl flags of ``train`` / ``sweep`` (``.config`` the ConfigDict), or the
    exit status of ``--help`` / ``--help-config``. The config flags are ml_collections' own:
    ``--config=...``, ``--config.FIELD=VALUE``, as with ``absl.app``."""
    prog = f"{PROG} {command}"
    argv = resolve_config_argument(list(argv))
    name = _named_config(argv)
    config = load_config(name)
    if any(a in HELP_FLAGS for a in argv):
        print(_config_command_help(command, summary, flags_, config, name, examples), end="")
        return 0
    if "--help-config" in argv:
        print(_config_fields_help(config, name), end="")
        return 0
    _check_overrides(config, argv, prog)

    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    full_argv = [prog, *argv]
    config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "the run's configuration",
                                    flag_values=values, sys_argv=full_argv)
    for flag in flags_:
        define = getattr(flags, f"DEFINE_{flag.kind}")
        define(flag.name, flag.default, flag.help, flag_values=values)
    try:
        rest = values(full_argv)
    except flags.Error as err:
        raise UsageError(f"{_flag_message(err)} ({prog} --help lists the flags)") from None
    if len(rest) > 1:
        raise UsageError(f"{prog} takes no positional argument, got {rest[1]!r} (flags are "
                         f"--name=value; {prog} --help lists them)")
    _quiet_absl_logging()
    return values


def _flag_message(err: Exception) -> str:
    unknown = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (\S+))?",
                       str(err))
    if unknown:
        close = f"; did you mean --{unknown.group(2)}?" if unknown.group(2) else ""
        return f"unknown flag --{unknown.group(1)}{close}"
    return str(err).strip().splitlines()[0]


def _quiet_absl_logging() -> None:
    """What ``absl.app.run`` set up for the libraries that log through absl (Orbax): its
    handler, and the flags counted as parsed; then warnings only (Orbax logs every save at
    INFO)."""
    from absl import flags, logging

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    logging.use_absl_handler()
    logging.set_verbosity(logging.WARNING)


# --- the commands ---------------------------------------------------------------------------

def _train(argv: list[str]) -> int:
    values = _parse_config_flags(
        "train", argv, TRAIN_FLAGS,
        "Learn one pruning mask per relation of a frozen masked LM (LAMP), select each on dev "
        "and report held-out test metrics; an interrupted run resumes when rerun.",
        (f"{PROG} train                                  # the embedded toy world, about 25 s",
         f"{PROG} train --config=bert_base_conceptnet --workdir=runs/bert_base",
         f"{PROG} train --config.epochs=2 --config.mask.mode=deterministic --workdir=/tmp/r"))
    if isinstance(values, int):
        return values
    from lamp_jax import hosts

    hosts.initialize_if_requested(values.distributed, values.coordinator_address,
                                  values.num_processes, values.process_id)
    from lamp_jax.loop import train_and_evaluate

    with hosts.stop_with_peers():
        summary = train_and_evaluate(values.config, values.workdir)
    if summary.get("preempted"):  # every process: the state is saved, a rerun resumes
        return hosts.PREEMPTED_EXIT
    if not hosts.is_main():
        return 0
    if "stopped_at" in summary:
        print(f"stopped after {summary['stopped_at']} steps; run the same command again to "
              "resume")
        return 0
    print(f"done: test macro P@1 full {summary['test']['full']['macro_P@1']:.3f} -> "
          f"pruned {summary['test']['pruned']['macro_P@1']:.3f}; outputs in {values.workdir}")
    return 0


def _sweep(argv: list[str]) -> int:
    values = _parse_config_flags(
        "sweep", argv, SWEEP_FLAGS,
        "Train every configuration of a grid x seeds, the runs that share a program side by "
        "side in one jitted step; write a run directory per run and a table of mean +- std "
        "over seeds. Interrupted, the same command resumes.",
        (f"{PROG} sweep --grid optim.learning_rate=0.3,1.0,2.0 --seeds 3 --workdir runs/lr",
         f"{PROG} sweep --grid mask.mode=stochastic,deterministic --config.epochs=20"))
    if isinstance(values, int):
        return values
    from lamp_jax import hosts

    hosts.initialize_if_requested()  # started by `launch`: every process takes part
    from lamp_jax.sweep import run_sweep

    with hosts.stop_with_peers():
        out = run_sweep(values.config, values.grid, values.seeds, values.workdir)
    return hosts.PREEMPTED_EXIT if out.get("preempted") else 0


def _evaluate(argv: list[str]) -> int:
    parser = _parser("evaluate", "Re-evaluate a saved run on one split: the full model, its "
                     "subnetworks (binary and soft masks) and the specialization matrix; "
                     "printed and written to RUN/eval_<split>.json.")
    parser.add_argument("--workdir", required=True, metavar="RUN",
                        help="a run directory, or a sweep's runs/<run>; may be a URL")
    parser.add_argument("--split", default="test", choices=("train", "dev", "test"),
                        help="the split to evaluate (default: test)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="load the frozen model from here instead")
    parser.add_argument("--cpu-devices", type=int, default=0, metavar="N",
                        help="CPU: JAX devices to split the host into (0: one per core)")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    from lamp_jax.hosts import initialize_if_requested, is_main, stop_with_peers

    initialize_if_requested()  # started by `launch`: every process takes part
    import jax

    from lamp_jax.evaluate import reevaluate
    from lamp_jax.paths import as_path
    from lamp_jax.placement import use_cpu_devices

    use_cpu_devices(args.cpu_devices)  # first: the setup's own call is then a no-op
    with stop_with_peers():
        reevaluate(args.workdir, args.split, args.model)
    if is_main():
        print(f"devices: {jax.device_count()} in {jax.process_count()} process(es); wrote "
              f"{as_path(args.workdir) / f'eval_{args.split}.json'}")
    return 0


def _report(argv: list[str]) -> int:
    parser = _parser("report", "Analyses of a saved run, written to RUN/report/ with an "
                     "index.md: specialization, combined masks, knowledge-base completion, "
                     "representations, attention, and with --qa zero-shot QA.")
    parser.add_argument("--workdir", required=True, metavar="RUN",
                        help="a run directory, or a sweep's runs/<run>; may be a URL")
    parser.add_argument("--ckbc", default=None, metavar="FILE",
                        help="ConceptNet triples to complete (rel<TAB>head<TAB>tail)")
    parser.add_argument("--max-size", type=_positive_int, default=2, metavar="K",
                        help="the most relations one combined mask joins (default: 2)")
    parser.add_argument("--qa", default=None, metavar="FILE",
                        help="a CommonsenseQA jsonl or COPA xml file to answer zero-shot")
    parser.add_argument("--qa-format", choices=("csqa", "copa"), default="csqa",
                        help="the --qa file's format (default: csqa)")
    parser.add_argument("--qa-relations", default="", metavar="R1,R2",
                        help="the relations whose masks --qa combines (default: all)")
    parser.add_argument("--qa-method", choices=("or", "and", "vote", "soft"), default="or",
                        help="how --qa combines their masks (default: or)")
    parser.add_argument("--control", default=None, metavar="RUN",
                        help="a run of the same recipe on random weights, to set beside")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    from lamp_jax.hosts import initialize_if_requested

    initialize_if_requested()  # started by `launch`: every process takes part
    from lamp_jax.report import write_report

    relations = tuple(r.strip() for r in args.qa_relations.split(",") if r.strip())
    write_report(args.workdir, args.ckbc, args.max_size, qa_file=args.qa,
                 qa_format=args.qa_format, qa_relations=relations, qa_method=args.qa_method,
                 control=args.control)
    return 0


def _predict(argv: list[str]) -> int:
    parser = _parser("predict", "The top-k tokens and their probabilities at the [MASK] of a "
                     "prompt: with one relation's subnetwork, or the full model.",
                     f'example:\n  {PROG} predict runs/default "the boat is a kind of [MASK] ."'
                     " --relation IsA -k 5")
    parser.add_argument("run", metavar="RUN", help="a run directory; may be a URL")
    parser.add_argument("prompt", metavar="PROMPT", help="a sentence with one [MASK]")
    parser.add_argument("--relation", default=None,
                        help="whose subnetwork answers (default: the full, unpruned model)")
    parser.add_argument("-k", type=_positive_int, default=5,
                        help="how many tokens to show (default: 5)")
    parser.add_argument("--kind", choices=("threshold", "expectation"), default=None,
                        help="binary masks, or weights times sigmoid(G) (default: the run's)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="load the frozen model from here instead")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    from lamp_jax.api import check_prompt, check_relation, load_run
    from lamp_jax.run_dir import RunDirectory

    check_prompt(args.prompt)  # before the model loads
    if args.relation is not None:
        check_relation(args.relation, RunDirectory(args.run).manifest().relations)
    run = load_run(args.run, model=args.model)
    for token, probability in run.predict(args.prompt, args.relation, args.k, args.kind):
        print(f"{token}\t{probability:.6f}")
    return 0


def _export(argv: list[str]) -> int:
    parser = _parser("export", "Write one relation's subnetwork as a Hugging Face checkpoint "
                     "(config.json, model.safetensors, the tokenizer) that transformers opens "
                     "as any masked LM, e.g. pipeline('fill-mask', model=DIR).")
    parser.add_argument("run", metavar="RUN", help="a run directory; may be a URL")
    parser.add_argument("relation", metavar="RELATION", help="whose subnetwork to write")
    parser.add_argument("directory", metavar="DIR", help="where to write it")
    parser.add_argument("--kind", choices=("threshold", "expectation"), default="threshold",
                        help="binary masks, or weights times sigmoid(G) (default: threshold)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="load the frozen model from here instead")
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    from lamp_jax.api import check_relation, load_run
    from lamp_jax.run_dir import RunDirectory

    check_relation(args.relation, RunDirectory(args.run).manifest().relations)
    if Path(args.directory).exists() and not Path(args.directory).is_dir():
        raise UsageError(f"{args.directory} is a file; export writes a directory")
    run = load_run(args.run, model=args.model)
    written = run.export_subnetwork(args.relation, args.directory, kind=args.kind)
    print(f"wrote {args.relation}'s subnetwork ({args.kind}) to {written}")
    return 0


def _launch(argv: list[str]) -> int:
    parser = _parser("launch", "Run one command as N joined JAX processes on this machine (a "
                     "pod in miniature): a loopback coordinator, and each process its share of "
                     "the cores as CPU devices. A SIGTERM to the launcher reaches every process.",
                     f"example:\n  {PROG} launch --processes 2 -- {PROG} train --workdir "
                     "runs/two")
    parser.usage = f"{PROG} launch --processes N [flags] -- COMMAND ..."
    parser.add_argument("--processes", type=_positive_int, required=True, metavar="N",
                        help="processes to start")
    parser.add_argument("--devices-per-process", type=int, default=0, metavar="N",
                        help="CPU devices per process (0: the cores divided among them)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="how long the others may take to stop after one fails")
    parser.add_argument("--heartbeat-timeout", type=int, default=20, metavar="SECONDS",
                        help="seconds without a heartbeat before a process is dead")
    parser.add_argument("--port", type=int, default=0,
                        help="the coordinator's port (0: a free one)")
    split = argv.index("--") if "--" in argv else len(argv)
    args = _parse(parser, argv[:split])
    if isinstance(args, int):
        return args
    if split == len(argv) or split == len(argv) - 1:
        raise UsageError(f"{PROG} launch: name the command to start after --, e.g. {PROG} "
                         "launch --processes 2 -- lamp-jax train")
    from lamp_jax.launch import launch

    return launch(argv[split + 1:], args.processes, args.devices_per_process, args.grace,
                  args.heartbeat_timeout, args.port)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not at least 1")
    return value


@dataclasses.dataclass(frozen=True)
class Command:
    run: Callable[[list[str]], int]
    summary: str


COMMANDS = {
    "train": Command(_train, "learn every relation's mask, then report (python train.py)"),
    "sweep": Command(_sweep, "train a grid of configurations x seeds side by side"),
    "evaluate": Command(_evaluate, "re-evaluate a saved run on one split"),
    "report": Command(_report, "write a saved run's analyses to RUN/report/"),
    "predict": Command(_predict, "the top-k tokens at a prompt's [MASK], subnetwork or full"),
    "export": Command(_export, "write a relation's subnetwork as a Hugging Face checkpoint"),
    "launch": Command(_launch, "run a command as N joined JAX processes on this machine"),
}


def _overview() -> str:
    lines = [f"usage: {PROG} COMMAND [flags]   ({PROG} COMMAND --help: that command's flags)",
             "", "Relation-specific subnetworks of masked language models (LAMP), in JAX.", "",
             "commands:", *_columns([(name, c.summary) for name, c in COMMANDS.items()]), "",
             "flags of every command:",
             *_columns([("--debug", f"on an error, show the traceback too (or {DEBUG_ENV}=1)"),
                        ("-h, --help", "show the help")]),
             "", f"python train.py and lamp-jax-train are `{PROG} train`; python -m "
             "lamp_jax.sweep|evaluate|report|launch are the commands of those names."]
    return "\n".join(lines) + "\n"


def _dispatch(argv: list[str]) -> int:
    if not argv:
        raise UsageError(f"name a command: {', '.join(COMMANDS)} ({PROG} --help says what "
                         "each does)")
    if argv[0] in HELP_FLAGS:
        print(_overview(), end="")
        return 0
    if argv[0] == "--version":
        from lamp_jax import __version__

        print(f"{PROG} {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{PROG}: unknown command {argv[0]!r}{hint} (commands: "
                         f"{', '.join(COMMANDS)})")
    return COMMANDS[argv[0]].run(argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """``lamp-jax COMMAND ...``: runs the command and returns its exit status (0: done; 2: a
    mistake in what was asked, said in one ``error:`` line; 75: stopped, rerun to resume)."""
    return _guarded(_dispatch, list(sys.argv[1:] if argv is None else argv))


def _alias(command: str, argv: Sequence[str] | None) -> int:
    return main([command, *(sys.argv[1:] if argv is None else argv)])


def train(argv: Sequence[str] | None = None) -> int:
    """``lamp-jax-train`` and ``python train.py``: ``lamp-jax train``."""
    return _alias("train", argv)


def sweep(argv: Sequence[str] | None = None) -> int:
    """``python -m lamp_jax.sweep``: ``lamp-jax sweep``."""
    return _alias("sweep", argv)


def evaluate(argv: Sequence[str] | None = None) -> int:
    """``lamp-jax-evaluate`` and ``python -m lamp_jax.evaluate``: ``lamp-jax evaluate``."""
    return _alias("evaluate", argv)


def report(argv: Sequence[str] | None = None) -> int:
    """``lamp-jax-report`` and ``python -m lamp_jax.report``: ``lamp-jax report``."""
    return _alias("report", argv)


def launch(argv: Sequence[str] | None = None) -> int:
    """``python -m lamp_jax.launch``: ``lamp-jax launch``."""
    return _alias("launch", argv)
