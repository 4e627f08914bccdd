"""What bounding memory costs in speed: our step at several relation chunks, in one process.

    python -m bench.chunk_sweep --size base --relations 16 --batch 32 --length 20 \\
        --dtype bfloat16 --mode stochastic --chunks 1 2 4 0     # 0 = all relations at once

For each chunk (relations per device at a time): the median step time, relation-examples per
second, and XLA's plan of the step's peak memory against the state plus the frozen weights
(the ratio the memory work targets, bench/README.md). Runs as train.py runs: the state on the
devices, donated on accelerators, the frozen prefix cached.
"""

from __future__ import annotations

import argparse

from bench.common import SIZES, add_step_arguments, machine, time_steps

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import jax

    examples = args.relations * args.batch
    print(f"chunk sweep: size={args.size}, R={args.relations}, B={args.batch}, L={args.length}, "
          f"{args.mode} masks, compute {args.dtype}, moments {args.moment_dtype}; "
          f"{jax.devices()[0].device_kind}; {machine()}")
    print(f"{'chunk':>6}{'step s':>10}{'rel-ex/s':>10}{'first step s':>13}{'plan peak GiB':>15}"
          f"{'state+frozen GiB':>18}{'ratio':>7}")
    for chunk in args.chunks:
        seconds, compile_s, peak, base = measure(args, chunk)
        print(f"{chunk or 'all':>6}{seconds:>10.4f}{examples / seconds:>10.0f}{compile_s:>13.2f}"
              f"{peak / GIB:>15.2f}{base / GIB:>18.2f}{peak / base:>7.2f}", flush=True)


def measure(args, chunk: int) -> tuple[float, float, int, int]:
    """(median step s, first step s, planned peak bytes, state + frozen bytes) of one chunk.
    The plan compiles the step, so the first step no longer includes compilation."""
    import jax

    from bench.train_throughput import setup_step

    built = setup_step(SIZES[args.size], args.relations, args.batch, args.length, args.dtype,
                       args.mode, chunk or None, True, None, args.moment_dtype)
    step, params, data, state, lr = (built[k] for k in ("step", "params", "data", "state",
                                                         "lr"))
    base = sum(x.nbytes for x in jax.tree.leaves((state.mask_logits, state.opt_state, params)))
    stats = step.lower(state, params, data, lr).compile().memory_analysis()
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    seconds, first_s = time_steps(step, state, (params, data, lr), args.repeats, warmup=1)
    return seconds, first_s, peak, base

if __name__ == "__main__":
    main()
