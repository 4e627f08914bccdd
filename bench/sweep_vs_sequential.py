"""A sweep against the same runs one after another with train.py's function: wall time, and
whether every run came out the same (masks.npz byte for byte, every metric).

    python -m bench.sweep_vs_sequential --grid mask.mode=stochastic,deterministic \\
        --grid optim.learning_rate=0.03,0.1,0.3,1.0 --seeds 3 [--no-compile-cache]

Both sides run in this process, sweep first; each side writes checkpoints and reports as a user's
would. With the compilation cache (the default config's), the runs one after another load the
step and ranking the sweep compiled, as a user's second run would; ``--no-compile-cache``
(``--config.compile_cache_dir=``) compiles every run's programs again, as before the cache.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", action="append", default=[], help="key=v1,v2 (repeatable)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    parser.add_argument("--no-compile-cache", action="store_true")
    args = parser.parse_args()

    from lamp_jax.configs import default
    from lamp_jax.loop import train_and_evaluate
    from lamp_jax.sweep import run_sweep, with_overrides

    base = default.get_config()
    if args.epochs:
        base.epochs = args.epochs
    if args.no_compile_cache:
        base.compile_cache_dir = ""
    else:  # a fresh cache: neither side finds programs of an earlier measurement
        base.compile_cache_dir = tempfile.mkdtemp(prefix="lamp_jax_bench_cache_")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="lamp_jax_sweep_bench_"))
    quiet = lambda *_: None  # noqa: E731

    start = time.perf_counter()
    out = run_sweep(base, args.grid, args.seeds, workdir / "sweep", log=quiet)
    sweep_s = time.perf_counter() - start

    start, identical = time.perf_counter(), 0
    for row in out["runs"]:
        config = with_overrides(base, dict(row["overrides"], seed=row["seed"], plots=False))
        alone = workdir / "alone" / Path(row["run_dir"]).name
        summary = train_and_evaluate(config, alone, log=quiet)
        swept = json.loads((workdir / "sweep" / row["run_dir"] / "metrics.json").read_text())
        same = ((alone / "masks.npz").read_bytes()
                == (workdir / "sweep" / row["run_dir"] / "masks.npz").read_bytes()
                # Through JSON, as both are written: NaN (a mask that prunes nothing has no
                # overlap) then equals NaN.
                and all(json.dumps(swept[k], sort_keys=True) == json.dumps(summary[k],
                                                                           sort_keys=True)
                        for k in ("test", "dev", "sparsity", "best_dev_macro_P1", "controls")
                        if k in swept))
        identical += same
    sequential_s = time.perf_counter() - start
    print(f"{machine()}; compile cache {'off' if args.no_compile_cache else 'on'}")
    print(f"{len(out['runs'])} runs: sweep {sweep_s:.1f} s, one after another {sequential_s:.1f} "
          f"s: the sweep is {sequential_s / sweep_s:.2f}x faster; {identical} of "
          f"{len(out['runs'])} runs identical (masks.npz and metrics)")


if __name__ == "__main__":
    main()
