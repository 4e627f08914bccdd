"""Where a training step's time goes: a ``jax.profiler`` trace of our step, summed per op.

    python -m bench.profile_step                       # small config, 2-core CPU
    python -m bench.profile_step --size base --relations 16 --batch 32 --length 20  # a GPU

Prints the step's median wall time, then the ops' time summed by category (matmul or other;
forward, backward or the update after the gradient), a timeline of one step (op time per phase
in each tenth of it: what runs when, and how much runs side by side) and the most expensive
ops with their output shapes and the source operation XLA attributes them to. Op times are
summed over the threads and streams that ran them, so on a multi-core CPU they can exceed the
wall time.
This is the profile that led to the changes listed in bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile

from bench.common import SIZES, add_cpu_devices_argument, add_step_arguments, machine, median_time
from bench.train_throughput import WARMUP_STEPS, setup_step


def op_events(trace_dir: str, hlo_text: str) -> list[dict]:
    """The trace's complete events under ``trace_dir`` that are instructions of the compiled
    module ``hlo_text`` (not the runtime's own events, such as argument parsing or buffer
    allocation), sorted by start time."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    instructions = set(re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = ", hlo_text, re.MULTILINE))
    ops = [e for e in events if e.get("ph") == "X" and e["name"] in instructions]
    return sorted(ops, key=lambda e: e["ts"])


def op_times(trace_dir: str, steps: int, hlo_text: str) -> collections.Counter:
    """Per-op microseconds per step, summed over the threads and streams that ran them."""
    totals: collections.Counter = collections.Counter()
    for event in op_events(trace_dir, hlo_text):
        totals[event["name"]] += event.get("dur", 0) / steps
    return totals


def split_steps(events: list[dict], steps: int) -> list[list[dict]]:
    """Sorted op events cut into ``steps`` runs at the largest gaps in which no op ran."""
    gaps, end = [], None
    for i, event in enumerate(events):
        if end is not None and event["ts"] > end:
            gaps.append((event["ts"] - end, i))
        end = max(end or 0, event["ts"] + event.get("dur", 0))
    cuts = sorted(i for _, i in sorted(gaps, reverse=True)[:steps - 1])
    return [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]


def phase_timeline(step: list[dict], phase_of: dict[str, str], slices: int = 10
                   ) -> list[tuple[float, float, collections.Counter]]:
    """The step (first op start to last op end) cut into ``slices`` equal slices of time; for
    each, ``(start us, end us, op time us per phase)`` with every op's duration split across
    the slices it overlaps. Op time can exceed a slice's length where ops run side by side."""
    start = step[0]["ts"]
    length = max(e["ts"] + e.get("dur", 0) for e in step) - start
    width = length / slices
    rows = [(i * width, (i + 1) * width, collections.Counter()) for i in range(slices)]
    for event in step:
        a = event["ts"] - start
        b = a + event.get("dur", 0)
        for lo, hi, counter in rows:
            overlap = min(b, hi) - max(a, lo)
            if overlap > 0:
                counter[phase_of[event["name"]]] += overlap
    return rows


def describe(hlo_text: str, op: str) -> tuple[str, str]:
    """(output shape, source op name) of the HLO instruction ``op`` ('', '' if not found)."""
    match = re.search(r"%" + re.escape(op) + r" = (\S+) [\w-]+\(.*?op_name=\"([^\"]*)\"",
                      hlo_text)
    return (match.group(1), match.group(2)) if match else ("", "")


def category(op: str, source: str) -> tuple[str, str]:
    """(matmul | other, forward | backward | update) from the op and its source op name."""
    kind = "matmul" if re.match(r"(dot|ynn_fusion|xnn_fusion|.*gemm|.*cublas)", op) else "other"
    if "transpose(" in source:
        return kind, "backward"
    if "jvp(" in source:
        return kind, "forward"
    return kind, "update"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, mode=False)
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    add_cpu_devices_argument(parser)
    args = parser.parse_args()

    import jax

    from lamp_jax.placement import use_cpu_devices

    use_cpu_devices(args.cpu_devices)  # as train.py does, before JAX starts

    built = setup_step(SIZES[args.size], args.relations, args.batch, args.length, args.dtype,
                       "deterministic", None, cache_prefix=True)
    step, state, params, data, lr = (built[k] for k in ("step", "state", "params", "data",
                                                         "lr"))

    def one():
        nonlocal state
        state, _ = step(state, params, data, lr)
        jax.block_until_ready(state)

    for _ in range(WARMUP_STEPS):  # compiling, then first-touch page faults
        one()
    wall = median_time(one, 20)
    hlo_text = step.lower(state, params, data, lr).compile().as_text()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                one()
        times = op_times(trace_dir, args.steps, hlo_text)
        events = op_events(trace_dir, hlo_text)

    print(f"profile of one training step: size={args.size}, R={args.relations}, "
          f"B={args.batch}, L={args.length}, {args.dtype}; {machine()}")
    print(f"step wall time (median of 20): {wall * 1e3:.1f} ms; ops summed: "
          f"{sum(times.values()) / 1e3:.1f} ms over {len(times)} ops")
    by_category: collections.Counter = collections.Counter()
    described = {op: describe(hlo_text, op) for op in times}
    for op, us in times.items():
        by_category[category(op, described[op][1])] += us
    print(f"{'ms':>8}  category")
    for (kind, phase), us in by_category.most_common():
        print(f"{us / 1e3:8.2f}  {kind} {phase}")
    # Along the step: when each phase ran (the middle traced step, so neither edge of the trace).
    phase_of = {op: category(op, described[op][1])[1] for op in times}
    timeline = phase_timeline(split_steps(events, args.steps)[args.steps // 2], phase_of)
    phases = ("forward", "backward", "update")
    print(f"along the middle traced step ({timeline[-1][1] / 1e3:.1f} ms from its first op to "
          "its last): op time (ms) per phase in each tenth of it")
    print(f"{'ms of the step':>16}" + "".join(f"{p:>10}" for p in phases))
    for lo, hi, counter in timeline:
        print(f"{lo / 1e3:7.1f} - {hi / 1e3:5.1f} " + "".join(
            f"{counter[p] / 1e3:10.2f}" for p in phases))
    print(f"{'ms':>8}  {'op':28s} {'output':28s} source")
    for op, us in times.most_common(args.top):
        shape, source = described[op]
        print(f"{us / 1e3:8.2f}  {op:28s} {shape:28s} {source[-70:]}")


if __name__ == "__main__":
    main()
