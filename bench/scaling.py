"""How our step's cost grows with the number of relations and with the number of pruned layers.

    python -m bench.scaling            # small widths, 2-core CPU, about 2 minutes

Prints the step time, the time per relation-example and the time per model GFLOP (FLOPs counted
as ``bench.common.train_flops_per_example`` for a step that runs the frozen layers too: no
prefix cache here, so that depth is measured). Time per relation-example that stays flat as
relations are added means cost grows linearly with the work, with no per-relation overhead
beyond it; time per GFLOP that stays flat as layers are pruned means the same for depth. A
least-squares line ``step = fixed + per_relation * R`` is printed for the first table.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import machine, synthetic_run, time_steps, train_flops_per_example

WIDE = dict(vocab_size=1000, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512)
DEEP = dict(vocab_size=1000, hidden_size=64, num_layers=12, num_heads=2, intermediate_size=256)


def step_time(shape: dict, layers: tuple[int, ...], relations: int, batch: int, length: int,
              repeats: int) -> tuple[float, float]:
    """(median step seconds, compile seconds) of train.py's step for these sizes (its own
    setup, :func:`bench.common.synthetic_run`), without the frozen-prefix cache so that depth
    is measured, on one device (``cpu_devices=1``: the relation count is the variable)."""
    run = synthetic_run({**shape, "layers": layers}, relations, batch, length,
                        cache_prefix=False, relation_parallelism=1)
    return time_steps(run.step_fn, run.init_state(log=lambda *_: None),
                      (run.frozen, run.train_batch(0), run.learning_rate), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--relations", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 6, 12])
    parser.add_argument("--deep-relations", type=int, default=4)
    args = parser.parse_args()
    b, length = args.batch, args.length
    print(f"machine: {machine()}; medians of {args.repeats} steps")

    print(f"\nstep time vs relations: hidden {WIDE['hidden_size']}, {WIDE['num_layers']} layers, "
          f"FFN {WIDE['intermediate_size']}, vocab {WIDE['vocab_size']}, masks on layers 2..3 "
          f"(all 6 matrices), B={b}, L={length}")
    print(f"{'relations':>10}{'step ms':>10}{'us/rel-ex':>11}{'ms/GFLOP':>10}{'compile s':>11}")
    size = {**WIDE, "layers": (2, 3)}
    steps = []
    for relations in args.relations:
        seconds, compile_s = step_time(WIDE, (2, 3), relations, b, length, args.repeats)
        steps.append(seconds)
        gflop = train_flops_per_example(size, length, cached_prefix=False) * relations * b / 1e9
        print(f"{relations:>10}{1e3 * seconds:>10.1f}{1e6 * seconds / (relations * b):>11.0f}"
              f"{1e3 * seconds / gflop:>10.1f}{compile_s:>11.1f}", flush=True)
    per_relation, fixed = np.polyfit(np.asarray(args.relations, float), np.asarray(steps), 1)
    print(f"least squares: step = {1e3 * fixed:.1f} ms + {1e3 * per_relation:.2f} ms * R "
          f"({1e6 * per_relation / b:.0f} us per relation-example)")

    print(f"\nstep time vs pruned layers: hidden {DEEP['hidden_size']}, {DEEP['num_layers']} "
          f"layers, FFN {DEEP['intermediate_size']}, top layers pruned (all 6 matrices), "
          f"{args.deep_relations} relations, B={b}, L={length}")
    print(f"{'layers':>10}{'step ms':>10}{'us/rel-ex':>11}{'GFLOP':>8}{'ms/GFLOP':>10}"
          f"{'compile s':>11}")
    n = DEEP["num_layers"]
    for count in args.layers:
        layers = tuple(range(n - count, n))
        seconds, compile_s = step_time(DEEP, layers, args.deep_relations, b, length,
                                       args.repeats)
        examples = args.deep_relations * b
        gflop = train_flops_per_example({**DEEP, "layers": layers}, length,
                                        cached_prefix=False) * examples / 1e9
        print(f"{count:>10}{1e3 * seconds:>10.1f}{1e6 * seconds / examples:>11.0f}"
              f"{gflop:>8.2f}{1e3 * seconds / gflop:>10.1f}{compile_s:>11.1f}", flush=True)
    print("Every layer runs forward (the last one only at [MASK]); the backward pass starts at "
          "the lowest pruned layer, so it covers 1, 6 or 12 layers (the GFLOP column).")


if __name__ == "__main__":
    main()
