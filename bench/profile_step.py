"""Where a training step's time goes: a ``jax.profiler`` trace of our step, summed per op.

    python -m bench.profile_step                       # small config, 2-core CPU
    python -m bench.profile_step --size base --relations 16 --batch 32 --length 20  # a GPU

Prints the step's median wall time, then the ops' time summed by category (matmul or other;
forward, backward or the update after the gradient) and the most expensive ops with their
output shapes and the source operation XLA attributes them to. Op times are summed over the
threads and streams that ran them, so on a multi-core CPU they can exceed the wall time.
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

from bench.common import SIZES, machine, median_time
from bench.train_throughput import WARMUP_STEPS, setup_step


def op_times(trace_dir: str, steps: int, hlo_text: str) -> collections.Counter:
    """Per-op microseconds per step from the trace under ``trace_dir``, for the events that are
    instructions of the compiled module ``hlo_text`` (not the runtime's own events, such as
    argument parsing or buffer allocation)."""
    (path,) = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    instructions = set(re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = ", hlo_text, re.MULTILINE))
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in instructions:
            totals[event["name"]] += event.get("dur", 0) / steps
    return totals


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
    parser.add_argument("--size", choices=tuple(SIZES), default="small")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--top", type=int, default=15, help="ops listed")
    args = parser.parse_args()

    import jax

    built = setup_step(SIZES[args.size], args.relations, args.batch, args.length, args.dtype,
                       "deterministic", None, cache_prefix=True)
    step, state, params, data = (built[k] for k in ("step", "state", "params", "data"))

    def one():
        nonlocal state
        state, _ = step(state, params, data)
        jax.block_until_ready(state)

    for _ in range(WARMUP_STEPS):  # compiling, then first-touch page faults
        one()
    wall = median_time(one, 20)
    hlo_text = step.lower(state, params, data).compile().as_text()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                one()
        times = op_times(trace_dir, args.steps, hlo_text)

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
    print(f"{'ms':>8}  {'op':28s} {'output':28s} source")
    for op, us in times.most_common(args.top):
        shape, source = described[op]
        print(f"{us / 1e3:8.2f}  {op:28s} {shape:28s} {source[-70:]}")


if __name__ == "__main__":
    main()
